"""A private, real Slurm cluster on this machine: the "devcluster".

slurmctld, two compute nodes (``node1``, ``node2``; one ``slurmd`` each, 4 fake
GPUs each), slurmdbd with a private MariaDB (so ``sacct`` works) and munge.
Everything lives under one root directory::

    <root>/etc/    slurm.conf gres.conf slurmdbd.conf hosts munge.key ...
    <root>/log/    one log per daemon (<name>.log) plus its stderr (<name>.stderr)
    <root>/run/    sockets and the pid files the daemons write themselves
    <root>/var/    MariaDB datadir, slurmctld state, slurmd spool dirs
    <root>/dev/    nvidia0..3, character devices standing in for GPUs
    <root>/state/  cluster.json (ports, DB password), pids/<daemon>.json

``up`` is idempotent and restarts whatever is missing; ``down`` stops exactly
the processes recorded in ``state/pids`` (checked by pid *and* start time, so
a recycled pid is never signalled) plus whatever still runs inside a node's
private UTS namespace (job steps).  Nothing is ever killed by name.

Each slurmd runs under ``unshare --uts --mount`` with its own hostname and a
private /etc/hosts, so inside jobs ``hostname`` prints node1/node2 and the
node names resolve (outside jobs they do not).

Needs root and Debian's packages (``scripts/install-system-deps.sh``).
Standard library only: imported on the login-node path.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from hpcjobs import devcluster_conf as conf
from hpcjobs import paths
from hpcjobs.errors import HpcjobsError

__all__ = ["DAEMONS", "DevCluster", "default_root", "last_root_file", "main"]

NODES = conf.NODES
#: start order; ``down`` stops in reverse.
DAEMONS = ("munged", "mariadb", "slurmdbd", "slurmctld") + tuple(f"slurmd-{n}" for n in NODES)
SLURMD_TIMEOUT = 10
MESSAGE_TIMEOUT = 5

_REQUIRED = {
    # binary: Debian package
    "munged": "munge",
    "mariadbd": "mariadb-server-core",
    "mariadb-install-db": "mariadb-server-core",
    "my_print_defaults": "mariadb-client-core",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "slurmdbd": "slurmdbd",
    "sbatch": "slurm-client",
    "sinfo": "slurm-client",
    "sacct": "slurm-client",
    "sdiag": "slurm-client",
    "scontrol": "slurm-client",
    "squeue": "slurm-client",
    "scancel": "slurm-client",
    "unshare": "util-linux",
    "mount": "mount",
    "hostname": "hostname",
}
_MYSQL_PLUGIN = "accounting_storage_mysql.so"
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


def last_root_file() -> Path:
    """Where ``up`` records the root it started, for commands run without ``$HPCJOBS_DEVCLUSTER``."""
    return paths.state_dir() / "devcluster.last"


def default_root() -> Path:
    """``$HPCJOBS_DEVCLUSTER`` if set; else the root the last ``up`` started, while it
    still exists; else ``$XDG_STATE_HOME/hpcjobs/devcluster``.

    ``make demo`` starts the cluster under the checkout (``.devcluster``); remembering
    it lets a plain ``hpcjobs submit --profile local`` typed afterwards reach that
    cluster instead of asking for a second one.
    """
    env = os.environ.get("HPCJOBS_DEVCLUSTER")
    if env:
        return Path(env).expanduser()
    try:
        last = Path(last_root_file().read_text().strip())
    except (OSError, ValueError):
        last = None
    if last and last.is_absolute() and (last / "state" / "cluster.json").is_file():
        return last
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg).expanduser() / "hpcjobs" / "devcluster"


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _alive(pid: int | None, starttime: int | None = None) -> bool:
    """Running (not a zombie) and, if given, started at ``starttime`` (so not a recycled pid)."""
    if not pid:
        return False
    st = _proc_stat(pid)
    if st is None or st[0] in "ZXx":
        return False
    return starttime is None or st[1] == starttime


def _reap(pid: int) -> None:
    """Collect a zombie child of ours (daemons started by this process)."""
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(Exception):
            child.wait(timeout=0.5)
        if child.returncode is None:
            _CHILDREN[pid] = child


def _uts_ns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return port not in _listening_ports()


def _pick_ports(n: int) -> list[int]:
    """n distinct free ports below the ephemeral range (so outgoing connections don't take them)
    and above the training jobs' rendezvous ports (hpcjobs.launchers.master_port: 10000-29999,
    from the job id): a slurmctld on 20338 made job 338's rendezvous fail to listen."""
    rng = random.Random()
    chosen: list[int] = []
    while len(chosen) < n:
        port = rng.randrange(30000, 32700)
        if port not in chosen and _port_bindable(port):
            chosen.append(port)
    return chosen


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


#: Popen objects of daemons this process started, so they can be reaped when stopped.
_CHILDREN: dict[int, subprocess.Popen] = {}


# --------------------------------------------------------------------------- cluster


class DevCluster:
    """A local Slurm cluster rooted at ``root`` (default: :func:`default_root`)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root if root is not None else default_root()).expanduser().absolute()

    # ---- paths ----------------------------------------------------------------------

    @property
    def slurm_conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def var(self) -> Path:
        return self.root / "var"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def munge_socket(self) -> Path:
        return self.run_dir / "munge.sock"

    @property
    def mariadb_socket(self) -> Path:
        return self.run_dir / "mariadb.sock"

    def _pid_file(self, daemon: str) -> Path:
        return self.state_dir / "pids" / f"{daemon}.json"

    def log_file(self, daemon: str) -> Path:
        """The daemon's own log file."""
        return self.log_dir / f"{daemon}.log"

    # ---- public API -----------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment a Slurm client (sbatch, squeue, sacct, ...) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.slurm_conf)}

    def up(self, timeout: float = 90) -> None:
        """Start whatever is not running and wait until the cluster is ready.

        Ready: both nodes usable (IDLE when no jobs run), slurmctld's first
        scheduling pass done, sacct answers.  A no-op when already up.
        It then becomes the cluster plain commands use (see :func:`default_root`).
        """
        _check_system()
        deadline = time.monotonic() + timeout
        with self._locked():
            self._prepare()
            stale = [d for d in DAEMONS if self._running(d) and self._config_stale(d)]
            if stale:  # config changed (e.g. hpcjobs upgraded): restart what reads it
                self._stop_many([d for d in stale if d.startswith("slurmd-")])
                self._stop_many([d for d in stale if not d.startswith("slurmd-")])
            for daemon in DAEMONS:
                if not self._running(daemon):
                    _reap((self._record(daemon) or {}).get("pid") or 0)
                    self._start(daemon, deadline)
            self._wait_ready(deadline)
        self._remember()

    def _remember(self) -> None:
        """Record this root as the one plain commands use (see :func:`default_root`)."""
        f = last_root_file()
        with contextlib.suppress(OSError):  # a read-only home only loses the convenience
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
            tmp.write_text(f"{self.root}\n")
            tmp.replace(f)

    def down(self) -> None:
        """Cancel all jobs, then stop every daemon ``up`` started (and job steps left on the nodes)."""
        if not self.state_dir.is_dir():
            return
        with self._locked():
            if self._running("slurmctld") and self.slurm_conf.exists():
                self._cancel_all_jobs()
            slurmds = [d for d in DAEMONS if d.startswith("slurmd-")]
            # job steps first (slurmd's shutdown waits for steps it is terminating)
            keep = {rec["pid"] for rec in map(self._record, slurmds) if rec and rec.get("pid")}
            self._kill_node_namespaces(exclude=keep, forget=False)
            # slurmds before slurmctld: at shutdown they report finished epilogs to it
            self._stop_many(slurmds)
            self._kill_node_namespaces()
            self._stop_many(["slurmctld"])
            self._stop_many(["slurmdbd"])
            self._stop_many(["mariadb", "munged"])

    def status(self) -> dict:
        daemons = {}
        for daemon in DAEMONS:
            rec = self._record(daemon)
            pid = rec.get("pid") if rec else None
            daemons[daemon] = {"pid": pid, "running": bool(rec) and _alive(pid, rec.get("starttime"))}
        nodes: dict = {}
        if daemons["slurmctld"]["running"] and daemons["munged"]["running"]:
            nodes = self._nodes()
        ready = (
            all(d["running"] for d in daemons.values())
            and set(nodes) == set(NODES)
            and all(n["usable"] for n in nodes.values())
        )
        return {
            "root": str(self.root),
            "ready": ready,
            "slurm_conf": str(self.slurm_conf),
            "node_namespaces": all(bool((self._record(f"slurmd-{n}") or {}).get("uts_ns")) for n in NODES),
            "daemons": daemons,
            "nodes": nodes,
        }

    def stop(self, daemon: str) -> None:
        """Stop one daemon: SIGTERM, SIGKILL after 15 s (5 s for a slurmd).  Running jobs are left alone."""
        self._check_name(daemon)
        with self._locked():
            self._stop_many([daemon])

    def start(self, daemon: str, timeout: float = 60) -> None:
        """Start one daemon again and wait until it serves (a slurmd: until its node is back)."""
        self._check_name(daemon)
        _check_system()
        deadline = time.monotonic() + timeout
        with self._locked():
            self._prepare()
            if not self._running(daemon):
                self._start(daemon, deadline)
            if daemon.startswith("slurmd-") and self._running("slurmctld"):
                node = daemon.split("-", 1)[1]
                self._wait(
                    lambda: self._nodes().get(node, {}).get("usable", False),
                    deadline,
                    f"node {node} to return to service",
                    lambda: self._node_diagnostics(),
                )

    def power_off(self, node: str) -> None:
        """Fault injection: ``node`` dies. Its slurmd and every process of its jobs (all of its
        private namespace) get SIGKILL; ``start("slurmd-NODE")`` brings it back."""
        daemon = f"slurmd-{node}"
        self._check_name(daemon)
        ns = (self._record(daemon) or {}).get("uts_ns")
        self.kill(daemon)
        if not ns:
            return
        for _ in range(50):
            victims = [int(p.name) for p in Path("/proc").iterdir()
                       if p.name.isdigit() and _uts_ns(p.name) == ns and _alive(int(p.name))]
            if not victims:
                break
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def power_on(self, node: str, timeout: float = 150) -> None:
        """Bring a node killed by :meth:`power_off` back, as a reboot would.

        A real reboot takes minutes; restarting slurmd at once is not the same thing. RPCs
        slurmctld sent to the dead node before it was marked DOWN (e.g. the signal that ends
        the failed job step) sit in its retry list and are re-sent RPC_RETRY_INTERVAL (60 s)
        later. A job requeued after the failure keeps its job and step ids, so a stale
        "signal step N.0" delivered to a node that is already back kills the *new* run of
        the step. After a real reboot that retry reaches a DOWN node and is dropped; here we
        wait until slurmctld has no RPC pending for the node (``sdiag``) before starting it.
        """
        daemon = f"slurmd-{node}"
        self._check_name(daemon)
        deadline = time.monotonic() + timeout
        self._wait(lambda: not self._pending_rpcs(node), deadline,
                   f"slurmctld to drop the RPCs pending for {node}",
                   lambda: self._slurm("sdiag", timeout=5).stdout[-2000:])
        self.start(daemon, timeout=max(10.0, deadline - time.monotonic()))

    def _pending_rpcs(self, node: str) -> list[str]:
        """The RPCs slurmctld holds for ``node`` in its retry queue (sdiag's "Pending RPCs")."""
        r = self._slurm("sdiag", timeout=5)
        if r.returncode != 0:
            return ["sdiag failed: " + r.stderr.strip()]
        if "\nPending RPCs" not in r.stdout:     # "No pending RPCs", or only statistics
            return []
        pending = []
        # lines "\t 1: REQUEST_TERMINATE_JOB    node[1-2]"; a ranged hostlist counts as ours
        for line in r.stdout.split("\nPending RPCs", 1)[1].splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and parts[0].rstrip(":").isdigit() and (
                    node in parts[2].split(",") or "[" in parts[2]):
                pending.append(line.strip())
        return pending

    def kill(self, daemon: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a daemon, no cleanup, no waiting (fault injection)."""
        self._check_name(daemon)
        rec = self._record(daemon)
        if rec and _alive(rec["pid"], rec.get("starttime")):
            os.kill(rec["pid"], sig)

    # ---- internals: state -----------------------------------------------------------

    @staticmethod
    def _check_name(daemon: str) -> None:
        if daemon not in DAEMONS:
            raise HpcjobsError(f"unknown devcluster daemon {daemon!r}; known: {', '.join(DAEMONS)}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _record(self, daemon: str) -> dict | None:
        try:
            return json.loads(self._pid_file(daemon).read_text())
        except (OSError, ValueError):
            return None

    def _write_record(self, daemon: str, rec: dict) -> None:
        path = self._pid_file(daemon)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(path)

    def _running(self, daemon: str) -> bool:
        rec = self._record(daemon)
        return bool(rec) and _alive(rec.get("pid"), rec.get("starttime"))

    def _config_hash(self, daemon: str) -> str | None:
        files = {
            "slurmdbd": ["slurmdbd.conf"],
            "slurmctld": ["slurm.conf", "gres.conf"],
        }.get(daemon, ["slurm.conf", "gres.conf", "hosts"] if daemon.startswith("slurmd-") else [])
        if not files:
            return None
        h = hashlib.sha256()
        for name in files:
            with contextlib.suppress(OSError):
                h.update((self.etc / name).read_bytes())
        return h.hexdigest()[:16]

    def _config_stale(self, daemon: str) -> bool:
        rec = self._record(daemon) or {}
        want = self._config_hash(daemon)
        return want is not None and rec.get("config") not in (None, want)

    def _cluster_state(self) -> dict:
        path = self.state_dir / "cluster.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        ports = _pick_ports(4 + len(NODES))
        state = {
            "ports": {
                "slurmctld": ports[0],
                "slurmdbd": ports[1],
                "mariadb": ports[2],
                **{f"slurmd-{n}": ports[3 + i] for i, n in enumerate(NODES)},
            },
            "db_pass": secrets.token_hex(12),
            "created": time.time(),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)
        return state

    # ---- internals: files -----------------------------------------------------------

    def _prepare(self) -> None:
        """Create directories, keys, device files and config files (idempotent)."""
        if any(c in str(self.root) for c in " \t\n#=,'\"\\"):
            raise HpcjobsError(
                f"devcluster root {str(self.root)!r} contains characters Slurm config files cannot hold",
                hint="choose a plain path with HPCJOBS_DEVCLUSTER=/some/path",
            )
        for sock in (self.munge_socket, self.mariadb_socket):
            if len(str(sock)) > 100:
                raise HpcjobsError(
                    f"devcluster root {self.root} is too long for a Unix socket path",
                    hint="choose a shorter root with HPCJOBS_DEVCLUSTER=/some/short/path",
                )
        for sub in ("etc", "log", "run", "var", "var/slurmctld", "var/slurmd", "var/munge", "var/tmp", "dev", "state"):
            d = self.root / sub
            d.mkdir(parents=True, exist_ok=True)
        for node in NODES:
            (self.var / "slurmd" / node).mkdir(exist_ok=True)
        for d in (self.etc, self.run_dir, self.var / "munge", self.log_dir):  # munged checks these
            os.chmod(d, 0o755)

        state = self._cluster_state()
        ports = state["ports"]

        key = self.etc / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(1024))
        os.chmod(key, 0o400)

        for i in range(conf.GPUS_PER_NODE):
            dev = self.root / "dev" / f"nvidia{i}"
            if not (dev.exists() and stat.S_ISCHR(dev.stat().st_mode)):
                with contextlib.suppress(FileNotFoundError):
                    dev.unlink()
                try:
                    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                except PermissionError as exc:
                    raise HpcjobsError(
                        f"cannot create the fake GPU device {dev} ({exc.strerror}); Slurm 22.05 only "
                        "accepts character devices as GPU files, and mknod needs CAP_MKNOD",
                    ) from exc

        fill = {
            "root": str(self.root),
            "cluster": conf.CLUSTER_NAME,
            "munge_socket": str(self.munge_socket),
            "ctld_port": ports["slurmctld"],
            "dbd_port": ports["slurmdbd"],
            "db_port": ports["mariadb"],
            "db_pass": state["db_pass"],
            "slurmd_timeout": SLURMD_TIMEOUT,
            "msg_timeout": MESSAGE_TIMEOUT,
        }
        node_lines = "\n".join(
            conf.NODE_LINE.format(
                name=n,
                port=ports[f"slurmd-{n}"],
                cpus=conf.CPUS_PER_NODE,
                mem=conf.MEM_PER_NODE_MB,
                gpus=conf.GPUS_PER_NODE,
            )
            for n in NODES
        )
        self._write(
            self.slurm_conf,
            conf.SLURM_CONF.format(**fill, node_lines=node_lines, node_list=",".join(NODES)),
        )
        self._write(
            self.etc / "gres.conf",
            conf.GRES_CONF.format(
                root=self.root, node_range=",".join(NODES), last_gpu=conf.GPUS_PER_NODE - 1
            ),
        )
        self._write(self.etc / "slurmdbd.conf", conf.SLURMDBD_CONF.format(**fill), mode=0o600)
        self._write(self.etc / "mariadb-init.sql", conf.MARIADB_INIT_SQL.format(**fill), mode=0o600)
        self._write(self.etc / "plugstack.conf", conf.PLUGSTACK_CONF)
        host = socket.gethostname().split(".")[0]
        extra = host if host not in NODES and host != "localhost" else ""
        self._write(self.etc / "hosts", conf.HOSTS.format(nodes=" ".join(NODES), host=extra))

    @staticmethod
    def _write(path: Path, text: str, mode: int = 0o644) -> None:
        try:
            if path.read_text() == text:
                os.chmod(path, mode)
                return
        except OSError:
            pass
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        tmp.replace(path)

    def _init_mariadb(self) -> None:
        datadir = self.var / "mysql"
        if (datadir / ".hpcjobs-initialized").exists():
            return
        tmp = self.var / "mysql.init"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(datadir, ignore_errors=True)
        log = self.log_dir / "mariadb-install.log"
        cmd = [
            _which("mariadb-install-db"),
            "--no-defaults",
            "--user=root",
            f"--datadir={tmp}",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
            "--skip-name-resolve",
            *self._mariadb_tuning(),
        ]
        with open(log, "wb") as fh:
            rc = subprocess.call(
                cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._daemon_env(), cwd=self.root,
            )
        if rc != 0:
            raise HpcjobsError(f"mariadb-install-db failed (exit {rc}); last lines of {log}:\n{_tail(log)}")
        (tmp / ".hpcjobs-initialized").write_text("")
        tmp.rename(datadir)

    def _mariadb_tuning(self) -> list[str]:
        # Small and fast: this database holds a few hundred job records.
        return [
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=16M",
            "--innodb-use-native-aio=0",
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0",
            "--innodb-lock-wait-timeout=900",  # slurmdbd warns below 900
            "--skip-log-bin",
            "--performance-schema=OFF",
            f"--tmpdir={self.var / 'tmp'}",
        ]

    # ---- internals: daemons ---------------------------------------------------------

    def _daemon_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["PATH"] = _SBIN_PATH + (":" + env["PATH"] if env.get("PATH") else "")
        env["SLURM_CONF"] = str(self.slurm_conf)
        return env

    def _argv(self, daemon: str) -> list[str]:
        if daemon == "munged":
            return [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={self.etc / 'munge.key'}",
                f"--pid-file={self.run_dir / 'munged.pid'}",
                f"--log-file={self.log_file('munged')}",
                f"--seed-file={self.var / 'munge' / 'munged.seed'}",
                "--num-threads=4",
            ]
        if daemon == "mariadb":
            ports = self._cluster_state()["ports"]
            return [
                _which("mariadbd"),
                "--no-defaults",
                "--user=root",
                f"--datadir={self.var / 'mysql'}",
                f"--socket={self.mariadb_socket}",
                f"--port={ports['mariadb']}",
                "--bind-address=127.0.0.1",
                f"--pid-file={self.run_dir / 'mariadb.pid'}",
                f"--log-error={self.log_file('mariadb')}",
                "--skip-name-resolve",
                f"--init-file={self.etc / 'mariadb-init.sql'}",
                "--max-connections=100",
                *self._mariadb_tuning(),
            ]
        if daemon == "slurmdbd":
            return [_which("slurmdbd"), "-D"]  # reads SLURM_CONF's directory: etc/slurmdbd.conf
        if daemon == "slurmctld":
            return [_which("slurmctld"), "-D", "-f", str(self.slurm_conf)]
        node = daemon.split("-", 1)[1]
        if not _can_unshare():
            return [_which("slurmd"), "-D", "-N", node, "-f", str(self.slurm_conf)]
        script = (
            'hostname "$1" && mount --bind "$2" /etc/hosts && exec "$3" -D -N "$1" -f "$4"'
        )
        return [
            _which("unshare"),
            "--uts",
            "--mount",
            "--propagation=private",
            "--",
            "/bin/sh",
            "-c",
            script,
            "sh",
            node,
            str(self.etc / "hosts"),
            _which("slurmd"),
            str(self.slurm_conf),
        ]

    def _start(self, daemon: str, deadline: float) -> None:
        if daemon == "mariadb":
            self._init_mariadb()
        for dep in DAEMONS[: DAEMONS.index(daemon)]:
            if dep in ("munged",) or (daemon == "slurmdbd" and dep == "mariadb"):
                if not self._running(dep):
                    raise HpcjobsError(f"cannot start {daemon}: {dep} is not running (run `up`)")
        if daemon == "munged":
            with contextlib.suppress(FileNotFoundError):
                self.munge_socket.unlink()
        stderr_path = self.log_dir / f"{daemon}.stderr"
        with open(stderr_path, "ab") as err:
            err.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {daemon}\n".encode())
            err.flush()
            proc = subprocess.Popen(
                self._argv(daemon),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.root,
                env=self._daemon_env(),
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        st = _proc_stat(proc.pid)
        rec = {
            "pid": proc.pid,
            "starttime": st[1] if st else None,
            "started": time.time(),
            "config": self._config_hash(daemon),
        }
        self._write_record(daemon, rec)
        self._wait(
            lambda: self._serving(daemon),
            deadline,
            f"{daemon} to start",
            lambda: self._daemon_diagnostics(daemon),
            watch=daemon,
        )
        if daemon.startswith("slurmd-"):
            ns = _uts_ns(proc.pid)
            if ns and ns != _uts_ns("self"):
                rec["uts_ns"] = ns
                self._write_record(daemon, rec)
                self._remember_namespace(ns)

    def _serving(self, daemon: str) -> bool:
        if daemon == "munged":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(self.munge_socket))
                except OSError:
                    return False
            return True
        if daemon == "mariadb":
            if not self.mariadb_socket.exists():
                return False
        port = self._cluster_state()["ports"][daemon]
        return port in _listening_ports()

    def _wait(self, cond, deadline: float, what: str, diagnose, watch: str | None = None) -> None:
        delay = 0.05
        while True:
            if watch is not None and not self._running(watch):
                rec = self._record(watch) or {}
                _reap(rec.get("pid") or 0)
                raise HpcjobsError(f"devcluster: {watch} exited during start-up\n{diagnose()}")
            if cond():
                return
            if time.monotonic() > deadline:
                raise HpcjobsError(f"devcluster: timed out waiting for {what}\n{diagnose()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _daemon_diagnostics(self, daemon: str) -> str:
        out = []
        for path in (self.log_file(daemon), self.log_dir / f"{daemon}.stderr"):
            text = _tail(path)
            if text:
                out.append(f"--- last lines of {path}:\n{text}")
        return "\n".join(out) or f"(no log output in {self.log_dir})"

    def _stop_many(self, daemons: list[str]) -> None:
        """SIGTERM the daemons together, SIGKILL whichever outlives its grace period.

        slurmd gets 5 s: at shutdown it waits for in-flight job-termination
        threads, which can hang on a job step that cannot reach slurmctld.
        """
        pending: dict[str, tuple[int, int | None, float]] = {}
        now = time.monotonic()
        for daemon in daemons:
            rec = self._record(daemon)
            if not rec:
                continue
            pid, start = rec.get("pid"), rec.get("starttime")
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                grace = 5 if daemon.startswith("slurmd-") else 15
                pending[daemon] = (pid, start, now + grace)
            else:
                _reap(pid or 0)
                self._pid_file(daemon).unlink(missing_ok=True)
        killed: dict[str, float] = {}
        while pending:
            for daemon, (pid, start, deadline) in list(pending.items()):
                _reap(pid)
                if not _alive(pid, start):
                    del pending[daemon]
                    self._pid_file(daemon).unlink(missing_ok=True)
                elif daemon not in killed and time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    killed[daemon] = time.monotonic() + 10
                elif daemon in killed and time.monotonic() > killed[daemon]:
                    raise HpcjobsError(f"devcluster: could not stop {daemon} (pid {pid}) even with SIGKILL")
            if pending:
                time.sleep(0.05)

    def _remember_namespace(self, ns: str) -> None:
        path = self.state_dir / "namespaces.json"
        try:
            seen = json.loads(path.read_text())
        except (OSError, ValueError):
            seen = []
        if ns not in seen:
            seen.append(ns)
            path.write_text(json.dumps(seen))

    def _kill_node_namespaces(self, exclude: set[int] = frozenset(), forget: bool = True) -> None:
        """SIGKILL processes in the nodes' private UTS namespaces (job steps), except ``exclude``."""
        path = self.state_dir / "namespaces.json"
        try:
            seen = set(json.loads(path.read_text()))
        except (OSError, ValueError):
            return
        seen -= {_uts_ns("self"), _uts_ns(1), None}
        for _ in range(50):
            victims = [
                int(p.name)
                for p in Path("/proc").iterdir()
                if p.name.isdigit() and int(p.name) not in exclude
                and _uts_ns(p.name) in seen and _alive(int(p.name))
            ]
            if not victims:
                break
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if forget:
            path.unlink(missing_ok=True)

    # ---- internals: Slurm queries ---------------------------------------------------

    def _slurm(self, *args: str, timeout: float = 10) -> subprocess.CompletedProcess:
        env = dict(self._daemon_env())
        try:
            return subprocess.run(
                [_which(args[0]), *args[1:]],
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, "", f"timed out after {timeout}s")

    def _nodes(self) -> dict:
        r = self._slurm("sinfo", "-h", "-N", "-o", "%N|%T|%G|%E", timeout=5)
        nodes: dict = {}
        if r.returncode != 0:
            return nodes
        for line in r.stdout.splitlines():
            parts = line.split("|", 3)
            if len(parts) != 4:
                continue
            name, state, gres, reason = parts
            base = state.rstrip("*~#!%$@^-").split("+")[0].lower()
            usable = (
                base in _USABLE_NODE_STATES
                and not state.endswith("*")
                and "drain" not in state.lower()
            )
            nodes[name] = {"state": state, "gres": gres, "reason": "" if reason == "none" else reason, "usable": usable}
        return nodes

    def _first_sched_done(self) -> bool:
        r = self._slurm("sdiag", timeout=5)
        if r.returncode != 0:
            return False
        in_main = False
        for line in r.stdout.splitlines():
            if line.startswith("Main schedule statistics"):
                in_main = True
            elif in_main and line.strip().startswith("Total cycles:"):
                return int(line.split(":")[1]) > 0
        return False

    def _sacct_answers(self) -> bool:
        r = self._slurm("sacct", "-n", "-X", "-S", "now-1minutes", "-o", "JobID", timeout=10)
        return r.returncode == 0 and "error" not in r.stderr.lower()

    def _node_diagnostics(self) -> str:
        r = self._slurm("sinfo", "-N", "-o", "%N %T %G %E", timeout=5)
        out = [f"sinfo:\n{r.stdout}{r.stderr}"]
        for node in NODES:
            out.append(self._daemon_diagnostics(f"slurmd-{node}"))
        out.append(self._daemon_diagnostics("slurmctld"))
        return "\n".join(out)

    def _wait_ready(self, deadline: float) -> None:
        def nodes_ok() -> bool:
            nodes = self._nodes()
            return set(nodes) >= set(NODES) and all(nodes[n]["usable"] for n in NODES)

        self._wait(nodes_ok, deadline, "both nodes to be IDLE", self._node_diagnostics)
        self._wait(self._first_sched_done, deadline, "slurmctld's first scheduling pass",
                   lambda: self._daemon_diagnostics("slurmctld"))
        self._wait(self._sacct_answers, deadline, "sacct to answer (slurmdbd)",
                   lambda: self._daemon_diagnostics("slurmdbd") + "\n" + self._daemon_diagnostics("slurmctld"))

    def _cancel_all_jobs(self, wait: float = 10) -> None:
        r = self._slurm("squeue", "-h", "-o", "%A", timeout=5)
        ids = r.stdout.split() if r.returncode == 0 else []
        if not ids:
            return
        self._slurm("scancel", *ids, timeout=10)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            r = self._slurm("squeue", "-h", "-o", "%A", timeout=5)
            if r.returncode != 0 or not r.stdout.split():
                return
            time.sleep(0.2)


# --------------------------------------------------------------------------- helpers


_UNSHARE_OK: bool | None = None


def _can_unshare() -> bool:
    """Whether each slurmd can get its own hostname and /etc/hosts (needs CAP_SYS_ADMIN).

    Without it (e.g. an unprivileged container) the nodes share the machine's
    hostname: the cluster works, but ``hostname`` inside jobs is not node1/node2.
    """
    global _UNSHARE_OK
    if _UNSHARE_OK is None:
        try:
            r = subprocess.run(
                [_which("unshare"), "--uts", "--mount", "--", "sh", "-c",
                 "hostname hpcjobs-probe && mount --bind /etc/hosts /etc/hosts"],
                capture_output=True, timeout=10, stdin=subprocess.DEVNULL,
            )
            _UNSHARE_OK = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _UNSHARE_OK = False
    return _UNSHARE_OK


def _which(name: str) -> str:
    found = shutil.which(name, path=_SBIN_PATH + ":" + os.environ.get("PATH", ""))
    if not found:
        raise _missing([name])
    return found


def _missing(names: list[str]) -> HpcjobsError:
    pkgs = sorted({_REQUIRED.get(n, n) for n in names})
    return HpcjobsError(
        f"the devcluster needs {', '.join(names)} (Debian packages: {' '.join(pkgs)}), not found",
        hint="run scripts/install-system-deps.sh (as root) to install them",
    )


def _check_system() -> None:
    path = _SBIN_PATH + ":" + os.environ.get("PATH", "")
    missing = [name for name in _REQUIRED if not shutil.which(name, path=path)]
    if missing:
        raise _missing(missing)
    plugin_dirs = [Path("/usr/lib/x86_64-linux-gnu/slurm-wlm"), Path("/usr/lib/aarch64-linux-gnu/slurm-wlm"),
                   Path("/usr/lib/slurm-wlm"), Path("/usr/lib64/slurm"), Path("/usr/lib/slurm")]
    if not any((d / _MYSQL_PLUGIN).exists() for d in plugin_dirs):
        raise HpcjobsError(
            f"the devcluster needs Slurm's MySQL accounting plugin ({_MYSQL_PLUGIN}, Debian package slurm-wlm-mysql-plugin)",
            hint="run scripts/install-system-deps.sh (as root) to install it",
        )
    if os.geteuid() != 0:
        raise HpcjobsError(
            "the devcluster must run as root (slurmd runs jobs in private namespaces and needs device nodes)",
            hint="run it as root, e.g. in a container or CI job",
        )


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcjobs.devcluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="state directory (default: $HPCJOBS_DEVCLUSTER, else the root the last up started, else $XDG_STATE_HOME/hpcjobs/devcluster)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start the cluster (idempotent)")
    p_up.add_argument("--timeout", type=float, default=90)
    sub.add_parser("down", help="stop everything `up` started")
    sub.add_parser("status", help="print status as JSON")
    sub.add_parser("env", help="print shell exports for Slurm clients")
    for name in ("stop", "start", "kill"):
        p = sub.add_parser(name, help=f"{name} one daemon")
        p.add_argument("daemon", choices=DAEMONS)
    args = parser.parse_args(argv)
    dc = DevCluster(args.root)
    try:
        if args.cmd == "up":
            t0 = time.monotonic()
            dc.up(timeout=args.timeout)
            print(f"devcluster up in {time.monotonic() - t0:.1f}s ({dc.root})")
            for k, v in dc.env().items():
                print(f"export {k}={v}")
        elif args.cmd == "down":
            dc.down()
            print("devcluster down")
        elif args.cmd == "status":
            st = dc.status()
            print(json.dumps(st, indent=2))
            return 0 if st["ready"] else 1
        elif args.cmd == "env":
            for k, v in dc.env().items():
                print(f"export {k}={v}")
        else:
            getattr(dc, args.cmd)(args.daemon)
    except HpcjobsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
