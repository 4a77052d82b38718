"""The four ways a ``script`` stage starts the user's training program on N nodes.

Used on both sides of ``sbatch`` and therefore standard library only:

* on the login node, the render step builds a :class:`LaunchSpec` and writes it to
  ``launch.json`` in the attempt directory, and (for ``accelerate``) turns the user's
  accelerate YAML into the one the job uses (:func:`accelerate_yaml`);
* inside the job, ``python -m hpcjobs.launch run --spec launch.json`` (one task per
  node) reads the spec back and replaces itself with :func:`node_command`, and
  ``python -m hpcjobs.launch task --spec launch.json`` (one task per rank, the ``srun``
  launcher) with :func:`task_command` and :func:`task_environment`.

Launchers
---------
``deepspeed``
    ``python -u -m deepspeed.launcher.runner --no_ssh --node_rank=R --hostfile=H
    --master_addr=A --master_port=P [--include=S|--exclude=S] [--no_local_rank]
    [--module] PROGRAM ARGS`` on every node. ``--master_addr`` is always given: without
    it DeepSpeed's runner ssh-es to the first host for ``hostname -I`` even with
    ``--no_ssh``. With ``--no_ssh`` the runner starts ``deepspeed.launcher.launch`` for
    this node only; ranks follow hostfile order (filtered by include/exclude).
``torchrun``
    ``python -u -m torch.distributed.run --nnodes=N --nproc-per-node=G --node-rank=R
    --rdzv-backend=static --master-addr=A --master-port=P [--module] PROGRAM ARGS``.
    The static rendezvous keeps global rank = node rank × G + local rank, i.e. the
    allocation order, and needs no etcd or c10d store election.
``accelerate``
    ``python -u -m accelerate.commands.launch --config_file=CFG --num_machines=N
    --num_processes=W --machine_rank=R --main_process_ip=A --main_process_port=P [-m]
    PROGRAM ARGS``. accelerate's command-line flags win over its YAML (top-level keys are
    copied from the YAML only where the flag was not given), so the per-node values live
    on the command line and the YAML holds what is the same everywhere.
``srun``
    No per-node launcher: Slurm starts one task per rank
    (``srun --ntasks-per-node=G python -m hpcjobs.launch task --spec launch.json``) and
    each task execs ``python -u PROGRAM ARGS`` with the torch.distributed environment
    (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``NODE_RANK``/``GROUP_RANK``) taken from Slurm's.

The master port
---------------
:func:`master_port` derives the port from the Slurm job id, so every node computes the
same one without talking to the others: ``10000 + job_id % 20000``, i.e. 10000-29999.
That keeps it below Linux's ephemeral range (``net.ipv4.ip_local_port_range``, 32768-60999
by default), where the kernel picks the source ports of outgoing connections: a
rendezvous port in that range can be taken by some unrelated connection on the master
node, and the job then fails at start with ``address already in use``.

The preemption contract
-----------------------
The job template sets ``HPCJOBS_PREEMPT_FILE`` (a flag file touched when Slurm warns of
the time limit, which is also signalled to the ranks as SIGUSR2); a script that saved a
checkpoint because of it exits with code 75, and the job is requeued. The launchers run
with SIGUSR2 ignored so that only the ranks, which install a handler, act on it.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import ConfigError, HpcjobsError

LAUNCHERS = ("deepspeed", "torchrun", "accelerate", "srun")

#: master ports are PORT_BASE .. PORT_BASE + PORT_SPAN - 1
PORT_BASE = 10000
PORT_SPAN = 20000
#: Linux's default ephemeral port range (net.ipv4.ip_local_port_range)
EPHEMERAL_PORTS = (32768, 60999)

SPEC_VERSION = 1


# --------------------------------------------------------------------------- the master port


def master_port(job_id: int, *, base: int = PORT_BASE, span: int = PORT_SPAN) -> int:
    """The rendezvous port of a job: ``base + job_id % span`` (default 10000-29999).

    Deterministic from the Slurm job id (every node computes the same port) and outside
    the Linux ephemeral range 32768-60999 (see the module docstring). A requeued job
    keeps its id and so its port.
    """
    if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 0:
        raise ValueError(f"job id must be a non-negative integer, got {job_id!r}")
    _check_port_range(base, span)
    return base + job_id % span


def _check_port_range(base: int, span: int, source: Optional[str] = None) -> None:
    for name, value in (("port_base", base), ("port_span", span)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"must be a positive integer, got {value!r}", key=name, source=source)
    last = base + span - 1
    if base < 1024 or last > 65535:
        raise ConfigError(f"master ports {base}-{last} must lie within 1024-65535", key="port_base", source=source)
    lo, hi = EPHEMERAL_PORTS
    if base <= hi and last >= lo:
        raise ConfigError(
            f"master ports {base}-{last} overlap the Linux ephemeral port range {lo}-{hi}, where the "
            "kernel picks source ports for outgoing connections; the rendezvous port could be taken",
            key="port_base",
            source=source,
        )


# --------------------------------------------------------------------------- the spec


@dataclass
class LaunchSpec:
    """What the job needs to start a script stage; written to ``launch.json`` at render time.

    ``program`` is ``["/abs/path/train.py"]`` or ``["-m", "pkg.mod"]``; ``args`` are the
    script's arguments (strings, passed verbatim). ``nnodes`` × ``nproc_per_node`` is the
    number of processes started; ``world_size`` is the number of ranks the batch
    arithmetic was done for (smaller than that product only for ``deepspeed`` with an
    include/exclude filter). ``allocation`` is the file with one allocated host per line
    (``scontrol show hostnames``); its first line is the master address.

    ``hostfile`` and ``ds_filter`` (``("include"|"exclude", spec)``) are for the
    ``deepspeed`` launcher; ``accelerate_config`` (the YAML from :func:`accelerate_yaml`)
    for ``accelerate``. ``deepspeed_config`` is the resolved DeepSpeed JSON hpcjobs wrote,
    if any (informational here: the script gets it through its own arguments or the
    accelerate YAML). ``no_local_rank``: do not append ``--local_rank=N`` to the script's
    arguments (DeepSpeed's runner appends it otherwise); HF/TRL argument parsers accept
    it, plain argparse scripts do not, and every launcher sets ``LOCAL_RANK`` anyway.
    ``env`` is exported to the launcher (and so to every rank) before the exec.
    """

    launcher: str
    program: List[str]
    args: List[str] = field(default_factory=list)
    nnodes: int = 1
    nproc_per_node: int = 1
    world_size: int = 1
    allocation: str = ""
    hostfile: Optional[str] = None
    ds_filter: Optional[Tuple[str, str]] = None
    deepspeed_config: Optional[str] = None
    accelerate_config: Optional[str] = None
    no_local_rank: bool = True
    port_base: int = PORT_BASE
    port_span: int = PORT_SPAN
    env: Dict[str, str] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.ds_filter is not None:
            self.ds_filter = tuple(self.ds_filter)  # JSON gives a list
        self.validate()

    # ----------------------------------------------------------------- checks

    def validate(self, source: Optional[str] = None) -> "LaunchSpec":
        def fail(key: str, message: str) -> ConfigError:
            return ConfigError(message, key=key, source=source)

        if self.launcher not in LAUNCHERS:
            raise fail("launcher", f"must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if not isinstance(self.program, list) or not all(isinstance(p, str) for p in self.program):
            raise fail("program", f"must be a list of strings, got {self.program!r}")
        if len(self.program) == 1:
            if not self.program[0] or self.program[0].startswith("-"):
                raise fail("program", f"must be a script path or ['-m', MODULE], got {self.program!r}")
        elif len(self.program) == 2:
            if self.program[0] != "-m" or not self.program[1] or self.program[1].startswith("-"):
                raise fail("program", f"must be a script path or ['-m', MODULE], got {self.program!r}")
        else:
            raise fail("program", f"must be a script path or ['-m', MODULE], got {self.program!r}")
        if not isinstance(self.args, list) or not all(isinstance(a, str) for a in self.args):
            raise fail("args", f"must be a list of strings, got {self.args!r}")
        for key in ("nnodes", "nproc_per_node", "world_size", "version"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(key, f"must be a positive integer, got {value!r}")
        if self.version != SPEC_VERSION:
            raise fail("version", f"this hpcjobs reads launch spec version {SPEC_VERSION}, got {self.version}")
        started = self.nnodes * self.nproc_per_node
        if self.launcher == "deepspeed" and self.ds_filter:
            if self.world_size > started:
                raise fail("world_size", f"{self.world_size} is more than {self.nnodes} node(s) × "
                                         f"{self.nproc_per_node} = {started}")
        elif self.world_size != started:
            raise fail("world_size", f"{self.world_size} but nnodes ({self.nnodes}) × nproc_per_node "
                                     f"({self.nproc_per_node}) = {started}")
        if not isinstance(self.allocation, str):
            raise fail("allocation", f"must be a path, got {self.allocation!r}")
        for key in ("hostfile", "deepspeed_config", "accelerate_config"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise fail(key, f"must be a path or null, got {value!r}")
        if self.ds_filter is not None:
            if (len(self.ds_filter) != 2 or self.ds_filter[0] not in ("include", "exclude")
                    or not isinstance(self.ds_filter[1], str) or not self.ds_filter[1]):
                raise fail("ds_filter", f'must be null or ["include"|"exclude", SPEC], got {list(self.ds_filter)!r}')
            if self.launcher != "deepspeed":
                raise fail("ds_filter", f"an include/exclude filter needs the deepspeed launcher, not {self.launcher}")
        if self.launcher == "deepspeed" and not self.hostfile:
            raise fail("hostfile", "the deepspeed launcher needs a hostfile (one per job, from the allocation)")
        if self.launcher == "accelerate" and not self.accelerate_config:
            raise fail("accelerate_config", "the accelerate launcher needs its YAML")
        if not isinstance(self.no_local_rank, bool):
            raise fail("no_local_rank", f"must be true or false, got {self.no_local_rank!r}")
        if not isinstance(self.env, dict) or not all(
                isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in self.env.items()):
            raise fail("env", f"must map variable names to strings, got {self.env!r}")
        _check_port_range(self.port_base, self.port_span, source)
        return self

    # ----------------------------------------------------------------- JSON

    def to_json(self) -> str:
        data = asdict(self)
        data["ds_filter"] = list(self.ds_filter) if self.ds_filter else None
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "launch.json") -> "LaunchSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid JSON: {e.msg}", source=source, line=e.lineno) from None
        if not isinstance(data, dict):
            raise ConfigError("a launch spec is a JSON object", source=source)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(unknown)}", source=source)
        missing = [k for k in ("launcher", "program") if k not in data]
        if missing:
            raise ConfigError(f"missing key(s) {', '.join(missing)}", source=source)
        spec = cls.__new__(cls)
        defaults = cls(launcher="torchrun", program=["x"])  # for default values
        for name in known:
            setattr(spec, name, data[name] if name in data else copy.deepcopy(getattr(defaults, name)))
        if isinstance(spec.ds_filter, list):
            spec.ds_filter = tuple(spec.ds_filter)
        return spec.validate(source)

    @classmethod
    def read(cls, path: "str | os.PathLike[str]") -> "LaunchSpec":
        from .userfiles import read_text

        return cls.from_json(read_text(path, "launch spec"), source=os.fspath(path))

    def write(self, path: "str | os.PathLike[str]") -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json())

    @property
    def is_module(self) -> bool:
        return len(self.program) == 2

    @property
    def target(self) -> str:
        """The script path or the module name."""
        return self.program[-1]


# --------------------------------------------------------------------------- commands


def node_command(spec: LaunchSpec, node_rank: int, master_addr: str, master_port: int, python: str) -> List[str]:
    """The argv one node runs (``python`` is the interpreter, argv[0]) for the
    ``deepspeed``, ``torchrun`` and ``accelerate`` launchers; see the module docstring.
    The ``srun`` launcher has no per-node command (:func:`task_command`)."""
    if spec.launcher == "srun":
        raise HpcjobsError("the srun launcher starts one task per rank: use task_command, not node_command")
    if isinstance(node_rank, bool) or not isinstance(node_rank, int) or not 0 <= node_rank < spec.nnodes:
        raise HpcjobsError(f"node rank {node_rank!r} is not in 0..{spec.nnodes - 1}")
    if not master_addr:
        raise HpcjobsError("no master address")
    if isinstance(master_port, bool) or not isinstance(master_port, int) or not 0 < master_port < 65536:
        raise HpcjobsError(f"bad master port {master_port!r}")
    head = [python, "-u", "-m"]
    if spec.launcher == "deepspeed":
        cmd = head + ["deepspeed.launcher.runner", "--no_ssh", f"--node_rank={node_rank}",
                      f"--hostfile={spec.hostfile}", f"--master_addr={master_addr}", f"--master_port={master_port}"]
        if spec.ds_filter:
            cmd.append(f"--{spec.ds_filter[0]}={spec.ds_filter[1]}")
        if spec.no_local_rank:
            cmd.append("--no_local_rank")
        if spec.is_module:
            cmd.append("--module")
    elif spec.launcher == "torchrun":
        cmd = head + ["torch.distributed.run", f"--nnodes={spec.nnodes}", f"--nproc-per-node={spec.nproc_per_node}",
                      f"--node-rank={node_rank}", "--rdzv-backend=static", f"--master-addr={master_addr}",
                      f"--master-port={master_port}"]
        if spec.is_module:
            cmd.append("--module")
    else:  # accelerate
        cmd = head + ["accelerate.commands.launch", f"--config_file={spec.accelerate_config}",
                      f"--num_machines={spec.nnodes}", f"--num_processes={spec.world_size}",
                      f"--machine_rank={node_rank}", f"--main_process_ip={master_addr}",
                      f"--main_process_port={master_port}"]
        if spec.is_module:
            cmd.append("--module")
    return cmd + [spec.target, *spec.args]


def task_command(spec: LaunchSpec, python: str) -> List[str]:
    """The argv of one rank under the ``srun`` launcher: ``python -u PROGRAM ARGS``."""
    return [python, "-u", *spec.program, *spec.args]


def task_environment(spec: LaunchSpec, slurm_env: Mapping[str, str], master_addr: str,
                     master_port: int) -> Dict[str, str]:
    """The torch.distributed variables of one ``srun`` task, from Slurm's.

    ``RANK=$SLURM_PROCID``, ``LOCAL_RANK=$SLURM_LOCALID``, ``WORLD_SIZE=$SLURM_NTASKS``,
    ``LOCAL_WORLD_SIZE`` = nproc_per_node (checked against ``$SLURM_NTASKS_PER_NODE``),
    ``NODE_RANK``/``GROUP_RANK=$SLURM_NODEID``, ``MASTER_ADDR``, ``MASTER_PORT``. Raises
    :class:`HpcjobsError` when Slurm's numbers disagree with the plan.
    """
    def number(name: str) -> int:
        value = slurm_env.get(name)
        if value is None:
            raise HpcjobsError(f"{name} is not set: `hpcjobs.launch task` runs under srun inside the job")
        try:
            return int(value)
        except ValueError:
            raise HpcjobsError(f"{name}={value!r} is not a number") from None

    rank, local, ntasks, node = (number(n) for n in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID"))
    if ntasks != spec.world_size:
        raise HpcjobsError(f"the job step has {ntasks} tasks (SLURM_NTASKS) but the job was planned, and its "
                           f"batch size computed, for world size {spec.world_size}")
    per_node = slurm_env.get("SLURM_NTASKS_PER_NODE", "")
    if per_node.isdigit() and int(per_node) != spec.nproc_per_node:
        raise HpcjobsError(f"the job step runs {per_node} tasks per node (SLURM_NTASKS_PER_NODE) but the job "
                           f"was planned with {spec.nproc_per_node}")
    if not 0 <= local < spec.nproc_per_node:
        raise HpcjobsError(f"SLURM_LOCALID={local} but the job was planned with {spec.nproc_per_node} tasks per node")
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local),
        "WORLD_SIZE": str(ntasks),
        "LOCAL_WORLD_SIZE": str(spec.nproc_per_node),
        "NODE_RANK": str(node),
        "GROUP_RANK": str(node),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


# --------------------------------------------------------------------------- accelerate's YAML

#: keys of an accelerate YAML's ``deepspeed_config`` that accelerate refuses next to a
#: ``deepspeed_config_file`` (``DeepSpeedPlugin._deepspeed_config_checks``), and where
#: each one lives in the DeepSpeed JSON (``DeepSpeedPlugin.__post_init__``'s
#: plugin_to_config_mapping).
ACCELERATE_DS_KEYS: Dict[str, Tuple[str, ...]] = {
    "gradient_accumulation_steps": ("gradient_accumulation_steps",),
    "gradient_clipping": ("gradient_clipping",),
    "zero_stage": ("zero_optimization", "stage"),
    "offload_optimizer_device": ("zero_optimization", "offload_optimizer", "device"),
    "offload_param_device": ("zero_optimization", "offload_param", "device"),
    "offload_optimizer_nvme_path": ("zero_optimization", "offload_optimizer", "nvme_path"),
    "offload_param_nvme_path": ("zero_optimization", "offload_param", "nvme_path"),
    "zero3_save_16bit_model": ("zero_optimization", "stage3_gather_16bit_weights_on_model_save"),
}
#: ``deepspeed_config`` keys hpcjobs sets or that only concern launchers it does not use
_ACCELERATE_DS_REPLACED = ("deepspeed_config_file", "deepspeed_multinode_launcher", "deepspeed_hostfile",
                           "deepspeed_inclusion_filter", "deepspeed_exclusion_filter")
#: per-node values: given on each node's command line, never in the YAML
_ACCELERATE_PER_NODE = ("machine_rank", "main_process_ip", "main_process_port")
ACCELERATE_PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class AccelerateNotes:
    """What :func:`accelerate_yaml` changed besides the plan's numbers.

    ``ds_updates``: nested values to merge into the DeepSpeed JSON (settings moved out of
    the YAML); ``moved``: ``(yaml key, JSON key path, value)`` for each; ``dropped``: YAML
    keys removed without a value reaching the JSON (``"auto"``, per-node values, launcher
    settings hpcjobs replaces); ``messages``: one line per change, for the render output.
    """

    ds_updates: Dict[str, Any] = field(default_factory=dict)
    moved: List[Tuple[str, str, Any]] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    messages: List[str] = field(default_factory=list)


def _set_path(tree: Dict[str, Any], path: Tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _int_value(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def accelerate_uses_deepspeed(user: Optional[Mapping[str, Any]]) -> Tuple[bool, Optional[str]]:
    """Whether a user's accelerate YAML asks for DeepSpeed, and the DeepSpeed JSON it names
    (``deepspeed_config.deepspeed_config_file``) if any: the starting point of the JSON
    hpcjobs resolves and passes back to :func:`accelerate_yaml` as ``deepspeed_config``."""
    if not user:
        return False, None
    ds = user.get("deepspeed_config")
    path = ds.get("deepspeed_config_file") if isinstance(ds, Mapping) else None
    return str(user.get("distributed_type", "")).upper() == "DEEPSPEED", path if isinstance(path, str) else None


def accelerate_yaml(
    user: Optional[Mapping[str, Any]],
    *,
    num_machines: int,
    num_processes: int,
    deepspeed_config: Optional[str],
    mixed_precision: Optional[str],
    source: str = "accelerate config",
) -> Tuple[Dict[str, Any], AccelerateNotes]:
    """The accelerate YAML a script stage runs with, from the user's (or none).

    Sets ``compute_environment: LOCAL_MACHINE``, ``num_machines``, ``num_processes``
    (the total number of ranks), ``rdzv_backend: static``, ``same_network: true`` and
    ``main_training_function: main``; drops ``machine_rank``/``main_process_ip``/
    ``main_process_port`` (given per node on the command line).

    With ``deepspeed_config`` (the path of the DeepSpeed JSON hpcjobs writes):
    ``distributed_type: DEEPSPEED`` and ``deepspeed_config: {deepspeed_config_file: PATH,
    deepspeed_multinode_launcher: standard}`` (each node's accelerate runs torchrun for
    its own ranks). The keys accelerate refuses next to a ``deepspeed_config_file``
    (:data:`ACCELERATE_DS_KEYS` and a top-level ``mixed_precision``) are moved into
    ``notes.ds_updates`` for the caller to merge into the JSON
    (:func:`hpcjobs.scriptbatch.merge_ds_updates`), and dropped from the YAML; a value
    that is not concrete (``gradient_accumulation_steps: auto``) is dropped without
    moving, so it never reaches accelerate. ``zero3_init_flag`` and
    ``deepspeed_moe_layer_cls_names`` stay. ``mixed_precision`` (the stage's: ``no``,
    ``fp16``, ``bf16`` or None) becomes ``bf16.enabled``/``fp16.enabled`` in the JSON.

    Without: the user's ``distributed_type`` (default ``MULTI_GPU`` for more than one
    process, else ``NO``) and ``mixed_precision`` in the YAML; a ``DEEPSPEED`` YAML then is
    an error (hpcjobs always hands DeepSpeed a resolved JSON).

    Refused (:class:`ConfigError` naming the key): a user ``num_machines`` or
    ``num_processes`` that disagrees with the plan or is not a whole multiple,
    a ``mixed_precision`` that disagrees with the stage's, a non-local
    ``compute_environment``, FSDP/Megatron/TPU together with a DeepSpeed JSON.
    """
    notes = AccelerateNotes()
    for name, value in (("num_machines", num_machines), ("num_processes", num_processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"must be a positive integer, got {value!r}", key=name)
    if num_processes % num_machines:
        raise ConfigError(f"{num_processes} processes cannot be split evenly over {num_machines} machines",
                          key="num_processes")
    if user is None:
        user = {}
    if not isinstance(user, Mapping):
        raise ConfigError(f"an accelerate config is a YAML mapping, not a {type(user).__name__}", source=source)
    cfg: Dict[str, Any] = copy.deepcopy(dict(user))

    def fail(key: str, message: str, hint: Optional[str] = None) -> ConfigError:
        return ConfigError(message, key=key, source=source, hint=hint)

    # ---- the plan's numbers
    u_machines, u_procs = cfg.get("num_machines"), cfg.get("num_processes")
    for key, value in (("num_machines", u_machines), ("num_processes", u_procs)):
        if value is not None and _int_value(value) is None:
            raise fail(key, f"must be a positive integer, got {value!r}")
    u_machines = _int_value(u_machines)
    u_procs = _int_value(u_procs)
    if u_procs is not None and u_procs == -1:
        u_procs = None
    if u_machines is not None and u_procs is not None and (u_machines < 1 or u_procs % u_machines):
        raise fail("num_processes", f"{u_procs} is not a multiple of num_machines ({u_machines}): accelerate starts "
                                    "num_processes / num_machines processes on each machine")
    if u_machines is not None and u_machines != num_machines:
        raise fail("num_machines", f"is {u_machines} but the stage runs on {num_machines} node(s)",
                   hint="remove num_machines from the accelerate config; hpcjobs sets it from the stage's nodes")
    if u_procs is not None and u_procs != num_processes:
        raise fail("num_processes", f"is {u_procs} but the stage runs {num_processes} processes "
                                    f"({num_machines} node(s) × {num_processes // num_machines}); "
                                    "num_processes is the total over all machines",
                   hint="remove num_processes from the accelerate config; hpcjobs sets it from the plan")
    env = cfg.get("compute_environment", "LOCAL_MACHINE")
    if str(env) != "LOCAL_MACHINE":
        raise fail("compute_environment", f"is {env!r}; a Slurm job is LOCAL_MACHINE")
    cfg["compute_environment"] = "LOCAL_MACHINE"
    cfg["num_machines"] = num_machines
    cfg["num_processes"] = num_processes
    for key, value in (("rdzv_backend", "static"), ("same_network", True), ("main_training_function", "main")):
        if key in cfg and cfg[key] != value:
            notes.messages.append(f"{key}: {cfg[key]!r} replaced by {value!r}")
        cfg[key] = value
    for key in _ACCELERATE_PER_NODE:
        if key in cfg:
            notes.dropped.append(key)
            notes.messages.append(f"{key}: removed (hpcjobs gives it per node on the command line)")
            del cfg[key]

    # ---- precision: the YAML's (``mixed_precision``, or the old ``fp16: true``) against the stage's
    user_mp = cfg.pop("mixed_precision", None)
    if cfg.get("fp16") is True and user_mp is None:
        user_mp = "fp16"
    if "fp16" in cfg:
        cfg.pop("fp16")
        notes.dropped.append("fp16")
    if user_mp is False:  # YAML 1.1 reads an unquoted `no` as false
        user_mp = "no"
    if user_mp is not None and user_mp not in ACCELERATE_PRECISIONS + ("fp8",):
        raise fail("mixed_precision", f"must be one of no, fp16, bf16, fp8, got {user_mp!r}")
    if mixed_precision is not None and mixed_precision not in ACCELERATE_PRECISIONS:
        raise ConfigError(f"must be one of {', '.join(ACCELERATE_PRECISIONS)}, got {mixed_precision!r}",
                          key="mixed_precision")
    if user_mp is not None and mixed_precision is not None and user_mp != mixed_precision:
        raise fail("mixed_precision", f"is {user_mp} but the stage's precision is {mixed_precision}",
                   hint="set it in one place")
    precision = mixed_precision if mixed_precision is not None else user_mp

    dist = str(cfg.get("distributed_type", "")).upper() or None
    ds_section = cfg.get("deepspeed_config")
    if ds_section is not None and not isinstance(ds_section, Mapping):
        raise fail("deepspeed_config", f"must be a mapping, got {ds_section!r}")
    ds_section = dict(ds_section or {})

    if deepspeed_config is None:
        if dist == "DEEPSPEED":
            raise fail("distributed_type", "is DEEPSPEED but the stage has no DeepSpeed config; hpcjobs hands "
                                           "DeepSpeed a JSON with the batch numbers resolved",
                       hint="give the stage a deepspeed config (or keep deepspeed_config_file in this YAML)")
        cfg["distributed_type"] = dist or ("MULTI_GPU" if num_processes > 1 else "NO")
        if ds_section:
            notes.dropped.append("deepspeed_config")
            notes.messages.append("deepspeed_config: removed (distributed_type is not DEEPSPEED)")
        cfg.pop("deepspeed_config", None)
        if precision is not None:
            cfg["mixed_precision"] = precision
        return cfg, notes

    # ---- DeepSpeed through a JSON file
    if dist not in (None, "DEEPSPEED"):
        raise fail("distributed_type", f"is {dist} but the stage uses a DeepSpeed config",
                   hint="set distributed_type: DEEPSPEED, or give the stage no DeepSpeed config")
    for other in ("fsdp_config", "megatron_lm_config"):
        if cfg.get(other):
            raise fail(other, "cannot be combined with DeepSpeed")
        cfg.pop(other, None)
    cfg["distributed_type"] = "DEEPSPEED"
    if dist == "DEEPSPEED" and not ds_section.get("deepspeed_config_file") and "zero_stage" not in ds_section:
        # The JSON is built from this YAML's settings: keep accelerate's default stage
        # (ACCELERATE_DEEPSPEED_ZERO_STAGE, 2), which it would have used without a file.
        _set_path(notes.ds_updates, ("zero_optimization", "stage"), 2)
        notes.moved.append(("deepspeed_config.zero_stage (accelerate's default)", "zero_optimization.stage", 2))
        notes.messages.append("zero_optimization.stage: 2 (accelerate's default when the YAML names no stage)")
    if precision == "fp8":
        raise fail("mixed_precision", "fp8 with DeepSpeed is not supported by hpcjobs' accelerate launch")
    if precision is not None:
        _set_path(notes.ds_updates, ("bf16", "enabled"), precision == "bf16")
        _set_path(notes.ds_updates, ("fp16", "enabled"), precision == "fp16")
        notes.moved.append(("mixed_precision", "bf16.enabled/fp16.enabled", precision))
        notes.messages.append(f"mixed_precision: {precision} moved to the DeepSpeed config "
                              "(accelerate refuses it next to deepspeed_config_file)")
    for key, path in ACCELERATE_DS_KEYS.items():
        if key not in ds_section:
            continue
        value = ds_section.pop(key)
        dotted = ".".join(path)
        concrete = value is not None and value != "auto" and not (
            key.endswith("nvme_path") and value == "none")
        if key == "gradient_accumulation_steps" and concrete:
            n = _int_value(value)
            if n is None or n < 1:
                concrete = False  # never hand accelerate a non-integer accumulation
            value = n if n is not None else value
        if key == "zero_stage" and concrete:
            n = _int_value(value)
            if n is None or n not in (0, 1, 2, 3):
                raise fail(f"deepspeed_config.{key}", f"must be 0, 1, 2 or 3, got {value!r}")
            value = n
        if concrete:
            _set_path(notes.ds_updates, path, value)
            notes.moved.append((f"deepspeed_config.{key}", dotted, value))
            notes.messages.append(f"deepspeed_config.{key}: {value!r} moved to the DeepSpeed config as {dotted}")
        else:
            notes.dropped.append(f"deepspeed_config.{key}")
            notes.messages.append(f"deepspeed_config.{key}: {value!r} removed (the DeepSpeed config holds "
                                  f"{dotted}; accelerate refuses it next to deepspeed_config_file)")
    for key in _ACCELERATE_DS_REPLACED:
        if key in ds_section and key != "deepspeed_config_file":
            notes.dropped.append(f"deepspeed_config.{key}")
            notes.messages.append(f"deepspeed_config.{key}: removed (hpcjobs starts one accelerate per node)")
        ds_section.pop(key, None)
    ds_section["deepspeed_config_file"] = deepspeed_config
    ds_section["deepspeed_multinode_launcher"] = "standard"
    cfg["deepspeed_config"] = ds_section
    return cfg, notes


def check_ds_json_for_accelerate(ds_json: Mapping[str, Any], source: str = "DeepSpeed config") -> None:
    """accelerate refuses a DeepSpeed JSON without ``zero_optimization``
    ("Please specify the ZeRO optimization config in the DeepSpeed config.")."""
    if not isinstance(ds_json.get("zero_optimization"), Mapping):
        raise ConfigError('accelerate needs a "zero_optimization" section (e.g. {"stage": 0})', source=source)


def dump_yaml(cfg: Mapping[str, Any]) -> str:
    """The YAML text of an accelerate config (PyYAML is a core dependency of hpcjobs)."""
    import yaml

    return yaml.safe_dump(dict(cfg), sort_keys=True, default_flow_style=False)


__all__ = [
    "ACCELERATE_DS_KEYS",
    "AccelerateNotes",
    "LAUNCHERS",
    "LaunchSpec",
    "accelerate_uses_deepspeed",
    "accelerate_yaml",
    "check_ds_json_for_accelerate",
    "dump_yaml",
    "master_port",
    "node_command",
    "task_command",
    "task_environment",
]
