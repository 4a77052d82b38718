"""Keep the n best checkpoints by an eval metric, and the latest.

The Trainer's ``save_total_limit`` keeps the newest checkpoints (plus the best one when
``load_best_model_at_end``); "keep the 3 best by validation accuracy" needs its own rule. The
latest checkpoint is kept as well whatever its score, because a requeued or rerun job resumes
from it: dropping it would throw away the steps since the best one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def keep(scores: dict[int, float], steps: list[int], n: int, greater_is_better: bool) -> set[int]:
    """The steps to keep: the ``n`` best scored (0: all) and the latest of ``steps``."""
    if n <= 0:
        return set(steps)
    ranked = sorted((s for s in steps if s in scores), key=lambda s: scores[s], reverse=greater_is_better)
    return set(ranked[:n]) | ({max(steps)} if steps else set())


class KeepBest(TrainerCallback):
    def __init__(self, metric: str, n: int) -> None:
        self.key = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.n = n
        self.greater_is_better = metric != "loss"

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        scores = {e["step"]: e[self.key] for e in state.log_history if self.key in e and "step" in e}
        found = {int(m.group(1)): p for p in Path(args.output_dir).iterdir()
                 if p.is_dir() and (m := _CHECKPOINT.match(p.name))}
        kept = keep(scores, sorted(found), self.n, self.greater_is_better)
        if state.best_model_checkpoint:   # load_best_model_at_end reloads it
            m = _CHECKPOINT.match(Path(state.best_model_checkpoint).name)
            kept |= {int(m.group(1))} if m else set()
        for step, path in found.items():
            if step not in kept:
                shutil.rmtree(path, ignore_errors=True)
