"""Who runs where, for stages that launch ranks on several nodes (``launch_options`` kinds).

From the allocation, a DeepSpeed hostfile, or an ``--include``/``--exclude`` spec,
decides the nodes Slurm is asked for, GPUs per node and the world size, computed
exactly as DeepSpeed will compute them inside the job (same pool, same filter),
so batch numbers derived from the world size always agree. The stage's settings
need ``hostfile``, ``include``, ``exclude`` and ``nodes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

from . import hostspec, schema
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import Composed
    from .plan import StagePlan


def place_ranks(composed: "Composed", chain: Any, sp: "StagePlan") -> tuple:
    """Who runs where: the allocation, a hostfile, or an --include/--exclude spec.

    Sets ``sp.nodes``, ``sp.gpus_per_node``, ``sp.world_size``, ``sp.pool`` and
    ``sp.ds_filter``; returns Slurm's ``--nodelist`` and ``--exclude`` hosts. The
    world size is computed exactly as DeepSpeed will inside the job (same pool,
    same filter), so the DeepSpeed config's batch numbers always agree.
    """
    s = sp.cfg   # any kind with hostfile/include/exclude settings
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
        raise composed.error(f"{name}.gpus_per_node", "a launched stage needs at least 1 GPU (rank) per node")
    sp.world_size = hostspec.world_size(active)
    return nodelist, exclude_nodes
