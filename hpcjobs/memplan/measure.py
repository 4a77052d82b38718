"""Measuring what the memory planner predicts, inside a training process (imports torch lazily).

Two measurements, used by ``tests/test_memplan_accuracy.py`` and ``bench/bench_memplan_gpu.py``,
and usable in your own job to see where memory goes:

* :func:`model_state_bytes` counts, per rank, the tensor bytes a DeepSpeed engine holds and sorts
  them into the planner's model-state parts (16-bit weights, reduced gradients, the fp32
  gradient of the step, fp32 master weights, Adam's moments, buffers), on the device or
  offloaded. It reads DeepSpeed's own buffers: on the
  CPU accelerator "device" and "host" are the same memory, so what counts as offloaded is decided
  by which buffer a tensor is (the ones ``offload_optimizer`` / ``offload_param`` put on the host),
  not by ``tensor.device``.
* :class:`SavedActivations` sums the bytes autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``), each storage once and parameters left out:
  the planner's "activations" plus the part of "logits/loss" kept for backward (the fp32
  log-softmax of the loss) of one micro batch.

``python -m hpcjobs.memplan.measure --out FILE`` (under torchrun / srun, one process per rank, CPU
or GPU) builds a small Llama from a config, wraps it with ``deepspeed.initialize`` and the config
hpcjobs generates, for ZeRO 1-3 with and without offload, LoRA and full, runs two steps and counts
during the second (end of backward, after the gradient reduction, at each parameter group's
optimizer step, and ZeRO-3's gathered weights around each module's forward); rank 0 writes every
rank's counts as JSON. tests/test_memplan_accuracy.py compares them with the planner.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

__all__ = ["model_state_bytes", "SavedActivations", "CATEGORIES"]

CATEGORIES = ("weights", "gradients", "gradients32", "master", "optimizer", "buffers")

# DeepSpeed attributes (ZeRO 1/2: stage_1_and_2.py, ZeRO-3: stage3.py) -> what they hold.
# Names are matched on the first attribute of the path; anything unknown lands in "buffers".
_ATTR_CATEGORY = {
    "bit16_groups_flat": "weights", "bit16_groups": "weights", "parallel_partitioned_bit16_groups": "weights",
    "round_robin_bit16_groups": "weights", "fp16_groups": "weights", "fp16_partitioned_groups": "weights",
    "fp16_partitioned_groups_flat": "weights", "param_groups_fp16_flat_cpu_memory": "weights",
    "lp_param_buffer": "weights",
    "single_partition_of_fp32_groups": "master", "fp32_partitioned_groups_flat": "master",
    "averaged_gradients": "gradients", "grads_in_partition": "gradients",
    "grad_partitions_flat_buffer": "gradients", "accumulated_grads_in_cpu": "gradients",
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition": "gradients",
}


def _storage(t) -> Tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class _Inventory:
    """Tensor storages seen so far, each counted once under the first category it was found in."""

    def __init__(self):
        self.seen: Dict[int, Tuple[str, str, int]] = {}
        self.pending: List[Tuple[Any, str]] = []     # gradients found while walking, added last

    def add(self, t, category: str, where: str, grads: bool = True) -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.is_meta:
            return
        ptr, n = _storage(t)
        if n and ptr not in self.seen:
            self.seen[ptr] = (category, where, n)
        g = t.grad if t.is_leaf else None
        if g is not None and grads:
            self.add(g, "gradients", where + ".grad")

    def walk(self, obj: Any, category: Optional[str], where: str, depth: int, visited: set) -> None:
        import torch

        if id(obj) in visited or depth > 5:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.add(obj, category or "buffers", where, grads=False)
            if obj.is_leaf and obj.grad is not None:
                self.pending.append((obj.grad, where + ".grad"))
            ds = getattr(obj, "ds_tensor", None)     # ZeRO-3 partition of a parameter
            if ds is not None:
                self.add(ds, "weights", where + ".ds_tensor")
            return
        if isinstance(obj, (torch.nn.Module, str, bytes, int, float, bool, type(None))):
            return
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                self.walk(v, category, f"{where}[{k if isinstance(k, (str, int)) else '.'}]", depth + 1, visited)
        elif isinstance(obj, (list, tuple, set)):
            for i, v in enumerate(obj):
                self.walk(v, category, f"{where}[{i}]", depth + 1, visited)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
            for k, v in list(vars(obj).items()):
                cat = category or _ATTR_CATEGORY.get(k)
                self.walk(v, cat, f"{where}.{k}", depth + 1, visited)


def model_state_bytes(engine) -> Dict[str, Any]:
    """Bytes of one rank's model states in a DeepSpeed engine, by planner category.

    Returns ``{"device": {category: bytes}, "host": {category: bytes}, "detail": [...]}``.
    Categories: ``weights`` (the compute-dtype parameters or, under ZeRO-3, this rank's
    partitions and the persistent small parameters), ``gradients`` (16-bit and fp32 gradient
    buffers and partitions), ``gradients32`` (the fp32 gradient partition the optimizer steps on,
    which ZeRO creates inside its step), ``master`` (fp32 master weights of the trainable parameters),
    ``optimizer`` (the optimizer's per-parameter states: Adam's exp_avg and exp_avg_sq),
    ``buffers`` (anything else DeepSpeed holds: reduction / offload staging buffers).
    Offloaded ("host") are, with ``offload_optimizer``: master weights, optimizer states, the
    fp32 gradient partitions and ZeRO-3's gradient partition buffer; with ``offload_param``:
    ZeRO-3's weight partitions.
    """
    import torch

    inv = _Inventory()
    module = engine.module
    params = list(module.named_parameters())
    for name, p in params:
        inv.add(p, "weights", name, grads=False)
        ds = getattr(p, "ds_tensor", None)
        if ds is not None:
            inv.add(ds, "weights", name + ".ds_tensor")
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    if isinstance(inner, torch.optim.Optimizer):
        for p, state in inner.state.items():
            inv.add(p, "master", "optimizer.param")   # the fp32 partition the optimizer steps on
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.numel() > 1:   # exp_avg, exp_avg_sq (not "step")
                    inv.add(v, "optimizer", f"optimizer.state.{k}")
    inv.walk(opt, None, "optimizer", 0, set())
    # last: a parameter's .grad is often a view into a DeepSpeed buffer (the reduction bucket),
    # which then counts as that buffer
    for name, p in params:
        if p.grad is not None:
            inv.add(p.grad, "gradients", name + ".grad")
    for g, where in inv.pending:
        inv.add(g, "gradients", where)

    zero = engine.zero_optimization_stage()
    off_opt = engine.zero_offload_optimizer() is not None and \
        str(getattr(engine.zero_offload_optimizer(), "device", "none")).endswith("cpu")
    off_par = zero == 3 and engine.zero_offload_param() is not None and \
        str(getattr(engine.zero_offload_param(), "device", "none")).endswith("cpu")
    device = dict.fromkeys(CATEGORIES, 0)
    host = dict.fromkeys(CATEGORIES, 0)
    detail = []
    for cat, where, n in inv.seen.values():
        if cat == "gradients" and where.startswith("optimizer.param") and where.endswith(".grad"):
            cat = "gradients32"
        offloaded = off_opt and (cat in ("master", "optimizer", "gradients32")
                                 or (cat == "gradients" and "grad_partitions_flat_buffer" in where))
        offloaded = offloaded or (off_par and cat == "weights" and ("ds_tensor" in where or "fp16_partitioned" in where
                                                                  or "cpu_memory" in where))
        (host if offloaded else device)[cat] += n
        detail.append((cat, "host" if offloaded else "device", where, n))
    return {"device": device, "host": host, "detail": detail}


def _weight_bytes(engine) -> Dict[str, int]:
    """Parameter bytes only (the ``weights`` of :func:`model_state_bytes`), cheap enough for hooks."""
    inv = _Inventory()
    for name, p in engine.module.named_parameters():
        inv.add(p, "weights", name, grads=False)
        ds = getattr(p, "ds_tensor", None)
        if ds is not None:
            inv.add(ds, "weights", name + ".ds_tensor", grads=False)
    off = engine.zero_optimization_stage() == 3 and engine.zero_offload_param() is not None and \
        str(getattr(engine.zero_offload_param(), "device", "none")).endswith("cpu")
    out = {"device": 0, "host": 0}
    for _, where, n in inv.seen.values():
        out["host" if off and "ds_tensor" in where else "device"] += n
    return out


class SavedActivations:
    """Bytes autograd saves for backward while active: each storage once, parameters excluded.

    ``with SavedActivations(model) as sa: loss = model(**batch).loss`` then ``sa.bytes``.
    A tensor saved for backward stays alive until backward frees it, so the sum of distinct
    storages saved is what the forward leaves behind for backward (inputs / outputs of each op
    that backward needs); parameters (and views of them, e.g. ``weight.t()``) are not activations.
    Under gradient checkpointing only what the checkpointed forward saves is seen; the recompute
    of one block during backward is measured by running that block's forward with the hooks on.
    """

    def __init__(self, model=None, exclude: Iterable = ()):
        params = list(model.parameters()) if model is not None else []
        self._exclude = {_storage(p)[0] for p in list(params) + list(exclude)}
        self._seen: Dict[int, int] = {}
        self._ctx = None

    def _pack(self, t):
        ptr, n = _storage(t)
        if ptr and ptr not in self._exclude:
            self._seen[ptr] = max(self._seen.get(ptr, 0), n)
        return t

    def __enter__(self):
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


# ------------------------------------------------------------------ the multi-rank measurement

def tiny_llama_config(**over):
    """A small Llama whose block linears straddle ZeRO-3's persistence threshold (1e5 elements)."""
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
           "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 512, "tie_word_embeddings": False,
           "max_position_embeddings": 256}
    cfg.update(over)
    return cfg


ALL_SETUPS = ((1, "none", "none"), (1, "cpu", "none"), (2, "none", "none"), (2, "cpu", "none"),
              (3, "none", "none"), (3, "cpu", "none"), (3, "cpu", "cpu"))
CORE_SETUPS = ((2, "none", "none"), (3, "cpu", "cpu"))


def _cases(spec: str) -> List[Dict[str, Any]]:
    """``fp32`` (every ZeRO / offload setup) or ``bf16:core`` (ZeRO-2, ZeRO-3 with both offloads)."""
    precision, _, which = spec.partition(":")
    out = []
    for lora in (False, True):
        for stage, oo, op in (CORE_SETUPS if which == "core" else ALL_SETUPS):
            out.append({"zero_stage": stage, "offload_optimizer": oo, "offload_param": op, "lora": lora,
                        "precision": precision})
    return out


LORA_TARGETS = ["q_proj", "v_proj"]
LORA_R = 8


def _build(case: Dict[str, Any], cfg: Dict[str, Any]):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case["precision"]]
    c = dict(cfg)
    config = AutoConfig.for_model(c.pop("model_type"), **c)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)   # as finetune's from_pretrained(dtype=...)
    model.config.use_cache = False
    if case["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    return model


def _optimizer(model):
    """The HF Trainer's AdamW: weight decay on all but biases and norms (two groups)."""
    import torch

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4)


def measure_case(case: Dict[str, Any], cfg: Dict[str, Any], world: int, seq: int = 16, micro: int = 1):
    """One ZeRO setup: two train steps; counts at the second step's optimizer step and after backward."""
    import deepspeed
    import torch

    from hpcjobs.dsconfig import build_ds_config

    ds_cfg = build_ds_config(precision=case["precision"], zero_stage=case["zero_stage"],
                             offload_optimizer=case["offload_optimizer"], offload_param=case["offload_param"],
                             micro_batch_per_gpu=micro, gradient_accumulation_steps=1, world_size=world,
                             gradient_clipping=1.0)
    model = _build(case, cfg)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=_optimizer(model), config=ds_cfg)
    snaps: Dict[str, Any] = {}
    inner = getattr(opt, "optimizer", opt)
    orig_step, orig_reduce = inner.step, engine.allreduce_gradients
    counting = [False]

    def step_and_count(*a, **kw):    # inside DeepSpeed's step, once per parameter group
        if counting[0]:
            snaps[f"step{len([k for k in snaps if k.startswith('step')])}"] = model_state_bytes(engine)
        return orig_step(*a, **kw)

    def reduce_and_count(*a, **kw):  # end of backward, before DeepSpeed's final gradient reduction
        if counting[0]:
            snaps["backward"] = model_state_bytes(engine)
        return orig_reduce(*a, **kw)

    inner.step, engine.allreduce_gradients = step_and_count, reduce_and_count
    # the full-size gradient autograd produces for one parameter before DeepSpeed copies it into
    # the reduction bucket (ZeRO-3's gathered gradient): transient, so seen by a tensor hook
    largest_grad = [0]

    def seen(g):
        if counting[0]:
            largest_grad[0] = max(largest_grad[0], g.numel() * g.element_size())
        return None

    hooks = [p.register_hook(seen) for p in engine.module.parameters() if p.requires_grad]
    # ZeRO-3 gathers each module's parameters around its forward: the weights at their peak
    # (partitions + persistent tensors + what is gathered) are counted inside every module
    fwd_weights = {"device": 0, "host": 0}

    def weights_now(module, args):
        if counting[0]:
            for loc, n in _weight_bytes(engine).items():
                fwd_weights[loc] = max(fwd_weights[loc], n)

    if case["zero_stage"] == 3:
        hooks += [m.register_forward_pre_hook(weights_now) for m in engine.module.modules()]
    gen = torch.Generator().manual_seed(1)
    dev = engine.device
    for it in range(2):
        counting[0] = it == 1          # the second step: optimizer states exist from the first
        ids = torch.randint(0, cfg["vocab_size"], (micro, seq), generator=gen).to(dev)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        if counting[0]:
            snaps["reduced"] = model_state_bytes(engine)
        engine.step()
    inner.step, engine.allreduce_gradients = orig_step, orig_reduce
    for h in hooks:
        h.remove()
    snaps["largest_grad"] = largest_grad[0]
    snaps["forward"] = {loc: dict(dict.fromkeys(CATEGORIES, 0), weights=n) for loc, n in fwd_weights.items()}
    if not os.environ.get("HPCJOBS_MEASURE_DETAIL"):
        for s in snaps.values():
            if isinstance(s, dict):
                s.pop("detail", None)
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                    for p in engine.module.parameters() if p.requires_grad)
    del engine, opt, model
    import gc

    gc.collect()
    return {"case": case, "trainable": trainable, **snaps}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file rank 0 writes")
    ap.add_argument("--precision", default="fp32,bf16",
                    help="comma-separated fp32, bf16; PRECISION:core runs only ZeRO-2 and ZeRO-3 with both offloads")
    ap.add_argument("--only", default=None, help="run only case indices (comma-separated)")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl",
                               auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_llama_config()
    cases = [c for p in args.precision.split(",") for c in _cases(p)]
    if args.only:
        cases = [cases[int(i)] for i in args.only.split(",")]
    results = []
    import time

    for case in cases:
        t0 = time.monotonic()
        r = measure_case(case, cfg, world)
        everyone = [None] * world
        dist.all_gather_object(everyone, r)
        results.append({"case": case, "trainable": r["trainable"], "ranks": [
            {k: v for k, v in e.items() if k not in ("case", "trainable")} for e in everyone]})
        if rank == 0:
            print(f"measured {case} in {time.monotonic() - t0:.1f}s", flush=True)
    if rank == 0:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"world_size": world, "model": cfg, "lora_r": LORA_R, "lora_targets": LORA_TARGETS,
                       "results": results}, fh)
        os.replace(tmp, args.out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if __name__ == "__main__":
    sys.exit(main())
