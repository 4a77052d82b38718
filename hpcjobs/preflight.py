"""Checks of a plan against the world before anything is submitted.

``check_inputs`` reads files only (render runs it too); ``check_cluster`` asks
Slurm (``sinfo``) whether the partition can hold the chain (submit only).
Each failure names the setting and where its value came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Set

from . import stages
from .config import Composed
from .errors import ConfigError, HpcjobsError
from .plan import ChainPlan
from .slurm import Slurm, gres_gpus
from .stages.base import relative_outputs

# Kernel filesystems: nothing a chain writes can live there.
_PSEUDO_FS = ("/proc", "/sys", "/dev")


def _produced_paths(plan: ChainPlan) -> Set[str]:
    """Outputs of the chain's own stages: inputs that will exist once upstream stages ran."""
    return relative_outputs([(stages.get(sp.kind), sp.cfg) for sp in plan.stages])


def run_dir_problem(run_dir: Path) -> Optional[str]:
    """Why ``run_dir`` cannot be created (or written, if it exists); None if it can.

    Looks, without writing anything, at the first part of the path that exists:
    a file in the way, a kernel filesystem (/proc, /sys, /dev), a read-only
    filesystem, or a directory this user may not write.
    """
    path = Path(os.path.abspath(run_dir))
    real = Path(os.path.realpath(path))
    for fs in _PSEUDO_FS:
        if real == Path(fs) or Path(fs) in real.parents:
            if fs == "/dev":
                return (f"{path} is under /dev, which holds device files (and /dev/shm is memory of this "
                        "one node); use a directory on a filesystem every node sees")
            return f"{path} is on {fs}, a kernel filesystem, where no files can be created"
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "a broken symbolic link" if probe.is_symlink() and not probe.exists() else "a file"
        return (f"{probe} is {what}, not a directory" if probe == path else
                f"{probe} is {what}, so {path} cannot be created")
    try:
        readonly = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        readonly = False
    if readonly:
        return f"{probe} is on a read-only filesystem"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe}: permission denied (this user cannot create files there)"
    return None


def run_dir_text_problem(run_dir: Path, *, container: bool = False) -> Optional[str]:
    """Characters of the run directory that sbatch cannot take in ``#SBATCH --output=``; None if fine.

    ``%`` is fine (plan.py writes it as ``%%``); a backslash is not: Slurm drops it
    from the path and then expands no ``%j``, so the log lands somewhere else.
    ``render`` refuses these too, since the scripts it would print are unusable.
    """
    text = str(run_dir)
    if any(c in text for c in "\n\r\0"):
        return f"{text!r} has a line break or NUL in it; sbatch reads its options line by line"
    if "\\" in text:
        return (f"{text} has a backslash, which Slurm removes from the job's log path "
                "(and then replaces no %j either); choose a path without '\\'")
    if '"' in text and any(c.isspace() for c in text):
        return f"{text!r} has both a double quote and a space; an #SBATCH line can quote one, not both"
    if container and any(c in text for c in ":,"):
        return f"{text} has ':' or ',', which apptainer's --bind reads as separators"
    return None


def check_run_dir(plan: ChainPlan, composed: Composed, *, writable: bool = True) -> None:
    """The run directory can be named in sbatch options and (``writable``) created there.

    A ConfigError naming ``run.root`` and where its value came from.
    """
    problem = run_dir_text_problem(plan.run_dir, container=bool(plan.chain.profile.container.image))
    if problem is None and writable:
        problem = run_dir_problem(plan.run_dir)
    if problem:
        raise composed.error("run.root", problem)


def check_inputs(plan: ChainPlan, composed: Composed, only: Optional[Set[str]] = None) -> None:
    """``only``: the stages that will run (a rerun); the others' inputs may be gone by now."""
    check_run_dir(plan, composed)
    produced = _produced_paths(plan)
    chain = plan.chain
    for sp in plan.stages:
        s, name = sp.cfg, sp.name
        if only is not None and name not in only:
            continue
        kind = stages.get(sp.kind)
        for key in kind.input_dirs:
            value = getattr(s, key, None)
            if value and value not in produced and not Path(value).is_dir():
                raise composed.error(f"{name}.{key}", f"{value} does not exist and no earlier stage "
                                     "produces it")
        kind.preflight(plan, sp, composed, produced)
    data_users = [sp for sp in plan.stages if "data" in stages.get(sp.kind).sections
                  and (only is None or sp.name in only)]
    if hasattr(chain, "data") and data_users:
        _check_data(chain.data, composed)


def _check_data(data, composed: Composed) -> None:
    from .datacheck import check_dataset, template_fields  # pyarrow + stdlib only

    try:
        fields = template_fields(data.template)
    except HpcjobsError as e:
        raise composed.error("data.template", e.message) from None
    unknown = [f for f in fields if data.columns and f not in data.columns]
    if unknown:
        raise composed.error("data.template", f"uses {', '.join(unknown)} which data.columns does not list "
                             f"({', '.join(data.columns)})")
    try:
        check_dataset(data.path, list(data.columns) or fields)
    except HpcjobsError as e:
        raise composed.error("data.path", e.message) from None
    if len(data.split) != 3 or abs(sum(data.split) - 1) > 1e-6 or min(data.split) < 0:
        raise composed.error("data.split", f"must be three non-negative fractions (train, eval, test) "
                             f"summing to 1, got {list(data.split)}")


def check_cluster(plan: ChainPlan, composed: Composed, slurm: Slurm, only: Optional[Set[str]] = None) -> None:
    """The partition exists and has the nodes and GPUs each stage asks for."""
    conf = plan.chain.profile.slurm_conf
    if conf and not Path(conf).is_file():
        raise composed.error("profile.slurm_conf", f"{conf} does not exist",
                             hint="for profile local, start the cluster first: hpcjobs devcluster up"
                             if plan.profile == "local" else None)
    partition = plan.chain.profile.partition
    nodes = slurm.partition_nodes(partition)
    where = f"partition {partition}" if partition else "the default partition"
    if not nodes:
        raise composed.error("profile.partition", f"Slurm reports no nodes in {where}")
    for sp in plan.stages:
        if only is not None and sp.name not in only:
            continue
        key = "run.nodes" if stages.get(sp.kind).multi_node and sp.cfg.nodes is None else f"{sp.name}.nodes"
        if sp.nodes > len(nodes):
            raise composed.error(key, f"stage {sp.name} asks for {sp.nodes} nodes but {where} has "
                                 f"{len(nodes)} ({', '.join(sorted(nodes))})")
        wanted = [h for h in (sp.sbatch.get("nodelist") or "").split(",") if h]
        missing = [h for h in wanted if h not in nodes]
        if missing:
            raise composed.error(f"{sp.name}.include" if getattr(sp.cfg, "include", "") else
                                 f"{sp.name}.hostfile", f"{', '.join(missing)} not in {where} "
                                 f"(nodes: {', '.join(sorted(nodes))})")
        if sp.gpus_per_node:
            have = max(gres_gpus(n["gres"]) for n in nodes.values())
            if sp.gpus_per_node > have:
                raise ConfigError(f"stage {sp.name} asks for {sp.gpus_per_node} GPUs per node but nodes of "
                                  f"{where} have at most {have}")
