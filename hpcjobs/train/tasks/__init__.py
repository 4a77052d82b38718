"""What differs between the tasks prepare, finetune and evaluate run (job side).

``causal-lm`` is the finetune/prepare/evaluate modules' own path (TRL's SFTTrainer). The other
tasks (:data:`hpcjobs.schema.TASKS`) are one module each here, holding every job-side piece of
that task in one place:

* ``prepare_map(cfg, tok, source, fields)``: the ``datasets.map`` function that formats and
  tokenizes a split (rows named by ``_row`` in errors), and ``split_stats(ds)``;
* ``MODEL_COLUMNS``: the prepared columns the model takes;
* ``training_args(common, t)``, ``load_model(path, dtype, info)``, ``make_trainer(...)``:
  the finetune stage's Trainer;
* ``evaluate(cfg, base, merged, output, ...)``: the evaluate stage's report.

Everything else (launch, DeepSpeed, resume, preemption, progress, memory) is shared.
"""

from __future__ import annotations

import importlib
from typing import Any

from hpcjobs.errors import HpcjobsError

CAUSAL_LM = "causal-lm"
_MODULES = {"classification": "hpcjobs.train.tasks.classification", "seq2seq": "hpcjobs.train.tasks.seq2seq"}


def task_module(task: str | None) -> Any:
    """The module of a task other than causal-lm, or None for causal-lm."""
    if task in (None, CAUSAL_LM):
        return None
    if task not in _MODULES:
        raise HpcjobsError(f"unknown task {task!r} (known: {CAUSAL_LM}, {', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[task])


def cell_text(value: Any, row: int, column: str, source: str) -> str:
    """A cell as text; None/NaN are empty. Lists and mappings are refused (naming row and column)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, (list, dict, tuple, bytes)):
        raise HpcjobsError(f"{source}: row {row}, column {column!r}: expected text, got {type(value).__name__} "
                           f"{str(value)[:60]!r}")
    return str(value).strip()


def fill(template: str, fields: list[str], batch: dict, i: int, row: int, source: str) -> str:
    return template.format(**{f: cell_text(batch[f][i], row, f, source) for f in fields})


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
