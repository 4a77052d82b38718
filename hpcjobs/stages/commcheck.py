"""``commcheck``: an all-reduce bandwidth test across the allocated nodes, before training.

torchrun starts :mod:`hpcjobs.train.commcheck` on every node (the ``script`` kind's
launch machinery: a :class:`hpcjobs.launchers.LaunchSpec` in ``launch.json``, one
``hpcjobs.launch run`` per node under ``srun``), one rank per GPU, with NCCL on
``accelerator: cuda`` profiles and gloo on ``cpu``. It reports the bus bandwidth
(nccl-tests' ``busbw = algbw × 2(n−1)/n``) per message size to the log and to
``$HPCJOBS_ATTEMPT_DIR/commcheck.json``, and fails the stage, naming the slow node(s),
when the peak is below ``expected_busbw`` (default ``profile.expected_busbw``).

A recipe puts it before training so that a slow interconnect fails the chain first::

    pipeline:
      commcheck: {kind: commcheck}
      train: {kind: finetune, after: [commcheck]}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional

from .. import launchers
from ..constraints import number
from ..errors import ConfigError
from ..schema import StageCfg
from . import register
from .base import PlanContext, StageKind

_SIZE = re.compile(r"^[0-9]+(?:\.[0-9]+)?[KMG]?B?$", re.I)
MAX_SIZE = 8 << 30


def size_bytes(text: str) -> int:
    """``1M``, ``64K``, ``1G`` or a byte count (same rule as the job side)."""
    t = text.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


@dataclass
class CommcheckStage(StageCfg):
    sizes: List[str] = field(default_factory=lambda: ["1M", "16M", "128M"])
    """All-reduce message sizes (bytes, or with K/M/G), one bus bandwidth figure each."""
    iters: int = number(20, ge=1, le=100000)
    """Timed all-reduces per size."""
    warmup: int = number(5, ge=0, le=100000)
    """Untimed all-reduces per size before timing."""
    pairs: bool = False
    """Also test every pair of nodes on its own and name the slow pair/node."""
    expected_busbw: Optional[float] = number("${profile.expected_busbw}", gt=0)
    """Peak bus bandwidth (GB/s) below which the stage fails; null: report only."""


class Commcheck(StageKind):
    name = "commcheck"
    summary = "all-reduce bandwidth test across the nodes (NCCL or gloo); fails when below expectation"
    settings = CommcheckStage
    entry_point = "hpcjobs.train.commcheck"
    output_keys = ()
    multi_node = True

    def default_gpus(self, profile):
        if profile.accelerator == "cuda":
            return profile.gpus_per_node
        return profile.train_gpus_per_node or 1

    def plan(self, ctx: PlanContext):
        s: CommcheckStage = ctx.sp.cfg
        sp = ctx.sp
        if not s.sizes:
            raise ctx.error("sizes", "needs at least one message size")
        for item in s.sizes:
            if not _SIZE.match(str(item)) or not 4 <= size_bytes(str(item)) <= MAX_SIZE:
                raise ctx.error("sizes", f"{item!r} is not a message size between 4 bytes and 8G "
                                "(a byte count, or with K, M or G)")
        if s.expected_busbw is not None and (not math.isfinite(s.expected_busbw) or s.expected_busbw <= 0):
            raise ctx.error("expected_busbw", f"must be a positive number of GB/s, got {s.expected_busbw}")
        per_node = max(sp.gpus_per_node, 1)
        sp.world_size = sp.nodes * per_node
        if sp.world_size < 2:
            raise ctx.error("nodes" if s.nodes is not None else "run.nodes",
                            f"an all-reduce test needs at least 2 ranks; {sp.nodes} node(s) x {per_node} rank(s)",
                            hint="use --nodes 2 or more (or a node with several GPUs)")
        if s.pairs and sp.nodes < 2:
            raise ctx.error("pairs", "testing node pairs needs at least 2 nodes")
        return [], []

    def _args(self, plan, sp) -> List[str]:
        s: CommcheckStage = sp.cfg
        args = ["--sizes", ",".join(str(x) for x in s.sizes), "--iters", str(s.iters),
                "--warmup", str(s.warmup),
                "--backend", "nccl" if plan.chain.profile.accelerator == "cuda" else "gloo",
                "--out", str(sp.attempt_dir / "commcheck.json")]
        if s.expected_busbw is not None:
            args += ["--expected", repr(float(s.expected_busbw))]
        if s.pairs:
            args.append("--pairs")
        return args

    def files(self, plan, sp):
        spec = launchers.LaunchSpec(
            launcher="torchrun", program=["-m", self.entry_point], args=self._args(plan, sp),
            nnodes=sp.nodes, nproc_per_node=max(sp.gpus_per_node, 1), world_size=sp.world_size,
            allocation=str(sp.attempt_dir / "allocation"))
        try:
            spec.validate()
        except ConfigError as e:
            raise ConfigError(f"{sp.name}: {e.message}") from None
        return {"launch.json": spec.to_json()}

    def template_vars(self, plan, sp):
        s: CommcheckStage = sp.cfg
        return {"backend": "nccl" if plan.chain.profile.accelerator == "cuda" else "gloo",
                "ranks_per_node": max(sp.gpus_per_node, 1), "expected": s.expected_busbw}


register(Commcheck())
