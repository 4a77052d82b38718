"""``hpcjobs plan``: the memory breakdown of every finetune stage of a planned chain.

Reads the model's ``config.json`` (or a Meta ``params.json``) from the stage's model
directory, or, when that directory is made by an upstream stage (convert's output does not
exist before the chain runs), from that stage's input. Settings come from the stage plan
exactly as ``render`` settles them: world size, ranks per node, the generated (or your own)
DeepSpeed config's ZeRO stage, offload and bucket sizes, precision, micro batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..constraints import _MEM_FACTOR, _MEM_RE
from ..errors import ConfigError
from .estimate import (COMPONENTS, HOST_COMPONENTS, MiB, MemoryPlan, TrainSetup, DEFAULT_ALLGATHER_BUCKET,
                       DEFAULT_PREFETCH_BUCKET, DEFAULT_REDUCE_BUCKET, fmt_bytes, phase_components, plan_memory)
from .params import ModelShape, UnsupportedModel, load_config


def slurm_bytes(size: Optional[str]) -> Optional[int]:
    """A Slurm size (``80G``, ``500M``; no suffix: MiB) in bytes; None for None or ``0``."""
    if size is None:
        return None
    m = _MEM_RE.match(str(size))
    if not m:
        return None
    n = int(int(m.group(1)) * _MEM_FACTOR[(m.group(2) or "m").lower()] * MiB)
    return n or None


@dataclass
class StageMemory:
    stage: str
    config_path: Path
    shape: ModelShape
    plan: MemoryPlan
    gpu_mem: Optional[int]
    host_mem: Optional[int]
    notes: List[str]

    @property
    def gpu_fits(self) -> Optional[bool]:
        return None if self.gpu_mem is None else self.plan.gpu_peak <= self.gpu_mem

    @property
    def host_fits(self) -> Optional[bool]:
        return None if self.host_mem is None else self.plan.host_peak <= self.host_mem

    def to_json(self) -> Dict[str, Any]:
        p, t = self.plan, self.plan.setup
        return {
            "stage": self.stage, "model_config": str(self.config_path), "arch": self.shape.arch,
            "params": self.shape.total, "trainable": t.trainable,
            "setup": {"world_size": t.world_size, "ranks_per_node": t.ranks_per_node, "micro_batch": t.micro_batch,
                      "seq_len": t.seq_len, "precision": t.precision, "zero_stage": t.zero_stage,
                      "offload_optimizer": t.offload_optimizer, "offload_param": t.offload_param,
                      "gradient_checkpointing": t.gradient_checkpointing, "lora_r": t.lora_r,
                      "lora_targets": list(t.lora_targets)},
            "gpu": {"components": p.gpu, "phase": p.gpu_phase, "phases": p.phases, "peak": p.gpu_peak,
                    "capacity": self.gpu_mem, "fits": self.gpu_fits,
                    "headroom": None if self.gpu_mem is None else self.gpu_mem - p.gpu_peak},
            "host_per_node": {"components": p.host, "phase": p.host_phase, "peak": p.host_peak,
                              "capacity": self.host_mem, "fits": self.host_fits,
                              "headroom": None if self.host_mem is None else self.host_mem - p.host_peak},
            "notes": self.notes,
        }


def _model_config(plan, sp) -> Path:
    """The directory holding the model's config.json / params.json for finetune stage ``sp``."""
    model = Path(sp.cfg.model)
    if (model / "config.json").is_file() or (model / "params.json").is_file():
        return model
    for up in plan.stages:   # made by an upstream stage: read what that stage reads
        out, inp = getattr(up.cfg, "output", None), getattr(up.cfg, "input", None)
        if up is not sp and out is not None and inp is not None and Path(out) == model:
            return Path(inp)
    return model


def _num(value: Any, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _device(section: Any) -> str:
    return "cpu" if isinstance(section, dict) and section.get("device") in ("cpu", "nvme") else "none"


def stage_memory(plan, sp) -> StageMemory:
    s = sp.cfg
    src = _model_config(plan, sp)
    try:
        shape, cfg_path = load_config(src)
    except (UnsupportedModel, OSError, ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise ConfigError(f"cannot read the model's configuration for the memory plan: {e}",
                          key=f"{sp.name}.model", hint="point model.source at a directory with config.json "
                          "or params.json") from e
    ds = sp.ds_config or {}
    zero = ds.get("zero_optimization") or {}
    notes: List[str] = []
    targets = list(s.lora.target_modules)
    missing = [t for t in targets if t not in shape.lora_targets_found(targets)]
    if missing:
        notes.append(f"LoRA target(s) {', '.join(missing)} match no {shape.arch} linear layer")
    world = sp.world_size or sp.nodes * max(1, sp.gpus_per_node)
    ranks = max(1, world // max(1, sp.nodes))
    profile = plan.chain.profile
    setup = TrainSetup(
        shape=shape, world_size=world, ranks_per_node=ranks,
        micro_batch=_num(ds.get("train_micro_batch_size_per_gpu"), s.micro_batch_size),
        grad_accum=_num(ds.get("gradient_accumulation_steps"), s.grad_accum),
        seq_len=s.max_seq_length, precision=s.precision if s.precision != "auto" else profile.precision,
        zero_stage=_num(zero.get("stage"), s.zero_stage),
        offload_optimizer=_device(zero.get("offload_optimizer")), offload_param=_device(zero.get("offload_param")),
        gradient_checkpointing=bool(s.gradient_checkpointing),
        lora_r=s.lora.r, lora_targets=targets,
        reduce_bucket_size=_num(zero.get("reduce_bucket_size"), DEFAULT_REDUCE_BUCKET),
        allgather_bucket_size=_num(zero.get("allgather_bucket_size"), DEFAULT_ALLGATHER_BUCKET),
        prefetch_bucket_size=_num(zero.get("stage3_prefetch_bucket_size"), DEFAULT_PREFETCH_BUCKET),
        overlap_comm=bool(zero.get("overlap_comm", True)),
        accelerator=profile.accelerator,
    )
    gpu_mem = slurm_bytes(profile.gpu_mem)
    host_mem = slurm_bytes(sp.mem) or slurm_bytes(profile.mem_per_node)
    if gpu_mem is None:
        notes.append(f"profile {plan.profile} has no gpu_mem: set profile.gpu_mem (e.g. 80G) to compare")
    return StageMemory(sp.name, cfg_path, shape, plan_memory(setup), gpu_mem, host_mem, notes)


def plan_chain(plan) -> List[StageMemory]:
    return [stage_memory(plan, sp) for sp in plan.stages if sp.kind == "finetune"]


def _verdict(peak: int, cap: Optional[int], what: str) -> str:
    if cap is None:
        return f"{what}: {fmt_bytes(peak)} (capacity unknown)"
    room = cap - peak
    if room >= 0:
        return f"{what}: {fmt_bytes(peak)} of {fmt_bytes(cap)}: fits, headroom {fmt_bytes(room)} ({room / cap:.0%})"
    return f"{what}: {fmt_bytes(peak)} of {fmt_bytes(cap)}: DOES NOT FIT, short by {fmt_bytes(-room)}"


def print_report(stages: List[StageMemory], profile: str) -> None:
    from ..display import _console, _table

    con = _console()
    if not stages:
        con.print("no finetune stage in this chain: nothing to plan")
        return
    for sm in stages:
        t, p = sm.plan.setup, sm.plan
        con.print(f"[bold]{sm.stage}[/bold]: {sm.shape.arch}, {sm.shape.total:,} parameters "
                  f"({sm.config_path}), {t.trainable:,} trainable "
                  f"(LoRA r={t.lora_r} on {', '.join(t.lora_targets)})")
        con.print(f"  world size {t.world_size} ({t.ranks_per_node} per node), micro batch {t.micro_batch}, "
                  f"sequence {t.seq_len}, {t.precision}, ZeRO-{t.zero_stage}, offload optimizer "
                  f"{t.offload_optimizer} / params {t.offload_param}, gradient checkpointing "
                  f"{'on' if t.gradient_checkpointing else 'off'}, vocabulary {sm.shape.vocab:,}")
        table = _table("per GPU rank", *p.phases.keys())
        comps = phase_components(t)
        for c in COMPONENTS:
            table.add_row(c, *(fmt_bytes(comps[ph][c]) for ph in p.phases))
        table.add_row("[bold]total[/bold]", *(f"[bold]{fmt_bytes(v)}[/bold]" for v in p.phases.values()))
        con.print(table)
        con.print("  " + _verdict(p.gpu_peak, sm.gpu_mem, f"GPU peak ({p.gpu_phase}) per rank"))
        host = _table("host per node", p.host_phase)
        for c in HOST_COMPONENTS:
            host.add_row(c, fmt_bytes(p.host[c]))
        con.print(host)
        con.print("  " + _verdict(p.host_peak, sm.host_mem, f"host peak ({p.host_phase}) per node"))
        for n in sm.notes:
            con.print(f"  note: {n}")
        con.print("")
