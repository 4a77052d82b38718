"""``command``: the stage body is the user's own shell code, run as written on one node
(or on ``nodes`` nodes, where ``srun`` in the body reaches them all)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from ..schema import StageCfg
from . import register
from .base import PlanContext, StageKind


@dataclass
class CommandStage(StageCfg):
    command: str = MISSING
    """Shell commands run as the stage body (your own shell code, used as written)."""


class Command(StageKind):
    name = "command"
    summary = "your own shell commands"
    settings = CommandStage
    output_keys = ()

    def plan(self, ctx: PlanContext):
        if not str(ctx.sp.cfg.command).strip():
            raise ctx.error("command", "is empty")
        return [], []


register(Command())
