"""Breaking things on the real devcluster, and watching hpcjobs see it and repair it.

(a) a node dies during a 2-node finetune, (b) slurmctld restarts mid-chain,
(c) slurmdbd is down, (d) `hpcjobs submit` is SIGKILLed midway, (e) a stage
hits its time limit, (f) a chain fails at merge and only merge+evaluate rerun.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, wait_chain, wait_for

pytestmark = pytest.mark.cluster


def _progress(run_dir, attempt=1):
    path = Path(run_dir) / "stages" / "finetune" / f"attempt-{attempt}" / "progress.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _step(run_dir, attempt=1):
    return max([r.get("step", 0) for r in _progress(run_dir, attempt) if "event" not in r] or [0])


def _checkpoints(run_dir):
    """Complete checkpoints only: a rank killed mid-save leaves a partial one that resume skips."""
    return sorted(int(p.name.split("-")[1]) for p in (Path(run_dir) / "checkpoints").glob("checkpoint-*")
                  if (p / "trainer_state.json").exists())


@pytest.fixture(scope="module")
def hf_model(demo_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "llama-2-tiny-hf"
    subprocess.run([sys.executable, "-m", "hpcjobs.train.convert", "--input", demo_assets / "llama-2-tiny",
                    "--output", out, "--dtype", "float32"], check=True, capture_output=True)
    return out


def _submit_finetune(hpcjobs, demo_assets, hf_model, name, *overrides, nodes=2):
    return hpcjobs.json("submit", FIXTURES / "finetune-only.yaml", "--profile", "local", "--name", name,
                        "--nodes", nodes, f"finetune.model={hf_model}",
                        f"data.path={demo_assets / 'dialogues.parquet'}", *overrides)


@pytest.mark.train
@pytest.mark.slow
def test_a_rank_killed_on_node2_then_rerun_resumes(devcluster, hpcjobs, demo_assets, hf_model, tmp_path):
    sub = _submit_finetune(hpcjobs, demo_assets, hf_model, "rankkill", "finetune.max_steps=250",
                           "finetune.save_steps=50", "finetune.logging_steps=5")
    run = sub["run_dir"]
    wait_for(lambda: _step(run) >= 120, timeout=600, what="training past step 120")
    log = Path(run, "stages/finetune/attempt-1", f"slurm-{sub['jobs']['finetune']}.out").read_text()
    pid = int(re.search(r"rank=1 .*hostname=node2 pid=(\d+)", log).group(1))
    os.kill(pid, signal.SIGKILL)
    final = wait_chain(hpcjobs, sub["chain"], timeout=180)
    ft = final["stages"][0]
    assert final["state"] == "FAILED" and ft["state"] == "FAILED", final
    assert ft["failed_nodes"] == ["node2"], ft
    human = hpcjobs("status", sub["chain"]).stdout
    assert "a task failed on node2" in human
    done_before = max(_checkpoints(run))
    assert done_before >= 100

    rr = hpcjobs.json("rerun", sub["chain"])
    assert list(rr["jobs"]) == ["finetune"]
    final = wait_chain(hpcjobs, sub["chain"], timeout=300)
    assert final["state"] == "COMPLETED" and final["stages"][0]["attempt"] == 2
    prog = _progress(run, attempt=2)
    start = next(r for r in prog if r.get("event") == "start")
    assert start["step"] == done_before                    # the global step continues
    assert start["resumed_from"].endswith(f"checkpoint-{done_before}")
    steps = [r["step"] for r in prog if "loss" in r]
    assert steps[0] > done_before and prog[-1]["event"] == "end" and prog[-1]["step"] == 250

    # --fresh: start over (old checkpoints moved aside, not deleted), with a change of plan.
    rr = hpcjobs("rerun", sub["chain"], "--from", "finetune", "--fresh", "finetune.max_steps=20")
    assert "moved" in rr.stdout and "checkpoints.before-attempt-3" in rr.stdout
    final = wait_chain(hpcjobs, sub["chain"], timeout=300)
    assert final["state"] == "COMPLETED" and final["stages"][0]["attempt"] == 3
    prog = _progress(run, attempt=3)
    assert next(r for r in prog if r.get("event") == "start")["step"] == 0
    assert prog[-1]["step"] == 20
    assert (Path(run) / "checkpoints.before-attempt-3" / "checkpoint-250").is_dir()
    _report_shows_the_attempts(hpcjobs, sub, tmp_path)


def _report_shows_the_attempts(hpcjobs, sub, out_dir):
    """`hpcjobs report` of the failed, resumed, then fresh finetune, opened in headless Chromium:
    three bars, each attempt's loss points on one axis, the resume points and what changed."""
    from reportcheck import check_report, drawn_points, logged_steps, timeline_bars

    run = Path(sub["run_dir"])
    page = out_dir / "rankkill.html"          # outside the run directory: its links still lead there
    assert hpcjobs("report", sub["chain"], "--out", page).stdout == f"{page}\n"
    opened = check_report(page, out_dir / "chromium")
    assert timeline_bars(opened.dom) == {"finetune/1": "FAILED", "finetune/2": "COMPLETED",
                                         "finetune/3": "COMPLETED"}
    drawn = drawn_points(opened.dom, "chart-finetune-loss")
    assert {k: v for k, v in drawn.items() if k.startswith("loss/")} == {
        f"loss/{n}": logged_steps(run / f"stages/finetune/attempt-{n}/progress.jsonl") for n in (1, 2, 3)}
    start = next(r for r in _progress(run, attempt=2) if r.get("event") == "start")
    text = page.read_text()
    assert f"attempt 2 resumed at step {start['step']}" in text and "attempt 3 started over" in text
    assert re.search(r"<code>finetune\.max_steps</code></td><td><code>250</code></td><td><code>20</code>", text)


@pytest.mark.train
@pytest.mark.slow
def test_a_node_dies_node_fail_then_completes(devcluster, hpcjobs, demo_assets, hf_model):
    """node2 dies (slurmd and its job processes killed): NODE_FAIL, node2 named, and after the
    node returns, Slurm's requeue resumes the finetune from its checkpoint."""
    sub = _submit_finetune(hpcjobs, demo_assets, hf_model, "poweroff", "finetune.max_steps=250",
                           "finetune.save_steps=50", "finetune.logging_steps=5")
    run = sub["run_dir"]
    wait_for(lambda: _step(run) >= 120, timeout=600, what="training past step 120")
    devcluster.power_off("node2")
    try:
        st = wait_for(lambda: (s := hpcjobs.json("status", sub["chain"]))["stages"][0]["history"] and s,
                      timeout=120, what="the NODE_FAIL run to show in the stage's history")
        ft = st["stages"][0]
        assert ft["history"][-1]["state"] == "NODE_FAIL", ft
        assert ft["failed_nodes"] == ["node2"], ft
        human = hpcjobs("status", sub["chain"]).stdout
        assert "NODE_FAIL" in human and "node2" in human
    finally:
        # as a reboot would: only once slurmctld has given up re-sending the dead run's step
        # signal, which would otherwise kill the requeued run (same job and step ids)
        devcluster.power_on("node2")
    final = wait_chain(hpcjobs, sub["chain"], timeout=400)
    assert final["state"] == "COMPLETED", final
    starts = [r for r in _progress(run) if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["step"] >= 100 and starts[1]["resumed_from"]


def test_b_slurmctld_restart_mid_chain(devcluster, hpcjobs):
    sub = hpcjobs.json("submit", FIXTURES / "sleepy.yaml", "--profile", "local", "--name", "ctldrestart")
    timeline = Path(sub["run_dir"], "timeline")
    wait_for(lambda: timeline.exists(), timeout=60, what="first stage's command running")
    devcluster.stop("slurmctld")
    try:
        down = hpcjobs("status", sub["chain"], "--json", check=False)
        assert down.returncode == 0, down.stderr
        st = json.loads(down.stdout)
        assert any("squeue unavailable" in w for w in st["warnings"]), st
        # From accounting, or from the job's started marker where slurmctld stopped before
        # telling slurmdbd the job had started (accounting then still says PENDING).
        first = st["stages"][0]
        assert first["state"] == "RUNNING" and first["source"] in ("sacct", "marker"), first
        time.sleep(3)
    finally:
        devcluster.start("slurmctld")
    final = wait_chain(hpcjobs, sub["chain"], timeout=120)
    assert final["state"] == "COMPLETED" and not final["warnings"], final
    events = [line.split()[0] for line in Path(sub["run_dir"], "timeline").read_text().splitlines()]
    assert events == ["first", "first-end", "second", "third"]


def test_c_slurmdbd_down_status_from_squeue_and_markers(devcluster, hpcjobs):
    devcluster.stop("slurmdbd")
    try:
        sub = hpcjobs.json("submit", FIXTURES / "three-stage.yaml", "--profile", "local", "--name", "nodbd")
        final = wait_chain(hpcjobs, sub["chain"], timeout=120)
        assert final["state"] == "COMPLETED" and final["accounting"] is False
        assert any("accounting is unavailable" in w for w in final["warnings"])
        assert all(s["exit_code"] == 0 for s in final["stages"])   # from the jobs' markers
        human = hpcjobs("status", sub["chain"]).stdout
        assert "accounting is unavailable" in human and "COMPLETED" in human
    finally:
        devcluster.start("slurmdbd")
    after = hpcjobs.json("status", sub["chain"])
    assert after["accounting"] is True and after["state"] == "COMPLETED"


def test_d_submit_killed_midway_leaves_no_unrecorded_job_running(devcluster, hpcjobs, tmp_path):
    """SIGKILL `hpcjobs submit` after the 2nd sbatch created its job but before hpcjobs got its id."""
    real = subprocess.run(["which", "sbatch"], capture_output=True, text=True, check=True).stdout.strip()
    shim = tmp_path / "bin" / "sbatch"
    shim.parent.mkdir()
    calls = tmp_path / "calls"
    shim.write_text(f"""#!/bin/sh
# The real sbatch, slowed down on its 2nd call, *after* Slurm has accepted the job.
echo x >> "{calls}"
out=$({real} "$@") || exit $?
if [ "$(wc -l < "{calls}")" -eq 2 ]; then touch "{tmp_path}/submitted-2"; sleep 60; fi
echo "$out"
""")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "hpcjobs", "submit", FIXTURES / "three-stage.yaml",
                             "--profile", "local", "--name", "killed"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: (tmp_path / "submitted-2").exists(), timeout=60, what="the 2nd sbatch")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    chains = [c for c in hpcjobs.json("list") if c["name"] == "killed"]
    assert len(chains) == 1, chains
    cs = hpcjobs.json("status", chains[0]["chain"])
    first, second, third = cs["stages"]
    assert cs["state"] == "SUBMITTING"
    assert first["job_id"] and first["state"] == "PENDING" and first["reason"] == "JobHeldUser"
    assert second["job_id"] is None and len(second["orphans"]) == 1      # found by its job name
    assert third["state"] == "NOT_SUBMITTED" and not third["orphans"]
    time.sleep(3)
    assert not Path(chains[0]["run_dir"], "timeline").exists()          # nothing ran
    human = hpcjobs("status", chains[0]["chain"]).stdout
    assert "never recorded" in human and "held" in human
    out = hpcjobs("cancel", chains[0]["chain"]).stdout
    assert first["job_id"] in out and second["orphans"][0] in out
    gone = hpcjobs.json("status", chains[0]["chain"])
    assert gone["stages"][0]["state"] == "CANCELLED" and not gone["stages"][1]["orphans"]


@pytest.mark.train
@pytest.mark.slow
def test_e_time_limit_requeues_and_resumes(devcluster, hpcjobs, demo_assets, hf_model):
    """A 1-minute limit with the warning 55 s before it: the finetune checkpoints, requeues itself
    (same job id, so downstream dependencies hold) and continues from that global step."""
    sub = _submit_finetune(hpcjobs, demo_assets, hf_model, "timelimit", "finetune.max_steps=500",
                           "finetune.save_steps=100000", "finetune.logging_steps=10", "finetune.time=00:01:00",
                           "profile.signal_grace=55", nodes=1)
    run, job = sub["run_dir"], sub["jobs"]["finetune"]
    wait_for(lambda: any(r.get("event") == "preempted" for r in _progress(run)), timeout=150,
             what="the time-limit warning to stop training with a checkpoint")
    # Let the resumed run finish: give the requeued job more time (as an admin could).
    slurm_env = {**os.environ, **devcluster.env()}
    wait_for(lambda: subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=00:10:00"],
                                    env=slurm_env, capture_output=True).returncode == 0,
             timeout=60, what="the time limit update")
    final = wait_chain(hpcjobs, sub["chain"], timeout=400)
    assert final["state"] == "COMPLETED", final
    ft = final["stages"][0]
    assert ft["job_id"] == job and ft["restarts"] >= 1 and ft["history"][0]["state"] == "REQUEUED"
    prog = _progress(run)
    stopped = next(r for r in prog if r.get("event") == "preempted")
    starts = [r for r in prog if r.get("event") == "start"]
    assert starts[-1]["step"] == stopped["step"] > 0
    assert prog[-1]["event"] == "end" and prog[-1]["step"] == 500
    log = Path(ft["log"]).read_text()
    assert "requeueing (restart 1 of 3)" in log


@pytest.mark.train
@pytest.mark.slow
def test_f_merge_fails_rerun_runs_merge_and_evaluate_only(devcluster, hpcjobs, demo_assets, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    sub = hpcjobs.json("submit", "llama2-lora", "--nodes", "1", "--profile", "local", "--name", "mergefail",
                       "--config", demo_assets / "demo.yaml", f"merge.base={empty}")
    final = wait_chain(hpcjobs, sub["chain"], timeout=600)
    states = {s["name"]: s["state"] for s in final["stages"]}
    assert states == {"convert": "COMPLETED", "prepare": "COMPLETED", "finetune": "COMPLETED", "merge": "FAILED",
                      "evaluate": "PENDING"}, final
    run = Path(sub["run_dir"])
    adapter = run / "adapter" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime
    rr = hpcjobs.json("rerun", sub["chain"], f"merge.base={run / 'hf-model'}")
    assert list(rr["jobs"]) == ["merge", "evaluate"]
    final = wait_chain(hpcjobs, sub["chain"], timeout=300)
    assert final["state"] == "COMPLETED", final
    by = {s["name"]: s for s in final["stages"]}
    assert by["finetune"]["attempt"] == 1 and by["finetune"]["job_id"] == sub["jobs"]["finetune"]
    assert by["convert"]["attempt"] == 1 and by["prepare"]["attempt"] == 1
    assert by["merge"]["attempt"] == 2 and by["evaluate"]["attempt"] == 2
    assert adapter.stat().st_mtime == mtime                           # not trained again
    assert (run / "eval" / "report.json").is_file()
    record = json.loads((run / "chain.json").read_text())
    merge_attempts = next(s for s in record["stages"] if s["name"] == "merge")["attempts"]
    assert merge_attempts[1]["overrides"] == [f"merge.base={run / 'hf-model'}"]
