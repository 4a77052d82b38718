"""The local Slurm devcluster (hpcjobs.devcluster): a real slurmctld, two slurmds,
slurmdbd + MariaDB and munge on this machine.

The cluster tests share one private cluster (its own temporary root, so it
never touches a session-wide devcluster) and run in file order: the fault
tests and ``down`` come last.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hpcjobs import devcluster
from hpcjobs.devcluster import DAEMONS, DevCluster, default_root, last_root_file
from hpcjobs.errors import HpcjobsError

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


# --------------------------------------------------------------------------- no cluster needed


def test_default_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HPCJOBS_STATE_DIR", str(tmp_path / "state"))  # no last root recorded
    monkeypatch.setenv("HPCJOBS_DEVCLUSTER", str(tmp_path / "dc"))
    assert default_root() == tmp_path / "dc"
    monkeypatch.delenv("HPCJOBS_DEVCLUSTER")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "hpcjobs" / "devcluster"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".local" / "state" / "hpcjobs" / "devcluster"


def test_default_root_follows_the_last_up(monkeypatch, tmp_path):
    """`make demo` starts the cluster under the checkout; a plain command afterwards finds it."""
    monkeypatch.delenv("HPCJOBS_DEVCLUSTER", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HPCJOBS_STATE_DIR", str(tmp_path / "state"))
    checkout = DevCluster(tmp_path / "clone" / ".devcluster")
    checkout._remember()
    assert last_root_file() == tmp_path / "state" / "devcluster.last"
    assert last_root_file().read_text() == f"{checkout.root}\n"
    # a root whose cluster was never set up (or was deleted with its clone) is not followed
    assert default_root() == tmp_path / "xdg" / "hpcjobs" / "devcluster"
    (checkout.state_dir).mkdir(parents=True)
    (checkout.state_dir / "cluster.json").write_text("{}")
    assert default_root() == checkout.root
    assert DevCluster().slurm_conf == checkout.slurm_conf
    monkeypatch.setenv("HPCJOBS_DEVCLUSTER", str(tmp_path / "other"))  # the variable still wins
    assert default_root() == tmp_path / "other"
    last_root_file().write_text("relative/path\n")
    monkeypatch.delenv("HPCJOBS_DEVCLUSTER")
    assert default_root() == tmp_path / "xdg" / "hpcjobs" / "devcluster"
    assert DevCluster(tmp_path).slurm_conf == tmp_path / "etc" / "slurm.conf"
    assert DevCluster(tmp_path).env() == {"SLURM_CONF": str(tmp_path / "etc" / "slurm.conf")}


def test_missing_packages_named(monkeypatch, tmp_path):
    real_which = shutil.which
    monkeypatch.setattr(
        devcluster.shutil, "which", lambda name, *a, **k: None if name == "slurmdbd" else real_which(name, *a, **k)
    )
    with pytest.raises(HpcjobsError) as exc:
        DevCluster(tmp_path).up()
    assert "slurmdbd" in str(exc.value) and "install-system-deps.sh" in str(exc.value)


def test_unknown_daemon_rejected(tmp_path):
    with pytest.raises(HpcjobsError, match="unknown devcluster daemon"):
        DevCluster(tmp_path).stop("slurmd-node3")


def test_status_of_fresh_root(tmp_path):
    st = DevCluster(tmp_path / "none").status()
    assert st["ready"] is False
    assert set(st["daemons"]) == set(DAEMONS)
    assert not any(d["running"] for d in st["daemons"].values())


# --------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def dc():
    try:
        devcluster._check_system()
    except HpcjobsError as exc:
        pytest.skip(f"devcluster unavailable: {exc}")
    root = Path(tempfile.mkdtemp(prefix="hpcdc-", dir="/tmp"))
    cluster = DevCluster(root)
    try:
        t0 = time.monotonic()
        cluster.up(timeout=120)
        cluster.cold_up_s = time.monotonic() - t0
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)


def slurm(dc: DevCluster, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | dc.env()
    r = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def submit(dc: DevCluster, script: str, *opts: str) -> tuple[str, Path]:
    out = dc.root / f"job-{time.monotonic_ns()}.out"
    r = slurm(dc, "sbatch", "--parsable", "-o", str(out), *opts, "--wrap", script)
    return r.stdout.strip().split(";")[0], out


def job_state(dc: DevCluster, job: str) -> str:
    r = slurm(dc, "scontrol", "show", "job", "-o", job, check=False)
    m = re.search(r"JobState=(\S+)", r.stdout)
    return m.group(1) if m else "UNKNOWN"


def wait_state(dc: DevCluster, job: str, states: set[str], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(dc, job)
        if state in states:
            return state
        time.sleep(0.2)
    raise AssertionError(f"job {job} still {job_state(dc, job)} after {timeout}s, wanted {states}")


def run_job(dc: DevCluster, script: str, *opts: str, timeout: float = 30) -> tuple[str, str, str]:
    job, out = submit(dc, script, *opts)
    state = wait_state(dc, job, TERMINAL, timeout)
    return job, state, out.read_text() if out.exists() else ""


def sacct_row(dc: DevCluster, job: str, timeout: float = 30) -> tuple[str, str]:
    """(State, ExitCode) of the job's allocation as sacct reports it, once it is terminal."""
    deadline = time.monotonic() + timeout
    row = ("", "")
    while time.monotonic() < deadline:
        r = slurm(dc, "sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode", check=False)
        lines = r.stdout.strip().splitlines()
        if lines:
            state, code = lines[-1].split("|")
            row = (state.split()[0], code)
            if row[0] in TERMINAL:
                return row
        time.sleep(0.3)
    raise AssertionError(f"sacct never reported job {job} finished (last: {row})")


def node_states(dc: DevCluster) -> dict[str, tuple[str, str]]:
    r = slurm(dc, "sinfo", "-h", "-N", "-o", "%N %T %G")
    return {n: (s, g) for n, s, g in (line.split() for line in r.stdout.splitlines())}


@pytest.mark.cluster
def test_up_gives_two_idle_gpu_nodes(dc):
    assert node_states(dc) == {"node1": ("idle", "gpu:4"), "node2": ("idle", "gpu:4")}
    st = dc.status()
    assert st["ready"] is True
    assert st["node_namespaces"] is True
    assert all(d["running"] and d["pid"] for d in st["daemons"].values())
    assert {n: v["state"] for n, v in st["nodes"].items()} == {"node1": "idle", "node2": "idle"}
    assert dc.cold_up_s < 60


@pytest.mark.cluster
def test_up_again_is_noop(dc):
    before = {k: v["pid"] for k, v in dc.status()["daemons"].items()}
    t0 = time.monotonic()
    dc.up()
    assert time.monotonic() - t0 < 5
    assert {k: v["pid"] for k, v in dc.status()["daemons"].items()} == before


@pytest.mark.cluster
def test_two_node_job_sees_both_hostnames(dc):
    job, state, out = run_job(dc, "srun hostname", "--nodes=2", "--ntasks-per-node=1")
    assert state == "COMPLETED", out
    assert sorted(out.split()) == ["node1", "node2"]


@pytest.mark.cluster
def test_gpus_per_node_sets_cuda_visible_devices(dc):
    script = 'echo "batch=$CUDA_VISIBLE_DEVICES"; srun bash -c \'echo "$(hostname)=$CUDA_VISIBLE_DEVICES"\''
    job, state, out = run_job(dc, script, "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4")
    assert state == "COMPLETED", out
    lines = set(out.split())
    assert {"batch=0,1,2,3", "node1=0,1,2,3", "node2=0,1,2,3"} <= lines, out


@pytest.mark.cluster
def test_sacct_reports_state_and_exit_code(dc):
    ok, _, _ = run_job(dc, "true")
    bad, state, _ = run_job(dc, "exit 3")
    assert state == "FAILED"
    assert sacct_row(dc, ok) == ("COMPLETED", "0:0")
    assert sacct_row(dc, bad) == ("FAILED", "3:0")


@pytest.mark.cluster
def test_sbatch_works_while_slurmdbd_is_down(dc):
    dc.stop("slurmdbd")
    try:
        assert not dc.status()["daemons"]["slurmdbd"]["running"]
        job, state, out = run_job(dc, "echo hello")
        assert state == "COMPLETED" and "hello" in out
    finally:
        dc.start("slurmdbd")
    # slurmctld keeps the records and sends them once slurmdbd is back
    assert sacct_row(dc, job, timeout=45) == ("COMPLETED", "0:0")


@pytest.mark.cluster
def test_killed_slurmd_fails_job_and_node_returns(dc):
    job, _ = submit(dc, "srun sleep 300", "--nodes=2", "--ntasks-per-node=1", "--no-requeue")
    wait_state(dc, job, {"RUNNING"})
    time.sleep(1)  # let the step start on both nodes
    dc.kill("slurmd-node2")
    assert sacct_row(dc, job, timeout=60) == ("NODE_FAIL", "0:0")
    assert node_states(dc)["node2"][0].startswith("down")
    dc.start("slurmd-node2")
    deadline = time.monotonic() + 20
    while node_states(dc)["node2"][0] != "idle":
        assert time.monotonic() < deadline, node_states(dc)
        time.sleep(0.3)
    job, state, out = run_job(dc, "srun hostname", "--nodes=2", "--ntasks-per-node=1")
    assert state == "COMPLETED" and sorted(out.split()) == ["node1", "node2"]


@pytest.mark.cluster
def test_down_stops_exactly_the_recorded_pids(dc, tmp_path):
    decoy_exe = tmp_path / "slurmd"
    shutil.copy("/bin/sleep", decoy_exe)
    decoy = subprocess.Popen([str(decoy_exe), "300"])
    try:
        job, _ = submit(dc, "srun sleep 300", "--nodes=2", "--ntasks-per-node=1")
        wait_state(dc, job, {"RUNNING"})
        pids = [d["pid"] for d in dc.status()["daemons"].values()]
        assert all(pids)
        node_ns = {dc._record(f"slurmd-{n}")["uts_ns"] for n in devcluster.NODES}
        assert devcluster._uts_ns("self") not in node_ns
        in_nodes = [p for p in Path("/proc").iterdir() if p.name.isdigit() and devcluster._uts_ns(p.name) in node_ns]
        assert len(in_nodes) > 2  # slurmds, slurmstepds, sleeps
        t0 = time.monotonic()
        dc.down()
        assert time.monotonic() - t0 < 30
        st = dc.status()
        assert not any(d["running"] for d in st["daemons"].values())
        assert not any(devcluster._alive(p) for p in pids)
        # job steps inside the nodes' namespaces are gone too
        leftovers = [
            p.name for p in Path("/proc").iterdir()
            if p.name.isdigit() and devcluster._uts_ns(p.name) in node_ns and devcluster._alive(int(p.name))
        ]
        assert leftovers == []
        assert decoy.poll() is None, "down killed a process it did not start"
    finally:
        decoy.kill()
        decoy.wait()


@pytest.mark.cluster
def test_cli_status_after_down(dc):
    r = subprocess.run(
        [sys.executable, "-m", "hpcjobs.devcluster", "--root", str(dc.root), "status"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 1 and '"ready": false' in r.stdout
