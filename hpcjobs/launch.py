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

For the ``script`` stage (the user's own program; see :mod:`hpcjobs.launchers`):

``python -m hpcjobs.launch run --spec launch.json``
    Started once per node by ``srun --ntasks-per-node=1`` (launchers ``deepspeed``,
    ``torchrun``, ``accelerate``). Node rank from ``$SLURM_NODEID``, master address = the
    first line of the allocation file, master port from ``$SLURM_JOB_ID``
    (:func:`hpcjobs.launchers.master_port`); on node rank 0 the port is bound once to
    check it is free. Prints the command, then execs :func:`hpcjobs.launchers.node_command`
    with SIGUSR2 ignored.

``python -m hpcjobs.launch task --spec launch.json``
    Started once per rank by ``srun --ntasks-per-node=G`` (launcher ``srun``). Exports
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``LOCAL_WORLD_SIZE``/``NODE_RANK``/``GROUP_RANK``/
    ``MASTER_ADDR``/``MASTER_PORT`` from Slurm's variables and execs ``python -u PROGRAM
    ARGS`` (SIGUSR2 ignored until the program installs its own handler).

Both pass the rest of the environment through (``HPCJOBS_PREEMPT_FILE`` included: a
script that checkpointed because of it exits 75 and the job requeues itself).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

from . import hostspec, launchers
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


def read_allocation(path: str) -> List[str]:
    """The allocated hosts, one per line (``scontrol show hostnames``), in Slurm's node order."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise HpcjobsError(f"{path}: cannot read the allocation file: {e.strerror or e}") from None
    hosts = [h.strip() for h in text.split() if h.strip()]
    if not hosts:
        raise HpcjobsError(f"{path}: the allocation lists no hosts")
    return hosts


def check_port_free(port: int, host: str = "") -> None:
    """Bind ``port`` once (and close it) to see that the rendezvous can listen on it."""
    import errno
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As the rendezvous listener itself does (torch's TCPStore sets SO_REUSEADDR): a requeued
    # job keeps its id and so its port, and the previous run's connections in TIME_WAIT must
    # not make the probe refuse a port the real listener can take.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        reason = "it is already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise HpcjobsError(
            f"cannot use master port {port} on this node ({socket.gethostname()}): {reason}; the port is "
            "derived from the job id (hpcjobs.launchers.master_port), so a new submission gets another one") from None
    finally:
        sock.close()


def _slurm_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise HpcjobsError(f"{name} is not set: `hpcjobs.launch` runs under srun inside the Slurm job")
    try:
        return int(value)
    except ValueError:
        raise HpcjobsError(f"{name}={value!r} is not a number") from None


def _rendezvous(spec: "launchers.LaunchSpec") -> tuple:
    """(allocation hosts, master address, master port) of this job."""
    hosts = read_allocation(spec.allocation)
    port = launchers.master_port(_slurm_int("SLURM_JOB_ID"), base=spec.port_base, span=spec.port_span)
    return hosts, hosts[0], port


def _exec(cmd: List[str], env_updates: dict) -> None:
    os.environ.update(env_updates)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # inherited across exec; the ranks install a handler
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def cmd_run(spec_path: str) -> int:
    """One node of a script stage: exec the launcher for this node."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    spec = launchers.LaunchSpec.read(spec_path)
    if spec.launcher == "srun":
        raise HpcjobsError(f"{spec_path}: the srun launcher runs `hpcjobs.launch task` once per rank, not `run`")
    _slurm_int("SLURM_NODEID")
    node_rank = SlurmJobEnvironment().node
    hosts, master_addr, port = _rendezvous(spec)
    if len(hosts) != spec.nnodes:
        raise HpcjobsError(f"the allocation has {len(hosts)} node(s) ({', '.join(hosts)}) but the job was planned "
                           f"for {spec.nnodes}")
    if node_rank >= len(hosts):
        raise HpcjobsError(f"SLURM_NODEID {node_rank} but the allocation has {len(hosts)} node(s)")
    node_name = os.environ.get("SLURMD_NODENAME")
    if node_name and hosts[node_rank] != node_name:
        raise HpcjobsError(f"node {node_name} has SLURM_NODEID {node_rank}, but line {node_rank + 1} of "
                           f"{spec.allocation} is {hosts[node_rank]}: ranks would not follow the allocation order")
    if spec.launcher == "deepspeed":
        pool = list(hostspec.read_hostfile(spec.hostfile))
        if pool != hosts:
            raise HpcjobsError(f"{spec.hostfile} lists {', '.join(pool)} but the allocation is {', '.join(hosts)}: "
                               "DeepSpeed numbers nodes by hostfile line")
    if node_rank == 0:
        check_port_free(port)
    cmd = launchers.node_command(spec, node_rank, master_addr, port, sys.executable)
    print(f"hpcjobs: node {hosts[node_rank]} (node rank {node_rank} of {spec.nnodes}, {spec.launcher}, "
          f"master {master_addr}:{port}): {' '.join(cmd)}", flush=True)
    _exec(cmd, spec.env)
    return 0  # not reached


def cmd_task(spec_path: str) -> int:
    """One rank of a script stage under the srun launcher: exec the program with the
    torch.distributed environment."""
    spec = launchers.LaunchSpec.read(spec_path)
    if spec.launcher != "srun":
        raise HpcjobsError(f"{spec_path}: the {spec.launcher} launcher runs `hpcjobs.launch run` once per node, "
                           "not `task`")
    hosts, master_addr, port = _rendezvous(spec)
    if len(hosts) != spec.nnodes:
        raise HpcjobsError(f"the allocation has {len(hosts)} node(s) ({', '.join(hosts)}) but the job was planned "
                           f"for {spec.nnodes}")
    env = launchers.task_environment(spec, os.environ, master_addr, port)
    if env["RANK"] == "0":
        check_port_free(port)
    cmd = launchers.task_command(spec, sys.executable)
    if env["RANK"] == "0":
        print(f"hpcjobs: {spec.world_size} ranks on {spec.nnodes} node(s), master {master_addr}:{port}: "
              f"{' '.join(cmd)}", flush=True)
    _exec(cmd, {**spec.env, **env})
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
        r = sub.add_parser("run", help="script stage: exec this node's launcher (under srun, one task per node)")
        r.add_argument("--spec", required=True, help="launch.json written at render time")
        t = sub.add_parser("task", help="script stage, srun launcher: exec one rank (under srun, one task per rank)")
        t.add_argument("--spec", required=True, help="launch.json written at render time")
        args = parser.parse_args(argv)
        if args.cmd == "run":
            return cmd_run(args.spec)
        if args.cmd == "task":
            return cmd_task(args.spec)
        return cmd_hostfile(args)
    except HpcjobsError as e:
        print(f"hpcjobs: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
