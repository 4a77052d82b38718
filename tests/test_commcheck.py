"""The `commcheck` stage kind and `hpcjobs commcheck`: an all-reduce bandwidth test across the
devcluster's two nodes (gloo), its bus bandwidth per size in commcheck.json, and a chain that
fails before training, naming the node(s), when the interconnect is slower than expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import chain_state, wait_chain, wait_for

FAST = ("--set", "commcheck.sizes=[64K,1M]", "--set", "commcheck.iters=5", "--set", "commcheck.warmup=2")


def _section(out: str, name: str) -> str:
    return out.split(f"{name} <==\n", 1)[1].split("\n==>", 1)[0]


def _attempt_dir(status: dict, stage: str = "commcheck") -> Path:
    st = {s["name"]: s for s in status["stages"]}[stage]
    return Path(status["run_dir"]) / "stages" / stage / f"attempt-{st['attempt']}"


# ---------------------------------------------------------------- rendering (no Slurm)

def test_dry_run_launches_the_check_with_torchrun(hpcjobs):
    out = hpcjobs("commcheck", "--nodes", "2", "--pairs", "--dry-run").stdout
    spec = json.loads(_section(out, "launch.json"))
    assert spec["launcher"] == "torchrun" and spec["program"] == ["-m", "hpcjobs.train.commcheck"]
    assert spec["nnodes"] == 2 and spec["world_size"] == 2
    args = spec["args"]
    assert args[args.index("--backend") + 1] == "gloo"
    assert float(args[args.index("--expected") + 1]) == 0.05        # profile local's expected_busbw
    assert "--pairs" in args and args[args.index("--out") + 1].endswith("/commcheck.json")
    assert "hpcjobs.launch run --spec" in out


def test_gpu_profile_uses_nccl_on_every_gpu_and_expect_overrides(hpcjobs):
    out = hpcjobs("commcheck", "--nodes", "2", "--profile", "a800", "--expect", "42", "--dry-run").stdout
    spec = json.loads(_section(out, "launch.json"))
    args = spec["args"]
    assert args[args.index("--backend") + 1] == "nccl"
    assert spec["nproc_per_node"] == 8 and spec["world_size"] == 16
    assert float(args[args.index("--expected") + 1]) == 42.0
    assert "#SBATCH --gpus-per-node=8" in out
    # the profile's figure is the default
    out = hpcjobs("render", "commcheck", "--nodes", "2", "--profile", "a800").stdout
    args = json.loads(_section(out, "launch.json"))["args"]
    assert float(args[args.index("--expected") + 1]) == 150.0


def test_bad_settings_are_refused(hpcjobs):
    proc = hpcjobs("commcheck", "--nodes", "1", "--dry-run", check=False)
    assert proc.returncode == 2 and "at least 2 ranks" in proc.stderr, proc.stderr
    proc = hpcjobs("commcheck", "--nodes", "2", "--set", "commcheck.sizes=[1X]", "--dry-run", check=False)
    assert proc.returncode == 2 and "commcheck.sizes" in proc.stderr, proc.stderr
    proc = hpcjobs("commcheck", "--nodes", "2", "--expect", "-1", "--dry-run", check=False)
    assert proc.returncode == 2 and "expected_busbw" in proc.stderr, proc.stderr


@pytest.mark.train
def test_bus_bandwidth_and_slow_node_rules():
    from hpcjobs.train import commcheck as job

    assert job.bus_factor(2) == 1.0 and job.bus_factor(8) == 2 * 7 / 8
    assert job.parse_size("1M") == 1 << 20 and job.parse_size("64K") == 65536 and job.parse_size("100") == 100

    def pair(a, b, ok):
        return {"nodes": [a, b], "ok": ok}
    # n3 is in every slow pair and only in slow pairs
    pairs = [pair("n1", "n2", True), pair("n1", "n3", False), pair("n2", "n3", False)]
    assert job.slow_nodes_from_pairs(pairs) == ["n3"]
    assert job.slow_nodes_from_pairs([pair("n1", "n2", True)]) == []
    assert sorted(job.slow_nodes_from_pairs([pair("n1", "n2", False)])) == ["n1", "n2"]


# ---------------------------------------------------------------- on the devcluster

@pytest.mark.cluster
@pytest.mark.train
def test_commcheck_passes_with_the_profile_expectation(devcluster, hpcjobs):
    sub = hpcjobs.json("commcheck", "--nodes", "2", "--name", "cc-pass", *FAST)
    final = wait_chain(hpcjobs, sub["chain"], timeout=240)
    assert final["state"] == "COMPLETED", final
    report = json.loads((_attempt_dir(final) / "commcheck.json").read_text())
    assert report["backend"] == "gloo" and report["world_size"] == 2 and report["nodes"] == ["node1", "node2"]
    assert [r["size"] for r in report["results"]] == [65536, 1 << 20]       # one figure per size
    assert all(r["busbw"] > 0 and r["algbw"] > 0 for r in report["results"])
    # two ranks: busbw = algbw x 2(n-1)/n = algbw
    assert all(r["busbw"] == r["algbw"] for r in report["results"])
    assert report["ok"] is True and report["expected_busbw"] == 0.05 and report["slow_nodes"] == []
    log = hpcjobs("logs", sub["chain"]).stdout
    assert "busbw (GB/s)" in log and "commcheck: passed" in log


@pytest.mark.cluster
@pytest.mark.train
def test_slow_interconnect_fails_the_chain_before_training(devcluster, hpcjobs, tmp_path):
    recipe = tmp_path / "checked.yaml"
    recipe.write_text(
        "recipe: {description: commcheck then training}\n"
        "pipeline:\n"
        "  commcheck: {kind: commcheck}\n"
        "  train: {kind: command, after: [commcheck]}\n"
        "train:\n"
        "  command: touch \"$HPCJOBS_RUN_DIR/trained\"\n")
    sub = hpcjobs.json("submit", recipe, "--nodes", "2", "--name", "cc-slow", "commcheck.pairs=true",
                       "commcheck.expected_busbw=1000000", "commcheck.sizes=[64K,1M]", "commcheck.iters=5",
                       "commcheck.warmup=2")
    wait_for(lambda: {s["name"]: s for s in chain_state(hpcjobs, sub["chain"])["stages"]}["commcheck"]["state"]
             == "FAILED", timeout=240, what="commcheck to fail")
    status = chain_state(hpcjobs, sub["chain"])
    stages = {s["name"]: s for s in status["stages"]}
    assert stages["train"]["state"] != "COMPLETED" and not (Path(sub["run_dir"]) / "trained").exists()
    assert "slow node(s): node1, node2" in (stages["commcheck"]["error_line"] or ""), stages["commcheck"]
    report = json.loads((_attempt_dir(status) / "commcheck.json").read_text())
    assert report["ok"] is False and sorted(report["slow_nodes"]) == ["node1", "node2"]
    assert [p["nodes"] for p in report["pairs"]] == [["node1", "node2"]] and report["pairs"][0]["ok"] is False
    human = hpcjobs("status", sub["chain"]).stdout
    assert "below the expected 1e+06 GB/s" in human, human
    log = hpcjobs("logs", sub["chain"], "commcheck").stdout
    assert "TOO SLOW" in log and "hpcjobs.commcheck: error:" in log
    hpcjobs("cancel", sub["chain"])
