"""``evaluate``: before/after generations and held-out loss (job side: :mod:`hpcjobs.train.evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from ..constraints import number
from ..errors import ConfigError
from ..schema import StageCfg
from ..userfiles import read_text
from . import register
from .base import StageKind, plain, to_json


@dataclass
class EvaluateStage(StageCfg):
    base: str = MISSING
    merged: str = MISSING
    prompts: Optional[str] = None
    """Prompts file, one prompt per line; None: the first test-split rows without the answer column."""
    max_new_tokens: int = number(150, ge=1)
    max_seq_length: int = number(512, ge=1)
    """Length the held-out texts are cut to for the loss (as in training)."""
    output: str = "${run.dir}/eval"


class Evaluate(StageKind):
    name = "evaluate"
    summary = "greedy generations base vs merged, held-out loss, eval/report.md"
    settings = EvaluateStage
    entry_point = "hpcjobs.train.evaluate"
    sections = ("data",)
    path_keys = ("base", "merged", "prompts", "output")
    input_dirs = ("base", "merged")

    def default_gpus(self, profile):
        return min(1, profile.gpus_per_node)

    def preflight(self, plan, sp, composed, produced):
        s = sp.cfg
        if not s.prompts:
            return
        try:
            text = read_text(s.prompts, "prompts file")
        except ConfigError as e:
            raise composed.error(f"{sp.name}.prompts", e.message) from None
        if not text.strip():
            raise composed.error(f"{sp.name}.prompts", f"{s.prompts}: prompts file has no prompts "
                                 "(one per line, blank lines are ignored)")

    def files(self, plan, sp):
        s = sp.cfg
        # The same shape as a finetune's train.json, so the held-out split is built the same way.
        return {"eval.json": to_json({
            "model_path": s.base,
            "output_dir": s.output,
            "device": plan.chain.profile.accelerator,
            "data": plain(plan.chain.data),
            "train": {"max_seq_length": s.max_seq_length},
        })}


register(Evaluate())
