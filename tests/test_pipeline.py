"""The llama2-lora chain for real on the devcluster: convert and prepare side by side, 2-node DeepSpeed
finetune, merge, evaluate."""

from __future__ import annotations

import html
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


def _times(run: Path, stage: str):
    started = json.loads((run / "stages" / stage / "attempt-1" / "started.json").read_text())
    ended = json.loads((run / "stages" / stage / "attempt-1" / "marker.json").read_text())
    assert ended["exit_code"] == 0
    return started["time"], ended["time"]


def test_five_jobs_complete_in_order(demo_chain):
    sub, watch, final = demo_chain
    assert list(sub["jobs"]) == ["convert", "prepare", "finetune", "merge", "evaluate"]
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert final["state"] == "COMPLETED", final
    run = Path(sub["run_dir"])
    times = {stage: _times(run, stage) for stage in sub["jobs"]}
    # finetune waits for both convert and prepare; then merge, then evaluate
    for before, after in (("convert", "finetune"), ("prepare", "finetune"), ("finetune", "merge"),
                          ("merge", "evaluate")):
        assert times[after][0] >= times[before][1], (before, after, times)


def test_prepare_ran_beside_convert(demo_chain):
    """No dependency between them: released together, their runs overlap (the jobs' own start/end
    records), and finetune's dependency names both."""
    sub, _, final = demo_chain
    run = Path(sub["run_dir"])
    (c_start, c_end), (p_start, p_end) = _times(run, "convert"), _times(run, "prepare")
    assert p_start <= c_end and c_start <= p_end, {"convert": (c_start, c_end), "prepare": (p_start, p_end)}
    chain = json.loads((run / "chain.json").read_text())
    after = {st["name"]: st["after"] for st in chain["stages"]}
    assert after["prepare"] == [] and after["finetune"] == ["convert", "prepare"]
    assert "--dependency=afterok:${JOB_convert}:${JOB_prepare}" in (run / "submit.sh").read_text()


def test_finetune_loaded_the_prepared_tokens(demo_chain):
    """Finetune did not tokenize; prepare's tokens (its tokenizer built from tokenizer.model
    without waiting for convert) are those of the converted model's tokenizer."""
    from transformers import AutoTokenizer

    from hpcjobs.train.prepare import load_prepared

    sub, _, final = demo_chain
    run = Path(sub["run_dir"])
    log = Path(next(s for s in final["stages"] if s["name"] == "finetune")["log"]).read_text()
    assert f"data: loaded prepared dataset {run / 'prepared'}" in log
    assert "Tokenizing" not in log and "Adding EOS" not in log
    tok = AutoTokenizer.from_pretrained(str(run / "hf-model"))
    train = load_prepared(run / "prepared")["train"]
    for row in train.select(range(20)):
        want = tok(text=row["text"] + tok.eos_token)["input_ids"][:128]
        assert row["input_ids"] == want and row["labels"] == want   # whole text, every token trained


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


def _training_attempts(sub, final):
    """(stage, attempt dir) of every attempt of the chain's training stages."""
    run = Path(sub["run_dir"])
    for s in final["stages"]:
        if s["kind"] in ("finetune", "script"):
            for adir in sorted((run / "stages" / s["name"]).glob("attempt-*")):
                yield s, adir


def test_tensorboard_curves_of_every_training_attempt(demo_chain):
    """report_to defaults to tensorboard: one run per stage and attempt under <run dir>/tensorboard,
    holding the scalars of every logging step that progress.jsonl has; the log says where."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sub, _, final = demo_chain
    run = Path(sub["run_dir"])
    attempts = list(_training_attempts(sub, final))
    assert [(s["name"], a.name) for s, a in attempts] == [("finetune", "attempt-1")]
    for s, adir in attempts:
        tb = run / "tensorboard" / s["name"] / adir.name
        assert list(tb.glob("events.out.tfevents.*")), sorted(run.rglob("*tfevents*"))
        events = EventAccumulator(str(tb))
        events.Reload()
        logged = [json.loads(line) for line in (adir / "progress.jsonl").read_text().splitlines()]
        logged = [r for r in logged if "loss" in r and "event" not in r]
        assert len(logged) >= 20, logged   # logging_steps 2 over 40 steps, and step 1
        for key in ("loss", "learning_rate", "grad_norm"):
            scalars = events.Scalars(f"train/{key}")
            assert [e.step for e in scalars] == [r["step"] for r in logged], key
            for e, r in zip(scalars, logged):   # TensorBoard stores float32
                assert e.value == pytest.approx(r[key], rel=1e-6, abs=1e-12), (key, e.step)
        lines = [line for line in Path(s["log"]).read_text().splitlines() if "[hpcjobs.finetune]" in line]
        curves = f"[hpcjobs.finetune] curves: tensorboard --logdir {run / 'tensorboard'} (this run: finetune/attempt-1)"
        assert curves in lines, lines[:5]
        # among rank 0's first lines: before torch.distributed is even set up
        assert lines.index(curves) < next(i for i, line in enumerate(lines) if "] distributed: rank=0 " in line)


def test_measured_memory_of_every_rank(demo_chain, hpcjobs):
    """memory_measured.json: one entry per rank of the 2-node ZeRO-2 finetune, with the model states
    each rank holds counted from its tensors; status shows it (next to the plan's prediction)."""
    from safetensors import safe_open

    sub, _, final = demo_chain
    run = Path(sub["run_dir"])
    adir = run / "stages/finetune/attempt-1"
    ranks = json.loads((adir / "memory_measured.json").read_text())["ranks"]
    assert [(r["rank"], r["host"], r["device"]) for r in ranks] == [(0, "node1", "cpu"), (1, "node2", "cpu")]
    assert all(r["max_allocated"] is None and r["max_reserved"] is None for r in ranks)
    assert all(200 * 2 ** 20 < r["peak_rss"] < 16 * 2 ** 30 for r in ranks), ranks  # torch alone is ~300 MiB

    def numel(path):
        with safe_open(str(path), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    base = sum(numel(p) for p in (run / "hf-model").glob("*.safetensors"))
    lora = numel(run / "adapter" / "adapter_model.safetensors")   # the adapter's parameters
    # fp32 on CPU, ZeRO-2 over 2 ranks. Every rank holds the frozen base weights (4 bytes each)
    # and DeepSpeed's flat buffer of the whole adapter (4T); of its half of the adapter, the fp32
    # master copy, that copy's gradient and Adam's two moments (4 x 4T/2); and Adam's step counter
    # (a float32 scalar for DeepSpeed's one flat partition).
    expected = 4 * base + 4 * lora + 4 * 4 * lora // 2 + 4
    assert [r["model_state_bytes"] for r in ranks] == [expected, expected], (base, lora)

    ft = next(s for s in final["stages"] if s["name"] == "finetune")
    measured = ft["memory"]["measured"]
    assert measured["ranks"] == 2 and measured["model_state_bytes"] == max(r["model_state_bytes"] for r in ranks)
    shown = hpcjobs("status", sub["chain"]).stdout
    line = next(line for line in shown.splitlines() if line.startswith("finetune: memory:"))
    assert "measured (cpu, max of 2 ranks): model states " in line and ", peak RSS " in line, line
    # next to the prediction render wrote (memory_plan.json): the same model states within 10%
    # (mostly the frozen base weights; the two count ZeRO-2's share of the adapter's states differently)
    predicted = ft["memory"]["predicted"]
    assert line.startswith("finetune: memory: predicted ") and predicted["peak_per_rank"] > 0, line
    assert 0.9 < measured["model_state_bytes"] / predicted["model_states"] < 1.1, ft["memory"]


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


def test_report_of_the_finished_chain(demo_chain, tmp_path):
    """`watch` wrote the chain's HTML report when the chain ended; `hpcjobs report` rewrites it
    without the training stack. In headless Chromium it loads with no console output and no
    request, one timeline bar per attempt, one loss point per logged step, the accounting and
    the evaluation's numbers. The screenshot is left in tmp_path."""
    from reportcheck import check_report, drawn_points, logged_steps, timeline_bars

    sub, watch, _ = demo_chain
    run = Path(sub["run_dir"])
    page = run / "report.html"
    assert f"report: {page}\n" in watch.stdout, watch.stdout[-2000:]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hpcjobs", "report", sub["chain"]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"{page}\n", proc.stderr[-2000:]
    imported = {m.group(1).split(".")[0] for m in re.finditer(r"\|\s+(\S+)$", proc.stderr, re.M)}
    assert not imported & {"torch", "deepspeed", "transformers", "peft", "trl", "datasets", "matplotlib"}

    opened = check_report(page, tmp_path)
    assert timeline_bars(opened.dom) == {f"{stage}/1": "COMPLETED" for stage in sub["jobs"]}
    logged = logged_steps(run / "stages/finetune/attempt-1/progress.jsonl")
    assert logged >= 10 and drawn_points(opened.dom, "chart-finetune-loss")["loss/1"] == logged
    row = re.search(r'<tr data-attempt="finetune/1">(.*?)</tr>', opened.dom, re.S).group(1)
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    # stage, attempt, job, state, nodes, nodes x GPUs, queue wait, elapsed, GPU-hours, CPU time, peak host memory
    assert cells[2] == sub["jobs"]["finetune"] and cells[4] == "node[1-2]" and cells[5] == "2 × 1", cells
    assert all(c != "—" for c in cells[6:11]), cells
    evaluation = json.loads((run / "eval" / "report.json").read_text())
    assert f"{evaluation['eval_loss']['merged']:.4g}" in opened.dom
    assert evaluation["samples"][0]["prompt"][:40] in html.unescape(opened.dom)
