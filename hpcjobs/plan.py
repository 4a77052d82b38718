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

from . import config, constraints, schema, stages
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
    # Set by kinds that launch ranks (hpcjobs.placement and the kind's plan()):
    world_size: Optional[int] = None            # ranks in total
    pool: Optional[Dict[str, int]] = None       # a user hostfile's hosts -> slots
    ds_config: Optional[Dict[str, Any]] = None  # the DeepSpeed config to write
    ds_filter: Optional[tuple] = None           # ("include"|"exclude", spec) DeepSpeed applies
    extra: Dict[str, Any] = field(default_factory=dict)   # anything else a kind settles for its files


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

    planned: List[StagePlan] = []
    pipeline = chain.pipeline
    for index, (sname, entry) in enumerate(pipeline.items(), start=1):
        section = getattr(chain, sname)
        # Paths made absolute here: jobs run elsewhere, where the submit directory means nothing.
        for key in stages.get(entry.kind).path_keys:
            setattr(section, key, _abs(getattr(section, key)))
        attempt = (attempts or {}).get(sname, 1)
        sp = _plan_stage(composed, chain, sname, entry.kind, index, list(entry.after), section,
                         attempt, Path(run_dir))
        planned.append(sp)
    return ChainPlan(chain_id, Path(run_dir).absolute(), now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                     str(chain.recipe.name), composed.recipe.path, composed.profile,
                     composed.overrides, chain, planned, config.snapshot(composed))


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


def _plan_stage(composed: Composed, chain: Any, name: str, kind_name: str, index: int, after: List[str],
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

    kind = stages.get(kind_name)
    multi = kind.multi_node
    nodes = s.nodes or (chain.run.nodes if multi else 1)
    gpus = s.gpus_per_node if s.gpus_per_node is not None else kind.default_gpus(p)
    if multi:
        cpus = s.cpus_per_task or p.cpus_per_node
        mem = s.mem or p.mem_per_node
    else:
        share = p.cpus_per_node // p.gpus_per_node if p.gpus_per_node else p.cpus_per_node
        cpus = s.cpus_per_task or max(1, min(p.cpus_per_node, share * max(gpus, 1)))
        mem = s.mem
    adir = stage_dir(run_dir, name, attempt)
    sp = StagePlan(name, kind_name, index, after, s, nodes, gpus, cpus, mem, time, attempt, adir)
    ctx = stages.PlanContext(composed, chain, sp, seconds)
    nodelist, exclude_nodes = kind.plan(ctx)

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
    sb.update(kind.sbatch(ctx))
    for extra in (p.sbatch, s.sbatch):
        for k, v in extra.items():
            if not re.match(r"^[a-z][a-z-]*$", str(k)):
                raise composed.error(f"{name}.sbatch.{k}", "not an sbatch long option name")
            sb[str(k)] = None if v is None else str(v)
    sp.sbatch = sb
    return sp
