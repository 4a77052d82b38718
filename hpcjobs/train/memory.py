"""Measured memory of a training attempt, per rank: ``<attempt dir>/memory_measured.json``.

Written by rank 0 at the end of training and at a time-limit checkpoint (the built-in
``finetune`` job and :class:`hpcjobs.train.callbacks.HpcjobsCallback`), next to the plan's
prediction (``memory_plan.json``); ``hpcjobs status`` and the chain's report show both::

    {"ranks": [{"rank": 0, "host": "node1", "device": "cuda" | "cpu",
                "max_allocated": bytes | null, "max_reserved": bytes | null,
                "model_state_bytes": bytes, "peak_rss": bytes}, ...]}

``max_allocated``/``max_reserved``: ``torch.cuda.max_memory_allocated/reserved`` of the rank's
GPU (null on CPU, where torch keeps no allocator peak). ``peak_rss``: the process's peak resident
set (``getrusage``). ``model_state_bytes``: see :func:`model_state_bytes`.

torch is imported inside the functions: the module itself loads nothing heavy.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

FILE = "memory_measured.json"


def _torch_optimizer(optimizer: Any) -> Any:
    """The innermost ``torch.optim.Optimizer``: accelerate wraps DeepSpeed's ZeRO optimizer
    (not a torch Optimizer itself), which wraps the torch one stepping the fp32 partitions."""
    import torch

    found = None
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, torch.optim.Optimizer):
            found = optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return found


def _tensors(model: Any, optimizer: Any) -> Iterable[Any]:
    if model is not None:
        for p in model.parameters():
            yield p
            yield p.grad
            yield getattr(p, "ds_tensor", None)   # ZeRO-3: this rank's partition (p.data is empty)
    opt = _torch_optimizer(optimizer)
    if opt is not None:
        for group in opt.param_groups:             # under ZeRO: the fp32 master partitions
            for p in group["params"]:
                yield p
                yield p.grad
        for state in opt.state.values():           # exp_avg, exp_avg_sq, step, ...
            if isinstance(state, dict):
                yield from state.values()


def model_state_bytes(model: Any, optimizer: Any) -> int:
    """Bytes of the parameters, gradients and optimizer states this rank holds now.

    Counted from what is allocated, not from shapes: each distinct storage behind the model's
    parameters (frozen base weights included; under ZeRO-1/2 the trainable ones are views into
    DeepSpeed's flat 16-bit buffer, under ZeRO-3 their ``ds_tensor`` partitions), their
    gradients, the innermost torch optimizer's parameters (DeepSpeed's fp32 master partitions)
    with their gradients, and its state tensors, once each (storages are deduplicated by
    device and address, so views and shared tensors count once, and a flat buffer counts
    whole, alignment padding included). Meta tensors and empty storages count nothing.
    """
    import torch

    sizes: Dict[tuple, int] = {}
    for t in _tensors(model, optimizer):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):   # e.g. a tensor subclass without storage
            continue
        ptr = st.data_ptr()
        if ptr:
            key = (str(t.device), ptr)
            sizes[key] = max(sizes.get(key, 0), st.nbytes())
    return sum(sizes.values())


class MemoryProbe:
    """Model-state bytes at their peak: after each optimizer step.

    Under DeepSpeed the whole step (gradient reduction, the optimizer, zeroing the gradients)
    runs inside ``backward``, before any Trainer callback sees it, and the gradient partitions
    are freed right after; a hook on the innermost torch optimizer's step runs while the fp32
    gradient partition, the updated master weights and the (by then created) optimizer states
    all exist. Sampling is a walk over the parameters (no copy, no collective).
    """

    def __init__(self) -> None:
        self.model: Any = None
        self.optimizer: Any = None
        self.peak = 0
        self._handle: Any = None

    def attach(self, model: Any, optimizer: Any) -> None:
        """Call on every rank at ``on_train_begin`` (the optimizer exists from then on)."""
        self.model, self.optimizer = model, optimizer
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        opt = _torch_optimizer(optimizer)
        if opt is not None and hasattr(opt, "register_step_post_hook"):
            self._handle = opt.register_step_post_hook(lambda *_: self.sample())

    def sample(self) -> None:
        try:
            self.peak = max(self.peak, model_state_bytes(self.model, self.optimizer))
        except Exception:  # pragma: no cover - a measurement must never stop training
            pass

    def record(self, rank: int) -> Dict[str, Any]:
        """This rank's entry of memory_measured.json (never raises)."""
        self.sample()   # also covers a run that stopped before its first step
        rec: Dict[str, Any] = {"rank": rank, "host": socket.gethostname(), "device": "cpu",
                               "max_allocated": None, "max_reserved": None,
                               "model_state_bytes": self.peak, "peak_rss": peak_rss()}
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                dev = torch.cuda.current_device()
                rec.update(device="cuda", max_allocated=int(torch.cuda.max_memory_allocated(dev)),
                           max_reserved=int(torch.cuda.max_memory_reserved(dev)))
        except Exception:  # pragma: no cover
            pass
        return rec


def probe_callback(probe: MemoryProbe) -> Any:
    """A TrainerCallback attaching ``probe`` to the Trainer's model and optimizer on every rank."""
    from transformers import TrainerCallback

    class MemoryProbeCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            probe.attach(model, optimizer)

    return MemoryProbeCallback()


def peak_rss() -> int:
    """This process's peak resident set in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def gather_and_write(path: Optional[str], record: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """Every rank's record to rank 0, which writes ``path``. A collective: every rank of the
    process group must call it, at the same point. Returns the records on rank 0."""
    import torch.distributed as dist

    records: List[Any] = [record]
    rank = 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        records = [None] * dist.get_world_size()
        dist.all_gather_object(records, record)
        rank = dist.get_rank()
    if rank != 0:
        return None
    if path:
        out = Path(path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"ranks": sorted(records, key=lambda r: r["rank"])}, indent=2) + "\n")
            os.replace(tmp, out)
        except OSError as e:   # the record is a by-product: never fail the training for it
            sys.stdout.write(f"[hpcjobs] warning: could not write {out}: {e}\n")
            sys.stdout.flush()
    return records
