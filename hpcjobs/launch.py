"""Job-side helpers for the finetune stage's multi-node DeepSpeed launch.

Runs inside the Slurm job (stdlib + :mod:`hpcjobs.hostspec`; no torch):

``python -m hpcjobs.launch hostfile --allocation FILE --slots N [--requested FILE]
[--include SPEC | --exclude SPEC] --world-size W --out HOSTFILE``
    Writes DeepSpeed's hostfile from the nodes Slurm allocated (``scontrol show
    hostnames``), after checking the allocation against what was planned on the
    login node: the requested hostfile's hosts, the include/exclude spec, and the
    world size the DeepSpeed config's ``train_batch_size`` was computed for.

``python -m hpcjobs.launch node -- RUNNER_ARGS...``
    Started once per node by ``srun --ntasks-per-node=1``. Checks that this node
    is line ``$SLURM_NODEID`` of the hostfile (DeepSpeed numbers nodes by hostfile
    line), then replaces itself with ``python -m deepspeed.launcher.runner --no_ssh
    --node_rank=$SLURM_NODEID RUNNER_ARGS...`` with SIGUSR2 ignored, so that only
    the training ranks (which install a handler) act on the time-limit warning.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

from . import hostspec
from .errors import HpcjobsError


def allocation_pool(hosts: List[str], slots: int, requested: Optional[dict]) -> dict:
    """The DeepSpeed pool for an allocation: every allocated host with ``slots`` GPUs,
    or with the requested hostfile's slots when one was given (then the hosts must match)."""
    if requested is not None:
        missing = [h for h in requested if h not in hosts]
        extra = [h for h in hosts if h not in requested]
        if missing or extra:
            raise HpcjobsError(
                "the Slurm allocation does not match the requested hostfile: "
                + (f"not allocated: {', '.join(missing)}; " if missing else "")
                + (f"allocated but not requested: {', '.join(extra)}" if extra else ""))
        return {h: requested[h] for h in hosts}
    return {h: slots for h in hosts}


def cmd_hostfile(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in Path(args.allocation).read_text().split() if h.strip()]
    if not hosts:
        raise HpcjobsError(f"{args.allocation}: the allocation lists no hosts")
    requested = hostspec.read_hostfile(args.requested) if args.requested else None
    pool = allocation_pool(hosts, args.slots, requested)
    active = hostspec.filter_resources(pool, args.include or "", args.exclude or "",
                                       pool_name="the Slurm allocation")
    world = hostspec.world_size(active)
    if world != args.world_size:
        raise HpcjobsError(
            f"the allocation gives world size {world} ({hostspec.format_spec(active)}) but the job was "
            f"planned, and its DeepSpeed batch size computed, for {args.world_size}")
    Path(args.out).write_text(hostspec.format_hostfile(pool))
    print(f"hpcjobs: hostfile {args.out}: " + ", ".join(f"{h} slots={n}" for h, n in pool.items())
          + f"; active {hostspec.format_spec(active)} (world size {world})", flush=True)
    return 0


def _runner_arg(argv: List[str], name: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def cmd_node(argv: List[str]) -> int:
    # submitit's view of the Slurm job environment (node id, parsed SLURM_JOB_NODELIST).
    from submitit.slurm.slurm import SlurmJobEnvironment

    if "SLURM_NODEID" not in os.environ:
        raise HpcjobsError("SLURM_NODEID is not set: `hpcjobs.launch node` runs under srun inside the job")
    job = SlurmJobEnvironment()
    node_rank = job.node
    node_name = os.environ.get("SLURMD_NODENAME") or job.hostnames[node_rank]
    hostfile = _runner_arg(argv, "hostfile")
    if hostfile:
        hosts = list(hostspec.read_hostfile(hostfile))
        if node_rank >= len(hosts) or hosts[node_rank] != node_name:
            raise HpcjobsError(
                f"node {node_name} has SLURM_NODEID {node_rank}, but line {node_rank + 1} of {hostfile} is "
                f"{hosts[node_rank] if node_rank < len(hosts) else '(missing)'}: DeepSpeed would give this "
                "node another node's ranks")
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--no_ssh",
           f"--node_rank={node_rank}", *argv]
    print(f"hpcjobs: node {node_name or '?'} (node rank {node_rank}): {' '.join(cmd)}", flush=True)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # inherited across exec by the launchers
    os.execv(sys.executable, cmd)
    return 0  # not reached


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["node"]:
            rest = argv[1:]
            if rest[:1] == ["--"]:
                rest = rest[1:]
            return cmd_node(rest)
        parser = argparse.ArgumentParser(prog="python -m hpcjobs.launch")
        sub = parser.add_subparsers(dest="cmd", required=True)
        h = sub.add_parser("hostfile", help="write DeepSpeed's hostfile from the Slurm allocation")
        h.add_argument("--allocation", required=True, help="file with one allocated host per line")
        h.add_argument("--slots", type=int, required=True, help="GPUs per node in the allocation")
        h.add_argument("--requested", help="the hostfile the job was planned with")
        h.add_argument("--include", default="")
        h.add_argument("--exclude", default="")
        h.add_argument("--world-size", type=int, required=True)
        h.add_argument("--out", required=True)
        sub.add_parser("node", help="exec DeepSpeed's runner for this node (under srun)")
        args = parser.parse_args(argv)
        return cmd_hostfile(args)
    except HpcjobsError as e:
        print(f"hpcjobs: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
