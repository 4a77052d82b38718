"""From a composed configuration to a checked plan: what each stage asks Slurm for.

Pure: reads the input files it must check (hostfile, DeepSpeed JSON) but runs
no Slurm command and writes nothing. Every check here names the key and where
its value came from, so bad input fails before anything is submitted.

``StagePlan.sbatch`` is the single source of a stage's Slurm options: the
``#SBATCH`` lines of its script are rendered from it and nothing else.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import config, constraints, dsconfig, hostspec, schema
from .config import Composed
from .errors import ConfigError

_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_time_seconds(value: str) -> Optional[int]:
    """Seconds in a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``); None if unlimited."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME_RE.match(value.strip())
    if not m:
        raise ValueError(value)
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, s = (nums + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if len(nums) == 1:
        return nums[0] * 60
    if len(nums) == 2:
        return nums[0] * 60 + nums[1]
    return nums[0] * 3600 + nums[1] * 60 + nums[2]


@dataclass
class StagePlan:
    name: str
    kind: str
    index: int                      # 1-based position in the chain
    after: List[str]
    cfg: Any                        # the stage's resolved section (a schema dataclass)
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    mem: Optional[str]
    time: str
    attempt: int
    attempt_dir: Path
    sbatch: Dict[str, Optional[str]] = field(default_factory=dict)
    world_size: Optional[int] = None            # finetune: ranks in total
    pool: Optional[Dict[str, int]] = None       # finetune: a user hostfile's hosts -> slots
    ds_config: Optional[Dict[str, Any]] = None  # finetune: the DeepSpeed config to write
    ds_filter: Optional[tuple] = None           # finetune: ("include"|"exclude", spec) DeepSpeed applies


@dataclass
class ChainPlan:
    chain_id: str
    run_dir: Path
    created: str
    recipe: str
    recipe_path: Path
    profile: str
    overrides: List[str]
    chain: Any                      # the resolved, typed configuration
    stages: List[StagePlan]
    layers: str = ""                # the unresolved layers, as YAML (config.LAYERS_FILE): reruns re-merge them

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def new_chain_id(name: str, now: _dt.datetime) -> str:
    return f"{name}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def stage_dir(run_dir: Path, stage: str, attempt: int) -> Path:
    return run_dir / "stages" / stage / f"attempt-{attempt}"


# Path-valued settings per stage kind, made absolute (jobs run elsewhere; the
# submit directory means nothing on a compute node).
_PATH_KEYS = {
    "convert": ("input", "output"),
    "finetune": ("model", "output", "checkpoints", "hostfile", "deepspeed_config"),
    "merge": ("base", "adapter", "output"),
    "evaluate": ("base", "merged", "prompts", "output"),
}


def _abs(p: Optional[str]) -> Optional[str]:
    if p is None:
        return None
    return str(Path(os.path.expanduser(p)).absolute())


def build(composed: Composed, *, chain_id: Optional[str] = None, run_dir: Optional[Path] = None,
          now: Optional[_dt.datetime] = None, attempts: Optional[Dict[str, int]] = None) -> ChainPlan:
    """Resolve ``composed`` and check it; ``run_dir`` replaces ``run.root/<chain id>`` (``render --out``).

    ``attempts`` gives the attempt number per stage (default 1).
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    cfg = composed.cfg
    name = str(cfg.run.name)
    if not config.NAME_RE.match(name):
        raise composed.error("run.name", f"{name!r} is not a valid chain name: use letters, digits, "
                             "'.', '_' and '-' (at most 64, starting with a letter or digit)")
    chain_id = chain_id or new_chain_id(name, now)
    if run_dir is None:
        run_dir = Path(_abs(str(cfg.run.root))) / chain_id  # type: ignore[arg-type]
    cfg.run.id = chain_id
    cfg.run.dir = str(Path(run_dir).absolute())
    chain = config.resolve(composed)
    constraints.check(composed, chain)  # every choice and range declared in schema.py
    _check_profile(composed, chain.profile)
    if hasattr(chain, "model"):
        chain.model.source = _abs(chain.model.source)
    if hasattr(chain, "data"):
        chain.data.path = _abs(chain.data.path)

    stages: List[StagePlan] = []
    pipeline = chain.pipeline
    for index, (sname, entry) in enumerate(pipeline.items(), start=1):
        section = getattr(chain, sname)
        for key in _PATH_KEYS.get(entry.kind, ()):
            setattr(section, key, _abs(getattr(section, key)))
        attempt = (attempts or {}).get(sname, 1)
        sp = _plan_stage(composed, chain, sname, entry.kind, index, list(entry.after), section,
                         attempt, Path(run_dir))
        stages.append(sp)
    return ChainPlan(chain_id, Path(run_dir).absolute(), now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                     str(chain.recipe.name), composed.recipe.path, composed.profile,
                     composed.overrides, chain, stages, config.snapshot(composed))


def _check_profile(composed: Composed, p: schema.ProfileCfg) -> None:
    # Sets and ranges of single keys are constraints.check's; here what depends on several keys.
    if p.train_gpus_per_node is not None and not 0 < p.train_gpus_per_node <= p.gpus_per_node:
        raise composed.error("profile.train_gpus_per_node",
                             f"must be between 1 and gpus_per_node ({p.gpus_per_node})")
    if p.container.image and p.container.runtime != "apptainer":
        raise composed.error("profile.container.runtime", f"{p.container.runtime!r} is not supported; "
                             "use apptainer (Pyxis/enroot support is not there yet)")
    for k, v in p.env.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(k)):
            raise composed.error(f"profile.env.{k}", "not a valid environment variable name")


def _plan_stage(composed: Composed, chain: Any, name: str, kind: str, index: int, after: List[str],
                s: Any, attempt: int, run_dir: Path) -> StagePlan:
    p: schema.ProfileCfg = chain.profile
    if s.gpus_per_node is not None and s.gpus_per_node > p.gpus_per_node:
        raise composed.error(f"{name}.gpus_per_node",
                             f"asks for {s.gpus_per_node} GPUs per node but profile {p.name} nodes have "
                             f"{p.gpus_per_node}")
    time = s.time or p.time_limit
    try:
        seconds = slurm_time_seconds(time)
    except ValueError:
        raise composed.error(f"{name}.time" if s.time else "profile.time_limit",
                             f"{time!r} is not a Slurm time (MM, HH:MM:SS or D-HH:MM:SS)") from None

    multi = kind == "finetune"
    nodes = s.nodes or (chain.run.nodes if multi else 1)
    if kind == "finetune":
        default_gpus = p.train_gpus_per_node or p.gpus_per_node
    elif kind in ("merge", "evaluate"):
        default_gpus = min(1, p.gpus_per_node)
    else:
        default_gpus = 0
    gpus = s.gpus_per_node if s.gpus_per_node is not None else default_gpus
    if multi:
        cpus = s.cpus_per_task or p.cpus_per_node
        mem = s.mem or p.mem_per_node
    else:
        share = p.cpus_per_node // p.gpus_per_node if p.gpus_per_node else p.cpus_per_node
        cpus = s.cpus_per_task or max(1, min(p.cpus_per_node, share * max(gpus, 1)))
        mem = s.mem
    adir = stage_dir(run_dir, name, attempt)
    sp = StagePlan(name, kind, index, after, s, nodes, gpus, cpus, mem, time, attempt, adir)

    nodelist: List[str] = []
    exclude_nodes: List[str] = []
    if kind == "finetune":
        nodelist, exclude_nodes = _plan_finetune(composed, chain, sp)
    if kind == "command" and not str(s.command).strip():
        raise composed.error(f"{name}.command", "is empty")

    sb: Dict[str, Optional[str]] = {
        "job-name": f"{chain.run.id}.{name}",
        "partition": p.partition,
        "account": p.account,
        "qos": p.qos,
        "reservation": p.reservation,
        "nodes": str(sp.nodes),
        "ntasks-per-node": "1",
        "cpus-per-task": str(sp.cpus_per_task),
        "gpus-per-node": (f"{p.gpu_type}:{sp.gpus_per_node}" if p.gpu_type else str(sp.gpus_per_node))
        if sp.gpus_per_node else None,
        "mem": sp.mem,
        "time": time,
        "nodelist": ",".join(nodelist) or None,
        "exclude": ",".join(exclude_nodes) or None,
        "output": str(adir).replace("%", "%%") + "/slurm-%j.out",  # a filename pattern: %% is a literal %
        "open-mode": "append",
    }
    if kind == "finetune":
        grace = p.signal_grace
        if seconds is not None and grace >= seconds:
            raise composed.error("profile.signal_grace",
                                 f"{grace}s is not shorter than the stage's time limit {time}")
        sb["signal"] = f"B:USR2@{grace}"
        sb["requeue"] = ""
    for extra in (p.sbatch, s.sbatch):
        for k, v in extra.items():
            if not re.match(r"^[a-z][a-z-]*$", str(k)):
                raise composed.error(f"{name}.sbatch.{k}", "not an sbatch long option name")
            sb[str(k)] = None if v is None else str(v)
    sp.sbatch = sb
    return sp


def _plan_finetune(composed: Composed, chain: Any, sp: StagePlan) -> tuple:
    """Resolve who runs where: the allocation, a hostfile, or --include/--exclude specs."""
    s: schema.FinetuneStage = sp.cfg
    p: schema.ProfileCfg = chain.profile
    name = sp.name
    # Sets and ranges of single keys (zero_stage, lr, ...) are constraints.check's; here what
    # depends on several keys.
    precision_from = f"{name}.precision"
    if s.precision == "auto":
        s.precision = p.precision
        precision_from = f"{name}.precision (auto: profile.precision of profile {p.name})"
    if p.accelerator == "cpu" and s.precision == "fp16":
        raise composed.error(f"{name}.precision", "fp16 needs a GPU; use fp32 or bf16 on profile "
                             f"{p.name} (accelerator cpu)")
    if not s.lora.target_modules:
        raise composed.error(f"{name}.lora.target_modules", "needs at least one module name")
    if s.scheduler in schema.SCHEDULERS_NEEDING_EVAL and not s.eval_steps:
        raise composed.error(f"{name}.scheduler", f"{s.scheduler} steps on the evaluation loss, and the "
                             "Trainer refuses it without evaluation",
                             hint=f"set {name}.eval_steps, or use another scheduler")

    if s.offload_param == "cpu" and s.zero_stage != 3:
        raise composed.error(f"{name}.offload_param", f"parameter offload needs zero_stage 3 "
                             f"(zero_stage is {s.zero_stage})")
    if s.offload_optimizer == "cpu" and s.zero_stage == 0:
        raise composed.error(f"{name}.offload_optimizer", "optimizer offload needs zero_stage 1, 2 or 3")

    nodelist, exclude_nodes = _place_ranks(composed, chain, sp)
    world = sp.world_size

    if s.deepspeed_config:
        try:
            ds = dsconfig.load_user_ds_config(s.deepspeed_config)
            dsconfig.check_batch_numbers(ds, micro_batch_per_gpu=s.micro_batch_size,
                                         gradient_accumulation_steps=s.grad_accum, world_size=world,
                                         source=s.deepspeed_config)
            dsconfig.check_against_job(ds, precision=s.precision, precision_from=precision_from,
                                       max_grad_norm=s.max_grad_norm, max_grad_norm_from=f"{name}.max_grad_norm",
                                       source=s.deepspeed_config)
        except ConfigError as e:
            raise composed.error(f"{name}.deepspeed_config", str(e)) from None
    else:
        try:
            ds = dsconfig.build_ds_config(
                zero_stage=s.zero_stage, micro_batch_per_gpu=s.micro_batch_size,
                gradient_accumulation_steps=s.grad_accum, world_size=world, precision=s.precision,
                gradient_clipping=s.max_grad_norm or None, offload_optimizer=s.offload_optimizer,
                offload_param=s.offload_param)
        except ConfigError as e:  # the checks above should make this unreachable
            raise composed.error(f"{name}.zero_stage", e.message) from None
    sp.ds_config = ds
    return nodelist, exclude_nodes


def _place_ranks(composed: Composed, chain: Any, sp: StagePlan) -> tuple:
    """Who runs where: the allocation, a hostfile, or an --include/--exclude spec.

    Sets ``sp.nodes``, ``sp.gpus_per_node``, ``sp.world_size``, ``sp.pool`` and
    ``sp.ds_filter``; returns Slurm's ``--nodelist`` and ``--exclude`` hosts. The
    world size is computed exactly as DeepSpeed will inside the job (same pool,
    same filter), so the DeepSpeed config's batch numbers always agree.
    """
    s: schema.FinetuneStage = sp.cfg
    p: schema.ProfileCfg = chain.profile
    name = sp.name
    spec_key = f"{name}.include" if s.include else f"{name}.exclude"
    nodes_key = f"{name}.nodes" if s.nodes is not None else "run.nodes"
    nodes_explicit = s.nodes is not None or "run.nodes" in composed.origin
    if s.include and s.exclude:
        raise composed.error(f"{name}.include", "include and exclude cannot be used together "
                             "(DeepSpeed takes one filter); pick one")
    nodelist: List[str] = []
    exclude_nodes: List[str] = []
    try:
        if s.hostfile:
            pool = hostspec.read_hostfile(s.hostfile)
            active = hostspec.filter_resources(pool, s.include, s.exclude)
            nodelist = list(active)
            sp.pool = {h: pool[h] for h in active}
            sp.gpus_per_node = max(sp.pool.values())
            sp.ds_filter = ("include", s.include) if s.include else ("exclude", s.exclude) if s.exclude else None
        elif s.include:
            req = hostspec.slurm_request_from_spec(s.include, "", sp.gpus_per_node,
                                                   max_gpus_per_node=p.gpus_per_node)
            nodelist = list(req.nodelist or [])
            sp.gpus_per_node = req.gpus_per_node
            active = hostspec.filter_resources({h: req.gpus_per_node for h in nodelist}, s.include, "")
            sp.ds_filter = ("include", s.include)
        elif s.exclude:
            req = hostspec.slurm_request_from_spec("", s.exclude, sp.gpus_per_node)
            exclude_nodes = list(req.exclude_nodes)
            # Hosts losing only some GPUs must be in the allocation for the exclude to mean
            # anything: ask Slurm for them by name; DeepSpeed sees only that part of the spec.
            partial = {h: slots for h, slots in hostspec.parse_spec(s.exclude, source="--exclude").items()
                       if slots is not None and h not in exclude_nodes}
            nodelist = list(partial)
            if len(nodelist) > sp.nodes:
                raise composed.error(spec_key, f"removes GPUs from {len(nodelist)} hosts but the stage "
                                     f"runs on {sp.nodes} node(s)")
            ds_exclude = hostspec.format_spec(partial)
            sp.ds_filter = ("exclude", ds_exclude) if ds_exclude else None
            pool = {h: sp.gpus_per_node for h in nodelist}
            pool.update({f"(any node {i})": sp.gpus_per_node for i in range(sp.nodes - len(nodelist))})
            active = hostspec.filter_resources(pool, "", ds_exclude) if ds_exclude else \
                {h: list(range(n)) for h, n in pool.items()}
        else:
            sp.ds_filter = None
            active = {f"node{i}": list(range(sp.gpus_per_node)) for i in range(sp.nodes)}
    except ConfigError as e:
        key = f"{name}.hostfile" if s.hostfile and not (s.include or s.exclude) else spec_key
        raise composed.error(key, e.message) from None
    if sp.pool:
        for host, slots in sp.pool.items():
            if slots > p.gpus_per_node:
                raise composed.error(f"{name}.hostfile", f"{host} has slots={slots} but profile "
                                     f"{p.name} nodes have {p.gpus_per_node} GPUs")
    if s.hostfile or s.include:
        if nodes_explicit and sp.nodes != len(nodelist):
            raise composed.error(nodes_key, f"is {sp.nodes} but the {'hostfile' if s.hostfile else 'include spec'} "
                                 f"selects {len(nodelist)} host(s): {', '.join(nodelist)}")
        sp.nodes = len(nodelist)
    if sp.gpus_per_node < 1:
        raise composed.error(f"{name}.gpus_per_node", "a finetune stage needs at least 1 GPU (rank) per node")
    sp.world_size = hostspec.world_size(active)
    return nodelist, exclude_nodes
