"""Chains on the real devcluster: order, failure, bad input, cleanup, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, wait_chain, wait_for

pytestmark = pytest.mark.cluster


def _slurm_jobs_named(devcluster, prefix):
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i %j"], env={**os.environ,
                         **devcluster.env()}, capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1].startswith(prefix)]


def _runs_root(hpcjobs_home):
    return Path(hpcjobs_home) / "runs"


def test_three_stages_run_in_order_on_two_nodes(devcluster, hpcjobs, hpcjobs_home):
    sub = hpcjobs.json("submit", FIXTURES / "three-stage.yaml", "--profile", "local", "--name", "order")
    assert list(sub["jobs"]) == ["first", "second", "third"]
    final = wait_chain(hpcjobs, sub["chain"], timeout=180)
    assert final["state"] == "COMPLETED", final
    assert [s["state"] for s in final["stages"]] == ["COMPLETED"] * 3
    assert all(s["exit_code"] == 0 for s in final["stages"])
    timeline = (Path(sub["run_dir"]) / "timeline").read_text().split("\n")
    events = [line.split() for line in timeline if line]
    first_hosts = {h for what, h, _ in events if what == "first"}
    assert first_hosts == {"node1", "node2"}, events          # stage 1 really ran on 2 nodes
    first_end = max(float(t) for what, _, t in events if what == "first-end")
    second_start = min(float(t) for what, _, t in events if what == "second")
    third_start = min(float(t) for what, _, t in events if what == "third")
    assert second_start > first_end, events                    # afterok: only after stage 1 ended
    assert third_start > second_start
    stages = {s["name"]: s for s in final["stages"]}
    assert stages["first"]["nodes"] == "node[1-2]"
    # The job wrote its own completion marker.
    marker = json.loads((Path(sub["run_dir"]) / "stages/first/attempt-1/marker.json").read_text())
    assert marker["exit_code"] == 0 and marker["job_id"] == sub["jobs"]["first"]


def test_failed_first_stage_blocks_the_rest_and_says_why(devcluster, hpcjobs):
    sub = hpcjobs.json("submit", FIXTURES / "fail-first.yaml", "--profile", "local", "--name", "failfirst")
    final = wait_for(lambda: (s := hpcjobs.json("status", sub["chain"]))["stages"][1]["blocked_by"] and s,
                     timeout=120, what="second stage to show as blocked")
    stages = {s["name"]: s for s in final["stages"]}
    assert final["state"] == "FAILED"
    assert stages["first"]["state"] == "FAILED" and stages["first"]["exit_code"] == 3
    assert stages["second"]["state"] == "PENDING" and stages["second"]["blocked_by"] == "first"
    assert stages["third"]["blocked_by"] == "first"
    run_dir = Path(sub["run_dir"])
    assert not (run_dir / "second-ran").exists() and not (run_dir / "third-ran").exists()
    human = hpcjobs("status", sub["chain"]).stdout
    assert "first FAILED" in human and "exit code 3" in human
    assert "about to fail" in human                              # the end of its log
    assert "blocked: upstream first failed" in human
    hpcjobs("cancel", sub["chain"])
    after = wait_for(lambda: (s := hpcjobs.json("status", sub["chain"]))["stages"][2]["state"] == "CANCELLED"
                     and s, timeout=30, what="the blocked stages to be cancelled")
    assert after["state"] == "CANCELLED"
    assert [s["state"] for s in after["stages"]] == ["FAILED", "CANCELLED", "CANCELLED"]


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "3"], "asks for 3 nodes but partition debug has 2 (node1, node2)"),
    (["--nodes", "0"], "run.nodes: needs at least 1 node, got 0"),
    (["--profile", "nosuch"], "unknown profile 'nosuch'"),
    (["finetune.learning_rate=1e-4"], "command line: finetune.learning_rate: unknown key"),
    (["finetune.max_steps=many"], "command line: finetune.max_steps: expects an integer, got 'many'"),
    (["--include", "node7:0"], "node7 not in partition debug"),
    (["--name", "bad;name$(x)"], "is not a valid name"),
    (["finetune.zero_stage=9"], "finetune.zero_stage: must be 0, 1, 2 or 3"),
    (["data.path=/nonexistent/d.parquet"], "/nonexistent/d.parquet"),
])
def test_bad_input_submits_nothing(devcluster, hpcjobs, hpcjobs_home, demo_assets, args, needle):
    before = set(p.name for p in _runs_root(hpcjobs_home).glob("*")) if _runs_root(hpcjobs_home).exists() else set()
    proc = hpcjobs("submit", "llama2-lora", "--profile", "local", "--config", demo_assets / "demo.yaml",
                   "--name", "badinput", *args, check=False)
    if "--profile" in args:  # the later --profile wins, as with any repeated option
        assert "unknown profile" in proc.stderr
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    after = set(p.name for p in _runs_root(hpcjobs_home).glob("*")) if _runs_root(hpcjobs_home).exists() else set()
    assert after == before
    assert not _slurm_jobs_named(devcluster, "badinput")


def test_unknown_recipe_submits_nothing(devcluster, hpcjobs):
    proc = hpcjobs("submit", "llama3-full", "--profile", "local", check=False)
    assert proc.returncode == 2 and "unknown recipe 'llama3-full'; known recipes:" in proc.stderr
    assert "llama2-lora" in proc.stderr.split("known recipes:")[1]


def test_dataset_problems_are_caught_before_submission(devcluster, hpcjobs, demo_assets, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"Description": ["d"], "Patient": ["p"], "Answer": ["a"]}), wrong)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"Description": pa.array([], pa.string()), "Patient": pa.array([], pa.string()),
                             "Doctor": pa.array([], pa.string())}), empty)
    unreadable = tmp_path / "garbage.parquet"
    unreadable.write_text("not parquet")
    for path, needle in ((wrong, "missing column(s) 'Doctor'; found: 'Description', 'Patient', 'Answer'"),
                         (empty, "dataset is empty"), (unreadable, "cannot read parquet dataset")):
        proc = hpcjobs("submit", "llama2-lora", "--profile", "local", "--config", demo_assets / "demo.yaml",
                       "--name", "baddata", f"data.path={path}", check=False)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert f"command line: data.path: {path}" in proc.stderr
    assert not _slurm_jobs_named(devcluster, "baddata")


def test_failed_submission_cancels_what_was_submitted(devcluster, hpcjobs, tmp_path):
    """Slurm itself rejects stage 2 (no such partition): stage 1, already submitted, is cancelled."""
    proc = hpcjobs("submit", FIXTURES / "three-stage.yaml", "--profile", "local", "--name", "halfway",
                   "second.sbatch.partition=no-such-partition", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "submission failed at second" in proc.stderr and "cancelled the 1 job(s)" in proc.stderr
    chains = [c for c in hpcjobs.json("list") if c["name"] == "halfway"]
    assert len(chains) == 1 and chains[0]["state"] == "SUBMIT_FAILED"
    first = chains[0]["stages"][0]
    assert first["job_id"]
    wait_for(lambda: hpcjobs.json("status", chains[0]["chain"])["stages"][0]["state"] == "CANCELLED",
             timeout=60, what="stage 1 to be cancelled")
    assert not Path(chains[0]["run_dir"], "timeline").exists()   # it never ran


def test_json_formats_and_list(devcluster, hpcjobs):
    sub = hpcjobs.json("submit", FIXTURES / "three-stage.yaml", "--profile", "local", "--name", "jsonfmt")
    assert set(sub) >= {"chain", "jobs"} and all(v.isdigit() for v in sub["jobs"].values())
    st = hpcjobs.json("status", sub["chain"])
    assert {"chain", "recipe", "profile", "stages"} <= set(st)
    for s in st["stages"]:
        assert {"name", "job_id", "state", "exit_code", "nodes", "attempt"} <= set(s)
    wait_chain(hpcjobs, sub["chain"], timeout=180)
    listed = hpcjobs.json("list")
    mine = [c for c in listed if c["chain"] == sub["chain"]]
    assert mine and mine[0]["state"] == "COMPLETED"
    # The chain name finds its latest chain; the run directory works too.
    assert hpcjobs.json("status", "jsonfmt")["chain"] == sub["chain"]
    assert hpcjobs.json("status", sub["run_dir"])["chain"] == sub["chain"]


def test_one_squeue_and_one_sacct_per_refresh(devcluster, hpcjobs, tmp_path):
    """Count the Slurm calls `hpcjobs list` makes, whatever the number of chains and stages.
    (Finished chains are cached and cost no call; a live chain makes list ask Slurm.)"""
    live = hpcjobs.json("submit", FIXTURES / "sleepy.yaml", "--profile", "local", "--name", "countlive")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls"
    for cmd in ("squeue", "sacct", "scontrol", "sinfo", "sbatch", "scancel"):
        real = subprocess.run(["which", cmd], capture_output=True, text=True).stdout.strip()
        (bindir / cmd).write_text(f'#!/bin/sh\necho {cmd} >> "{log}"\nexec {real} "$@"\n')
        (bindir / cmd).chmod(0o755)
    from conftest import CLI

    counted = CLI({**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
    chains = counted.json("list")
    assert len(chains) >= 2 and sum(len(c["stages"]) for c in chains) >= 6
    calls = log.read_text().split()
    assert calls.count("squeue") == 1 and calls.count("sacct") == 1, calls
    assert set(calls) == {"squeue", "sacct"}
    hpcjobs("cancel", live["chain"])


def test_logs_follow_until_the_job_ends(devcluster, hpcjobs):
    sub = hpcjobs.json("submit", FIXTURES / "sleepy.yaml", "--profile", "local", "--name", "logs")
    wait_for(lambda: hpcjobs.json("status", sub["chain"])["stages"][0]["state"] == "RUNNING", timeout=60,
             what="first stage running")
    followed = hpcjobs("logs", sub["chain"], "first", "--follow", timeout=120)
    # --follow returned by itself once the job ended, with the whole log.
    assert "hpcjobs: chain" in followed.stdout and "stage first attempt 1" in followed.stdout
    assert hpcjobs.json("status", sub["chain"])["stages"][0]["state"] == "COMPLETED"
    wait_chain(hpcjobs, sub["chain"], timeout=60)
    last = hpcjobs("logs", sub["chain"], "third", "--lines", "1").stdout
    assert last.count("\n") == 1
    bad = hpcjobs("logs", sub["chain"], "third", "--attempt", "7", check=False)
    assert bad.returncode == 1 and "no attempt 7" in bad.stderr


def test_watch_in_a_terminal(devcluster, hpcjobs):
    """`watch` on a real terminal (a pty from script(1)) draws the live table and exits 0."""
    sub = hpcjobs.json("submit", FIXTURES / "three-stage.yaml", "--profile", "local", "--name", "tty")
    proc = subprocess.run(["script", "-qfec", f"{sys.executable} -m hpcjobs watch {sub['chain']} -n 1",
                           "/dev/null"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "COMPLETED" in proc.stdout and "third" in proc.stdout
