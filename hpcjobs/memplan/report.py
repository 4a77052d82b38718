"""The memory breakdown of every training stage of a planned chain: ``hpcjobs plan``, and the
verdict ``render``/``submit`` show, the refusal of a stage that does not fit, ``--force``.

Reads the model's ``config.json`` (or a Meta ``params.json``) from the stage's model
directory, or, when that directory is made by an upstream stage (convert's output does not
exist before the chain runs), from that stage's input. Settings come from the stage plan
exactly as ``render`` settles them: world size, ranks per node, the generated (or your own)
DeepSpeed config's ZeRO stage, offload and bucket sizes, precision, micro batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..constraints import _MEM_FACTOR, _MEM_RE
from ..errors import ConfigError
from .estimate import (ALL_COMPONENTS, COMPONENTS, HOST_COMPONENTS, MiB, MemoryPlan, TrainSetup, DEFAULT_ALLGATHER_BUCKET,
                       DEFAULT_PREFETCH_BUCKET, DEFAULT_REDUCE_BUCKET, fmt_bytes, phase_components, plan_memory)
from .params import ModelShape, UnsupportedModel, load_config
from .search import Limits, Pick, describe, nearest

DEFAULT_MARGIN = 0.10
"""The planner's margin when profile.gpu_mem_margin is not set: this share of gpu_mem is kept free."""
AUTO_EXTRA = "memory_auto"
"""``StagePlan.extra`` key of the planner's ``auto`` choice (a JSON-able dict)."""


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
    margin: int = 0                         # kept free on the GPU by ``auto`` choices
    auto: Optional[Dict[str, Any]] = None   # the planner's choice: chosen values, why, margin
    enforced: bool = True                   # submit refuses a stage that does not fit (not on a CPU profile)
    label: Optional[str] = None             # what is trained, in the header (None: full finetune / LoRA)
    details: List[str] = field(default_factory=list)   # extra setup lines (GRPO's generation, reference model)
    fixed: Tuple[str, ...] = ()             # search keys the stage has no setting for (refusal hints skip them)

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
                      "lora_targets": list(t.lora_targets),
                      **({"ref_model": t.ref_model, "generation_batch": t.generation_batch,
                          "generation_tokens": t.generation_tokens}
                         if t.ref_model or t.generation_batch else {})},
            "gpu": {"components": p.gpu, "phase": p.gpu_phase, "phases": p.phases, "peak": p.gpu_peak,
                    "capacity": self.gpu_mem, "fits": self.gpu_fits,
                    "headroom": None if self.gpu_mem is None else self.gpu_mem - p.gpu_peak},
            "host_per_node": {"components": p.host, "phase": p.host_phase, "peak": p.host_peak,
                              "capacity": self.host_mem, "fits": self.host_fits,
                              "headroom": None if self.host_mem is None else self.host_mem - p.host_peak},
            "notes": self.notes,
            "auto": self.auto,
        }

    @property
    def refused(self) -> bool:
        """Predicted not to fit where the capacity is real: ``submit`` refuses it without --force."""
        return self.enforced and (self.gpu_fits is False or self.host_fits is False)


def _model_config(chain, name: str, model: str) -> Path:
    """The directory holding the model's config.json / params.json for training stage ``name``."""
    path = Path(model)
    if (path / "config.json").is_file() or (path / "params.json").is_file():
        return path
    for up in chain.pipeline:   # made by an upstream stage: read what that stage reads
        cfg = getattr(chain, up)
        out, inp = getattr(cfg, "output", None), getattr(cfg, "input", None)
        if up != name and out is not None and inp is not None and Path(out) == path:
            return Path(inp)
    return path


def _num(value: Any, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _device(section: Any) -> str:
    return "cpu" if isinstance(section, dict) and section.get("device") in ("cpu", "nvme") else "none"


def load_shape(chain, name: str, model: str) -> Tuple[ModelShape, Path]:
    """The model's shape for stage ``name``; a ConfigError naming ``<name>.model`` when unreadable."""
    src = _model_config(chain, name, model)
    try:
        return load_config(src)
    except (UnsupportedModel, OSError, ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise ConfigError(f"cannot read the model's configuration for the memory plan: {e}",
                          key=f"{name}.model", hint="point model.source at a directory with config.json "
                          "or params.json") from e


def train_setup(chain, s, shape: ModelShape, *, world: int, nodes: int, ds: Optional[Dict[str, Any]]) -> TrainSetup:
    """The TrainSetup of a finetune-like stage: settings ``s`` (concrete values), the DeepSpeed config
    ``ds`` when there is one (its numbers win: it may be the user's own)."""
    ds = ds or {}
    zero = ds.get("zero_optimization") or {}
    profile = chain.profile
    return TrainSetup(
        shape=shape, world_size=world, ranks_per_node=max(1, world // max(1, nodes)),
        micro_batch=_num(ds.get("train_micro_batch_size_per_gpu"), s.micro_batch_size),
        grad_accum=_num(ds.get("gradient_accumulation_steps"), s.grad_accum),
        seq_len=s.max_seq_length, precision=s.precision if s.precision != "auto" else profile.precision,
        zero_stage=_num(zero.get("stage"), s.zero_stage),
        offload_optimizer=_device(zero.get("offload_optimizer")) if ds else s.offload_optimizer,
        offload_param=_device(zero.get("offload_param")) if ds else s.offload_param,
        gradient_checkpointing=bool(s.gradient_checkpointing),
        lora_r=s.lora.r if getattr(s.lora, "enabled", True) else None,   # lora.enabled=false: full finetune
        lora_targets=list(s.lora.target_modules),
        reduce_bucket_size=_num(zero.get("reduce_bucket_size"), DEFAULT_REDUCE_BUCKET),
        allgather_bucket_size=_num(zero.get("allgather_bucket_size"), DEFAULT_ALLGATHER_BUCKET),
        prefetch_bucket_size=_num(zero.get("stage3_prefetch_bucket_size"), DEFAULT_PREFETCH_BUCKET),
        overlap_comm=bool(zero.get("overlap_comm", True)),
        accelerator=profile.accelerator,
    )


def limits(chain, mem: Optional[str]) -> Limits:
    """The profile's GPU memory, the planner's margin on it (profile.gpu_mem_margin, default 10%), and
    the host memory of a node (the stage's --mem, else the profile's mem_per_node)."""
    profile = chain.profile
    gpu = slurm_bytes(profile.gpu_mem)
    margin = slurm_bytes(profile.gpu_mem_margin)
    if margin is None:
        margin = int(gpu * DEFAULT_MARGIN) if gpu is not None else 0
    return Limits(gpu, margin, slurm_bytes(mem) or slurm_bytes(profile.mem_per_node))


def stage_memory(plan, sp) -> StageMemory:
    """The memory plan of a planned finetune-like stage (its ``auto`` values already chosen)."""
    s = sp.cfg
    shape, cfg_path = load_shape(plan.chain, sp.name, s.model)
    notes: List[str] = []
    targets = list(s.lora.target_modules)
    missing = [t for t in targets if t not in shape.lora_targets_found(targets)]
    if missing and getattr(s.lora, "enabled", True):
        notes.append(f"LoRA target(s) {', '.join(missing)} match no {shape.arch} linear layer")
    world = sp.world_size or sp.nodes * max(1, sp.gpus_per_node)
    setup = train_setup(plan.chain, s, shape, world=world, nodes=sp.nodes, ds=sp.ds_config)
    lim = limits(plan.chain, sp.mem)
    if lim.gpu is None:
        notes.append(f"profile {plan.profile} has no gpu_mem: set profile.gpu_mem (e.g. 80G) to compare")
    enforced = plan.chain.profile.accelerator != "cpu"
    if not enforced and lim.gpu is not None:
        notes.append(f"profile {plan.profile} trains on the CPU: its gpu_mem is a stand-in, not enforced")
    return StageMemory(sp.name, cfg_path, shape, plan_memory(setup), lim.gpu, lim.host, notes,
                       margin=lim.margin, auto=sp.extra.get(AUTO_EXTRA), enforced=enforced)


def ds_numbers(ds: Optional[Dict[str, Any]], hidden: int) -> Dict[str, Any]:
    """The ZeRO stage, offload and bucket fields of a TrainSetup from a DeepSpeed JSON as the job's
    DeepSpeed reads it: a number is used; ``"auto"`` is what the HF Trainer fills from the hidden
    size; absent, DeepSpeed's own default (5e8-element buckets, overlap_comm only for ZeRO-3)."""
    zero = (ds or {}).get("zero_optimization") or {}
    stage = _num(zero.get("stage"), 0)

    def pick(key: str, auto: int, default: int) -> int:
        value = zero.get(key)
        return auto if value == "auto" else _num(value, default)

    overlap = zero.get("overlap_comm")
    return dict(zero_stage=stage, offload_optimizer=_device(zero.get("offload_optimizer")),
                offload_param=_device(zero.get("offload_param")),
                reduce_bucket_size=pick("reduce_bucket_size", hidden * hidden, 500_000_000),
                allgather_bucket_size=pick("allgather_bucket_size", 500_000_000, 500_000_000),
                prefetch_bucket_size=pick("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden), 50_000_000),
                persistence_threshold=pick("stage3_param_persistence_threshold", 10 * hidden, 100_000),
                overlap_comm=stage == 3 if not isinstance(overlap, bool) else overlap)


def kind_memory(plan, sp, shape: ModelShape, config_path: Path, setup: TrainSetup, notes: List[str], *,
                label: Optional[str] = None, details: Sequence[str] = (), fixed: Sequence[str] = ()) -> StageMemory:
    """The StageMemory of a kind's own TrainSetup (pretrain, grpo): the profile's capacities, and the
    verdict enforced except on a CPU profile, as for finetune."""
    lim = limits(plan.chain, sp.mem)
    notes = list(notes)
    if lim.gpu is None:
        notes.append(f"profile {plan.profile} has no gpu_mem: set profile.gpu_mem (e.g. 80G) to compare")
    enforced = plan.chain.profile.accelerator != "cpu"
    if not enforced and lim.gpu is not None:
        notes.append(f"profile {plan.profile} trains on the CPU: its gpu_mem is a stand-in, not enforced")
    return StageMemory(sp.name, config_path, shape, plan_memory(setup), lim.gpu, lim.host, notes,
                       margin=lim.margin, auto=None, enforced=enforced, label=label, details=list(details),
                       fixed=tuple(fixed))


def plan_chain(plan, *, strict: bool = True) -> List[StageMemory]:
    """The memory plan of every stage whose kind predicts one (:meth:`StageKind.memory`).

    ``strict=False`` (render, submit): a stage whose prediction is impossible (no readable model
    configuration) is left out instead of raising."""
    from .. import stages

    out: List[StageMemory] = []
    for sp in plan.stages:
        try:
            sm = stages.get(sp.kind).memory(plan, sp)
        except ConfigError:
            if strict:
                raise
            continue
        if sm is not None:
            out.append(sm)
    return out


def _verdict(peak: int, cap: Optional[int], what: str) -> str:
    if cap is None:
        return f"{what}: {fmt_bytes(peak)} (capacity unknown)"
    room = cap - peak
    if room >= 0:
        return f"{what}: {fmt_bytes(peak)} of {fmt_bytes(cap)}: fits, headroom {fmt_bytes(room)} ({room / cap:.0%})"
    return f"{what}: {fmt_bytes(peak)} of {fmt_bytes(cap)}: DOES NOT FIT, short by {fmt_bytes(-room)}"


def _console(stderr: bool):
    from ..display import _PIPE_WIDTH, _console as stdout_console

    if not stderr:
        return stdout_console()
    from rich.console import Console

    con = Console(stderr=True, highlight=False, soft_wrap=False, emoji=False)
    if not con.is_terminal:
        con.width = _PIPE_WIDTH
    return con


def auto_line(sm: StageMemory) -> Optional[str]:
    """The planner's ``auto`` choice and why, in one line; None when nothing was auto."""
    if not sm.auto:
        return None
    line = f"auto chose {describe(sm.auto['chosen'])}: {sm.auto['why']}"
    if sm.auto.get("rejected"):
        line += f"; tried first: {'; '.join(sm.auto['rejected'])}"
    return line


def print_report(stages: List[StageMemory], profile: str, *, stderr: bool = False) -> None:
    from ..display import _table

    con = _console(stderr)
    if not stages:
        con.print("no training stage in this chain: nothing to plan")
        return
    for sm in stages:
        t, p = sm.plan.setup, sm.plan
        what = sm.label or (f"LoRA r={t.lora_r} on {', '.join(t.lora_targets)}" if t.lora_r is not None
                            else "full finetune")
        con.print(f"[bold]{sm.stage}[/bold]: {sm.shape.arch}, {sm.shape.total:,} parameters "
                  f"({sm.config_path}), {t.trainable:,} trainable ({what})", markup=True)
        con.print(f"  world size {t.world_size} ({t.ranks_per_node} per node), micro batch {t.micro_batch}, "
                  f"sequence {t.seq_len}, {t.precision}, ZeRO-{t.zero_stage}, offload optimizer "
                  f"{t.offload_optimizer} / params {t.offload_param}, gradient checkpointing "
                  f"{'on' if t.gradient_checkpointing else 'off'}, vocabulary {sm.shape.vocab:,}")
        for line in sm.details:
            con.print(f"  {line}", markup=False)
        if sm.auto:
            con.print(f"  {auto_line(sm)}", markup=False)
        table = _table("per GPU rank", *p.phases.keys())
        comps = phase_components(t)
        for c in (c for c in ALL_COMPONENTS if c in next(iter(comps.values()))):
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
            con.print(f"  note: {n}", markup=False)
        con.print("")


# ---------------------------------------------------------------- render and submit

def verdict_lines(sm: StageMemory) -> List[str]:
    """The compact verdict render and submit print: peak against capacity, the auto choice, notes."""
    p = sm.plan
    lines = [f"memory {sm.stage}: " + _verdict(p.gpu_peak, sm.gpu_mem, "GPU peak per rank"),
             f"memory {sm.stage}: " + _verdict(p.host_peak, sm.host_mem, "host peak per node")]
    line = auto_line(sm)
    if line:
        lines.append(f"memory {sm.stage}: {line}")
    lines += [f"memory {sm.stage}: note: {n}" for n in sm.notes]
    return lines


def nearest_fits(sm: StageMemory) -> List[Pick]:
    """Setups close to the stage's that the planner predicts to fit (with its margin)."""
    return nearest(sm.plan.setup, Limits(sm.gpu_mem, sm.margin, sm.host_mem), fixed=sm.fixed)


def _shortfall(sm: StageMemory) -> str:
    p, parts = sm.plan, []
    if sm.gpu_fits is False:
        parts.append(f"GPU peak {fmt_bytes(p.gpu_peak)} per rank ({p.gpu_phase}) > {fmt_bytes(sm.gpu_mem or 0)}")
    if sm.host_fits is False:
        parts.append(f"host peak {fmt_bytes(p.host_peak)} per node ({p.host_phase}) > {fmt_bytes(sm.host_mem or 0)}")
    return " and ".join(parts)


def forced_note(sm: StageMemory) -> str:
    """What ``--force`` overrode, for the chain record."""
    return f"--force: predicted not to fit: {_shortfall(sm)}"


def refusal(sm: StageMemory) -> ConfigError:
    """submit's refusal of a stage predicted not to fit: the stage, the shortfall, setups that fit."""
    picks = nearest_fits(sm)
    if picks:
        fits = "; ".join(f"{' '.join(pk.overrides(sm.stage))} (GPU {fmt_bytes(pk.plan.gpu_peak)})" for pk in picks)
        hint = f"setups predicted to fit: {fits}; or --force to submit anyway"
    else:
        hint = "no nearby setup is predicted to fit (more nodes?); --force submits anyway"
    return ConfigError(f"stage {sm.stage} is predicted not to fit: {_shortfall(sm)} (breakdown above; "
                       "`hpcjobs plan` shows it too)", hint=hint)


def check_memory(plan, *, force: bool, warn, only: Optional[set] = None) -> None:
    """Refuse a training stage predicted not to fit (its breakdown on stderr, then the error); with
    ``force``, note it on the stage's plan (``sp.extra["forced"]``, which the record keeps), say so
    through ``warn`` and go on. ``only``: the stages to check (a rerun's)."""
    refused = [sm for sm in plan_chain(plan, strict=False) if sm.refused and (only is None or sm.stage in only)]
    if not refused:
        return
    if not force:
        print_report(refused, plan.profile, stderr=True)
        raise refusal(refused[0])
    for sm in refused:
        plan.stage(sm.stage).extra["forced"] = note = forced_note(sm)
        warn(f"warning: stage {sm.stage}: {note}; submitting anyway")
