"""Choosing a setup that fits: the ``auto`` values and the "nearest setups" of a refusal.

Stdlib only (login node). A setup is four settings of a finetune stage: gradient checkpointing,
ZeRO stage, optimizer offload, micro batch. The planner tries them in the order a performance
engineer would, fastest first, and takes the first that fits with the margin:

1. gradient checkpointing off, then on (recomputing the forward costs about a third more compute);
2. within that, ZeRO-1, ZeRO-2, ZeRO-2 + optimizer offload, ZeRO-3, ZeRO-3 + optimizer offload
   (DeepSpeed's fastest-to-slowest order: offload steps the optimizer on the CPU);
3. within that, the largest micro batch, powers of two from :data:`MAX_MICRO_BATCH` down to 1.

Settings that are not ``auto`` keep their value and are not searched. "Fits" means the predicted
GPU peak plus the margin is within the GPU's memory, and the host peak within the node's memory
when that is known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .estimate import MemoryPlan, TrainSetup, fmt_bytes, plan_memory

KEYS = ("gradient_checkpointing", "zero_stage", "offload_optimizer", "micro_batch_size")
"""The settings the planner can choose, in the order they are searched (outermost first)."""

LADDER: Tuple[Tuple[int, str], ...] = ((1, "none"), (2, "none"), (2, "cpu"), (3, "none"), (3, "cpu"))
"""(ZeRO stage, optimizer offload), fastest first."""

MAX_MICRO_BATCH = 64
"""The largest micro batch ``auto`` tries: past a few dozen sequences per GPU throughput hardly
grows, and a tiny model would otherwise get an absurd batch; set micro_batch_size for more."""

ORDER = ("gradient checkpointing off before on; ZeRO-1, 2, 2+offload, 3, 3+offload; "
         f"the largest micro batch (powers of 2, at most {MAX_MICRO_BATCH})")


@dataclass
class Limits:
    """What a setup must fit in: bytes per GPU (None: unknown), the margin kept free on it, host bytes
    per node (None: unknown)."""

    gpu: Optional[int]
    margin: int = 0
    host: Optional[int] = None

    def fits(self, p: MemoryPlan) -> bool:
        gpu_ok = self.gpu is None or p.gpu_peak + self.margin <= self.gpu
        return gpu_ok and (self.host is None or p.host_peak <= self.host)


@dataclass
class Pick:
    """A setup the search found: the values of the searched keys and its memory plan."""

    values: Dict[str, object]
    plan: MemoryPlan
    rejected: List[str] = field(default_factory=list)   # the faster setups tried first, and why not

    def overrides(self, stage: str, only: Sequence[str] = KEYS) -> List[str]:
        return [f"{stage}.{k}={_text(self.values[k])}" for k in KEYS if k in self.values and k in only]


def _text(v: object) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def values_of(t: TrainSetup) -> Dict[str, object]:
    return {"gradient_checkpointing": t.gradient_checkpointing, "zero_stage": t.zero_stage,
            "offload_optimizer": t.offload_optimizer, "micro_batch_size": t.micro_batch}


def with_values(t: TrainSetup, values: Dict[str, object]) -> TrainSetup:
    names = {"gradient_checkpointing": "gradient_checkpointing", "zero_stage": "zero_stage",
             "offload_optimizer": "offload_optimizer", "micro_batch_size": "micro_batch"}
    return dataclasses.replace(t, **{names[k]: v for k, v in values.items()})


def _rungs(t: TrainSetup, free: Sequence[str]) -> List[Tuple[int, str]]:
    """The (ZeRO stage, offload) pairs to try, keeping the fixed one of the two."""
    zero_free, off_free = "zero_stage" in free, "offload_optimizer" in free
    rungs = [(z, o) for z, o in LADDER
             if (zero_free or z == t.zero_stage) and (off_free or o == t.offload_optimizer)]
    if not zero_free and not rungs:      # ZeRO-0 fixed: no offload (DeepSpeed refuses it)
        rungs = [(t.zero_stage, "none")] if off_free else [(t.zero_stage, t.offload_optimizer)]
    if t.offload_param == "cpu":         # parameter offload is ZeRO-3's
        rungs = [(z, o) for z, o in rungs if z == 3]
    return rungs


def _micros(t: TrainSetup, free: Sequence[str], cap: int = MAX_MICRO_BATCH) -> List[int]:
    if "micro_batch_size" not in free:
        return [t.micro_batch]
    out, m = [], 1
    while m <= cap:
        out.append(m)
        m *= 2
    return out[::-1]


def search(t: TrainSetup, free: Sequence[str], limits: Limits) -> Optional[Pick]:
    """The first setup in the planner's order that fits, varying only the ``free`` keys; None if none."""
    rejected: List[str] = []
    gcs = [False, True] if "gradient_checkpointing" in free else [t.gradient_checkpointing]
    for gc in gcs:
        for zero, off in _rungs(t, free):
            smallest = None
            for micro in _micros(t, free):
                values = {"gradient_checkpointing": gc, "zero_stage": zero, "offload_optimizer": off,
                          "micro_batch_size": micro}
                p = plan_memory(with_values(t, values))
                if limits.fits(p):
                    return Pick({k: values[k] for k in free}, p, rejected)
                smallest = (micro, p)
            if smallest is not None:
                micro, p = smallest
                at = f", micro batch {micro}" if "micro_batch_size" in free else ""
                rejected.append(f"{_label(gc, zero, off)}{at}: {_short(p, limits)}")
    return None


def _label(gc: bool, zero: int, off: str) -> str:
    return f"ZeRO-{zero}{' + offload' if off == 'cpu' else ''}, checkpointing {'on' if gc else 'off'}"


def _short(p: MemoryPlan, limits: Limits) -> str:
    if limits.gpu is not None and p.gpu_peak + limits.margin > limits.gpu:
        return f"GPU {fmt_bytes(p.gpu_peak)} + margin {fmt_bytes(limits.margin)} > {fmt_bytes(limits.gpu)}"
    return f"host {fmt_bytes(p.host_peak)} > {fmt_bytes(limits.host or 0)}"


def nearest(t: TrainSetup, limits: Limits, fixed: Sequence[str] = ()) -> List[Pick]:
    """Setups close to ``t`` that fit: one change at a time (a smaller micro batch, checkpointing on,
    the next ZeRO rung), then the planner's own choice over every key; ``fixed`` keys never change.
    Duplicates are dropped; at most one pick per kind of change."""
    picks: List[Pick] = []
    tries: List[Sequence[str]] = [("micro_batch_size",), ("gradient_checkpointing",),
                                  ("zero_stage", "offload_optimizer"), KEYS]
    for free in tries:
        free = [k for k in free if k not in fixed]
        if not free:
            continue
        if free == ["micro_batch_size"]:
            pick = _smaller_micro(t, limits)
        else:
            pick = search(t, free, limits)
        if pick is None:
            continue
        changed = {k: v for k, v in pick.values.items() if values_of(t)[k] != v}
        if not changed or any(changed == {k: v for k, v in p.values.items() if values_of(t)[k] != v}
                              for p in picks):
            continue
        picks.append(Pick(changed, pick.plan))
    return picks


def _smaller_micro(t: TrainSetup, limits: Limits) -> Optional[Pick]:
    """The largest micro batch below the current one that fits (every integer: keeping close)."""
    lo, hi = 1, t.micro_batch - 1
    if hi < 1 or not limits.fits(plan_memory(dataclasses.replace(t, micro_batch=1))):
        return None
    while lo < hi:   # memory grows with the micro batch: bisect for the largest that fits
        mid = (lo + hi + 1) // 2
        if limits.fits(plan_memory(dataclasses.replace(t, micro_batch=mid))):
            lo = mid
        else:
            hi = mid - 1
    return Pick({"micro_batch_size": lo}, plan_memory(dataclasses.replace(t, micro_batch=lo)))


def smallest(t: TrainSetup, free: Sequence[str]) -> Pick:
    """The setup with the lowest GPU peak the search can reach (to say how far off it is)."""
    best: Optional[Pick] = None
    gcs = [False, True] if "gradient_checkpointing" in free else [t.gradient_checkpointing]
    for gc in gcs:
        for zero, off in _rungs(t, free):
            values = {"gradient_checkpointing": gc, "zero_stage": zero, "offload_optimizer": off,
                      "micro_batch_size": 1 if "micro_batch_size" in free else t.micro_batch}
            p = plan_memory(with_values(t, values))
            if best is None or p.gpu_peak < best.plan.gpu_peak:
                best = Pick({k: values[k] for k in free}, p)
    assert best is not None
    return best


def describe(values: Dict[str, object]) -> str:
    """``key=value ...`` in search order."""
    return " ".join(f"{k}={_text(values[k])}" for k in KEYS if k in values)
