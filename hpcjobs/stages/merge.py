"""``merge``: a LoRA adapter merged into its base model (job side: :mod:`hpcjobs.train.merge`)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from ..constraints import choice
from ..schema import DTYPES, StageCfg
from . import register
from .base import StageKind, torch_dtype


@dataclass
class MergeStage(StageCfg):
    base: str = MISSING
    adapter: str = MISSING
    output: str = "${run.dir}/merged"
    dtype: str = choice(*DTYPES, default="auto")


class Merge(StageKind):
    name = "merge"
    summary = "LoRA adapter merged into the base weights"
    settings = MergeStage
    entry_point = "hpcjobs.train.merge"
    path_keys = ("base", "adapter", "output")
    input_dirs = ("base", "adapter")

    def default_gpus(self, profile):
        return min(1, profile.gpus_per_node)

    def template_vars(self, plan, sp):
        return {"dtype": torch_dtype(sp.cfg.dtype, plan.chain.profile.precision)}


register(Merge())
