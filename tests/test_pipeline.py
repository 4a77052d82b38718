"""The llama2-lora chain for real on the devcluster: convert, 2-node DeepSpeed finetune, merge, evaluate."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, wait_chain

pytestmark = [pytest.mark.cluster, pytest.mark.train, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_chain(devcluster, demo_assets):
    """`hpcjobs submit llama2-lora --nodes 2 --profile local`, followed with `hpcjobs watch`."""
    from conftest import CLI

    cli = CLI()
    sub = cli.json("submit", "llama2-lora", "--nodes", "2", "--profile", "local",
                   "--config", demo_assets / "demo.yaml", "--name", "e2e")
    watch = subprocess.run([sys.executable, "-m", "hpcjobs", "watch", sub["chain"], "-n", "1"],
                           capture_output=True, text=True, timeout=900)
    return sub, watch, cli.json("status", sub["chain"])


def test_four_jobs_complete_in_order(demo_chain):
    sub, watch, final = demo_chain
    assert list(sub["jobs"]) == ["convert", "finetune", "merge", "evaluate"]
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert final["state"] == "COMPLETED", final
    run = Path(sub["run_dir"])
    times = []
    for stage in sub["jobs"]:
        started = json.loads((run / "stages" / stage / "attempt-1" / "started.json").read_text())
        ended = json.loads((run / "stages" / stage / "attempt-1" / "marker.json").read_text())
        assert ended["exit_code"] == 0
        times.append((started["time"], ended["time"]))
    for (_, end), (start, _) in zip(times, times[1:]):
        assert start >= end


def test_finetune_spans_both_nodes(demo_chain):
    sub, _, final = demo_chain
    ft = next(s for s in final["stages"] if s["name"] == "finetune")
    assert ft["nodes"] == "node[1-2]"
    log = Path(ft["log"]).read_text()
    ranks = re.findall(r"rank=(\d) world_size=(\d) .*hostname=(\S+)", log)
    assert {(r, w, h) for r, w, h in ranks} >= {("0", "2", "node1"), ("1", "2", "node2")}, ranks
    assert "--no_ssh --node_rank=0" in log and "--no_ssh --node_rank=1" in log
    assert "deepspeed engine: optimizer=DeepSpeedZeroOptimizer offload_optimizer=none" in log
    ds = json.loads((Path(sub["run_dir"]) / "stages/finetune/attempt-1/ds_config.json").read_text())
    assert ds["train_batch_size"] == 2 * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]


def test_watch_showed_training_progress(demo_chain):
    _, watch, _ = demo_chain
    assert re.search(r"finetune=RUNNING \(step \d+/40, loss \d", watch.stdout), watch.stdout


def test_outputs_in_the_run_directory(demo_chain):
    sub, _, _ = demo_chain
    run = Path(sub["run_dir"])
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter_cfg["base_model_name_or_path"]).is_absolute()
    assert adapter_cfg["base_model_name_or_path"] == str(run / "hf-model")
    assert list((run / "merged").glob("*.safetensors"))
    assert (run / "hf-model" / "config.json").is_file()
    report = json.loads((run / "eval" / "report.json").read_text())
    base, merged = report["eval_loss"]["base"], report["eval_loss"]["merged"]
    assert math.isfinite(base) and math.isfinite(merged) and merged < base
    assert (run / "eval" / "report.md").read_text().startswith("# Evaluation")
    progress = [json.loads(line) for line in (run / "stages/finetune/attempt-1/progress.jsonl").read_text().splitlines()]
    losses = [p["loss"] for p in progress if "loss" in p]
    assert losses[-1] < losses[0]


def test_include_runs_three_ranks_on_exactly_those_slots(demo_chain, hpcjobs, demo_assets):
    """hpcjobs submit llama2-lora --nodes 2 --profile local --include 'node1:0,1@node2:0'
    (from the converted model of the first chain: convert passes a Hugging Face model through)."""
    sub, _, _ = demo_chain
    sub2 = hpcjobs.json("submit", "llama2-lora", "--nodes", "2", "--profile", "local",
                        "--include", "node1:0,1@node2:0", "--config", demo_assets / "demo.yaml",
                        "--name", "include3", f"model.source={Path(sub['run_dir']) / 'hf-model'}",
                        "finetune.max_steps=6", "finetune.save_steps=3", "finetune.micro_batch_size=2")
    final = wait_chain(hpcjobs, sub2["chain"], timeout=600)
    assert final["state"] == "COMPLETED", final
    ft = next(s for s in final["stages"] if s["name"] == "finetune")
    assert ft["nodes"] == "node[1-2]"
    log = Path(ft["log"]).read_text()
    ranks = set(re.findall(r"rank=(\d) world_size=(\d) local_rank=(\d) .*hostname=(\S+) .*visible_devices=(\S+)", log))
    assert ranks == {("0", "3", "0", "node1", "0,1"), ("1", "3", "1", "node1", "0,1"),
                     ("2", "3", "0", "node2", "0")}, ranks
    ds = json.loads((Path(sub2["run_dir"]) / "stages/finetune/attempt-1/ds_config.json").read_text())
    assert ds["train_batch_size"] == 3 * 2
    script = (Path(sub2["run_dir"]) / "stages/finetune/attempt-1/job.sbatch").read_text()
    assert "#SBATCH --nodelist=node1,node2" in script and "#SBATCH --gpus-per-node=2" in script


def test_hostfile_picks_hosts_and_slots(demo_chain, hpcjobs, demo_assets, tmp_path):
    """--hostfile with uneven slots: Slurm is asked for exactly those hosts, ranks follow the slots."""
    sub, _, _ = demo_chain
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# DeepSpeed's format\nnode1 slots=2\nnode2 slots=1\n")
    model = Path(sub["run_dir"]) / "hf-model"
    sub2 = hpcjobs.json("submit", FIXTURES / "finetune-only.yaml", "--profile", "local", "--name", "hostfile3",
                        "--hostfile", hostfile, f"finetune.model={model}",
                        f"data.path={demo_assets / 'dialogues.parquet'}")
    final = wait_chain(hpcjobs, sub2["chain"], timeout=600)
    assert final["state"] == "COMPLETED", final
    attempt = Path(sub2["run_dir"]) / "stages/finetune/attempt-1"
    assert (attempt / "hostfile").read_text() == "node1 slots=2\nnode2 slots=1\n"
    log = Path(final["stages"][0]["log"]).read_text()
    hosts = sorted(re.findall(r"rank=\d world_size=3 local_rank=\d .*hostname=(\S+)", log))
    assert hosts == ["node1", "node1", "node2"], log[-2000:]
