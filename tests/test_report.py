"""`hpcjobs report` on a synthetic run directory: the data model, the page, and the page in Chromium.

No cluster: the chain record, the attempts' files and sacct's output are written here; the
real chains are reported in test_pipeline.py and test_faults.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from reportcheck import check_report, drawn_points, open_page, timeline_bars

from hpcjobs.records import Attempt, ChainRecord, StageRecord
from hpcjobs.report import collect, html
from hpcjobs.status import ChainStatus, StageStatus

T0 = 1796220000.0   # 2026-12-02T09:20:00Z
STEPS = 200


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _local(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%dT%H:%M:%S")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _progress(first: int, last: int, *, resumed: int = 0, tokens_seen: bool = False) -> str:
    lines = [{"time": T0, "event": "start", "step": resumed, "max_steps": STEPS, "resumed_from": None}]
    for s in range(first, last + 1):
        lines.append({"time": T0 + s, "step": s, "max_steps": STEPS, "loss": 7 - s / 100,
                      "learning_rate": 2e-4 * (1 - s / STEPS), "grad_norm": 0.5, "samples_per_second": 40.0})
        if tokens_seen:     # the Trainer's running count: the rate is derived (64 tokens per 1 s step)
            lines[-1]["num_input_tokens_seen"] = 64 * s
        else:
            lines[-1]["tokens_per_second"] = 5000.0 + s
        if s % 50 == 0:
            lines.append({"time": T0 + s, "step": s, "max_steps": STEPS, "epoch": 1.0, "eval_loss": 7.1 - s / 100})
    return "".join(json.dumps(x) + "\n" for x in lines)


def synthetic_chain(root: Path):
    """A 4-stage chain whose finetune failed at step 120 and was rerun from checkpoint 100 to 200."""
    run = root / "runs" / "syn-20261202-092000-abcd"
    stages = [("convert", []), ("finetune", ["convert"]), ("merge", ["finetune"]), ("evaluate", ["merge"])]
    recs, jid = [], 100
    for name, after in stages:
        attempts = [Attempt(1, str(jid), _iso(T0), ["--nodes 2"])]
        jid += 1
        if name == "finetune":
            attempts.append(Attempt(2, "200", _iso(T0 + 400), ["finetune.micro_batch_size=2"],
                                    note="rerun --from finetune"))
        recs.append(StageRecord(name, name, after, attempts))
    rec = ChainRecord(chain_id=run.name, name="syn", recipe="llama2-lora", recipe_path="/r.yaml", profile="local",
                      slurm_conf=None, run_dir=str(run), created=_iso(T0), overrides=["--nodes 2"], stages=recs,
                      submission="submitted")
    run.mkdir(parents=True)
    rec.save()
    cfg = f"run:\n  dir: /old/place/{run.name}\nevaluate:\n  output: /old/place/{run.name}/eval\n"
    _write(run / "config.yaml", cfg + "finetune:\n  micro_batch_size: 2\n")
    for name, _ in stages:
        _write(rec.attempt_dir(name, 1) / "job.sbatch", "#!/bin/bash\n#SBATCH --gpus-per-node=4\n")
    ft1, ft2 = rec.attempt_dir("finetune", 1), rec.attempt_dir("finetune", 2)
    _write(ft1 / "progress.jsonl", _progress(1, 120, tokens_seen=True))
    _write(ft2 / "progress.jsonl", _progress(101, STEPS, resumed=100))
    _write(ft1 / "train.json", json.dumps({"progress_file": str(ft1 / "progress.jsonl"),
                                           "train": {"micro_batch_size": 4}}))
    _write(ft2 / "train.json", json.dumps({"progress_file": str(ft2 / "progress.jsonl"),
                                           "train": {"micro_batch_size": 2}}))
    _write(ft2 / "job.sbatch", "#!/bin/bash\n#SBATCH --gpus-per-node=4\n")
    _write(ft2 / "slurm-200.out", "training\n")
    _write(ft2 / "memory_plan.json", json.dumps({"stage": "finetune", "gpu": {"peak": 30 * 2**30}}))
    _write(ft2 / "memory_measured.json", json.dumps({"ranks": [
        {"rank": 0, "host": "n1", "device": "cuda", "max_allocated": 28 * 2**30, "max_reserved": 29 * 2**30,
         "model_state_bytes": 1, "peak_rss": 5 * 2**30},
        {"rank": 1, "host": "n2", "device": "cuda", "max_allocated": 27 * 2**30, "max_reserved": None,
         "model_state_bytes": 1, "peak_rss": 6 * 2**30}]}))
    _write(run / "eval" / "report.json", json.dumps({
        "eval_loss": {"base": 6.5, "merged": 5.25}, "perplexity": {"base": 665.1, "merged": 190.6},
        "eval_examples": 30, "samples": [{"prompt": "Q: </script><b>hi</b>", "base": "x", "merged": "y",
                                          "reference": "z"}]}))
    _write(run / "eval" / "report.md", "# Evaluation\n")
    # sacct: finetune attempt 1 ran 2 nodes x 4 GPUs (tracked as gres/gpu) for 600 s and failed;
    # attempt 2 was requeued once (two runs); merge's job id belongs to another chain (reused id).
    rows = []

    def alloc(j, name, state, start, end, nodes="n[1-2]", nn=2, tres="billing=8,cpu=8,gres/gpu=8,node=2",
              cpu="01:00:00"):
        rows.append(f"{j}|{run.name}.{name}|{state}|{int(end - start)}|{nodes}|{nn}|{_local(start - 30)}|"
                    f"{_local(start)}|{_local(end)}|{tres}|{cpu}||")

    alloc(100, "convert", "COMPLETED", T0 + 10, T0 + 70, nodes="n1", nn=1, tres="cpu=2,node=1", cpu="00:50.500")
    rows.append(f"100.batch|batch|COMPLETED|60|n1|1|{_local(T0 + 10)}|{_local(T0 + 10)}|{_local(T0 + 70)}|"
                "cpu=2,mem=0,node=1|00:50.500|1536M|n1")
    alloc(101, "finetune", "FAILED", T0 + 100, T0 + 700)
    rows.append(f"101.0|python|FAILED|600|n[1-2]|2|{_local(T0 + 100)}|{_local(T0 + 100)}|{_local(T0 + 700)}|"
                "cpu=8,node=2|1-00:00:00|2097152K|n2")
    alloc(200, "finetune", "REQUEUED", T0 + 450, T0 + 500)
    alloc(200, "finetune", "COMPLETED", T0 + 560, T0 + 900)
    rows.append(f"102|other-chain.merge|COMPLETED|5|n1|1|{_local(T0)}|{_local(T0)}|{_local(T0 + 5)}|cpu=1|00:01||")
    acct = collect.parse_sacct("\n".join(rows) + "\n")
    statuses = [StageStatus("convert", "convert", 1, "100", "COMPLETED"),
                StageStatus("finetune", "finetune", 2, "200", "COMPLETED"),
                StageStatus("merge", "merge", 1, "102", "COMPLETED"),
                StageStatus("evaluate", "evaluate", 1, "103", "RUNNING")]
    return rec, ChainStatus(rec, statuses), acct


def test_parsers():
    assert collect.parse_size("503396K") == 503396 * 1024
    assert collect.parse_size("1.5G") == int(1.5 * 2**30)
    assert collect.parse_size("0") == 0 and collect.parse_size("") is None
    assert collect.parse_cpu_time("00:18.564") == 18.564
    assert collect.parse_cpu_time("1-02:03:04") == 86400 + 7384
    assert collect.parse_cpu_time("") is None


def test_model_of_a_rerun_chain(tmp_path):
    rec, cs, acct = synthetic_chain(tmp_path)
    assert [r.state for r in acct["200"]] == ["REQUEUED", "COMPLETED"]
    assert acct["101"][0].max_rss == 2 * 2**30 and acct["101"][0].max_rss_node == "n2"
    report = collect.build(cs, acct, now=T0 + 1000)
    by = {a.key: a for a in report.attempts}
    assert list(by) == ["convert/1", "finetune/1", "finetune/2", "merge/1", "evaluate/1"]
    ft1, ft2 = by["finetune/1"], by["finetune/2"]
    assert ft1.state == "FAILED" and ft2.state == "COMPLETED"
    assert ft1.gpus == 8 and math.isclose(ft1.gpu_hours, 600 * 8 / 3600)
    assert ft1.cpu_seconds == 3600 and ft1.queue_wait == 30 and ft1.elapsed == 600
    assert [r.state for r in ft2.runs] == ["REQUEUED", "COMPLETED"] and ft2.elapsed == 50 + 340
    assert ft2.gpu_mem_predicted == 30 * 2**30 and ft2.gpu_mem_measured == 28 * 2**30
    assert ft2.host_mem_measured == 6 * 2**30 and ft1.gpu_mem_predicted is None
    assert ft2.log == "stages/finetune/attempt-2/slurm-200.out"
    assert ("train.json:train.micro_batch_size", 4, 2) in ft2.changes
    assert not any("progress_file" in k for k, _, _ in ft2.changes)        # only the attempt dir differs
    # accounting tracks no gres/gpu for convert: the GPUs its script asked for, per node
    assert by["convert/1"].max_rss == 1536 * 2**20 and by["convert/1"].gpus == 4
    # merge's job id is another chain's in accounting: not taken; no marker either
    assert by["merge/1"].runs == [] and by["merge/1"].elapsed is None
    (t,) = report.training
    loss = next(c for c in t.curves if c.metric == "loss")
    assert [(s.attempt, len(s.points)) for s in loss.series] == [(1, 120), (2, 100)]
    assert loss.series[1].points[0] == (101, 7 - 101 / 100)
    assert {c.metric for c in t.curves} == {"loss", "eval_loss", "learning_rate", "grad_norm",
                                            "samples_per_second", "tokens_per_second"}
    tokens = next(c for c in t.curves if c.metric == "tokens_per_second")
    assert [len(s.points) for s in tokens.series] == [119, 100]     # no rate before the first interval
    assert tokens.series[0].points[0] == (2, 64.0) and tokens.series[1].points[0] == (101, 5101.0)
    assert [(m.step, m.label) for m in t.markers] == [(100, "attempt 2 resumed at step 100")]
    (res,) = report.results                        # found although the run dir was moved
    assert res.stage == "evaluate" and res.path == "eval/report.json" and res.data["eval_loss"]["merged"] == 5.25


def test_page_has_hooks_and_stays_small(tmp_path):
    rec, cs, acct = synthetic_chain(tmp_path)
    report = collect.build(cs, acct, now=T0 + 1000)
    page = html.render(report, Path(rec.run_dir), now=T0 + 1000)
    assert len(page.encode()) < 2 * 1024 * 1024
    assert timeline_bars(page) == {"convert/1": "COMPLETED", "finetune/1": "FAILED", "finetune/2": "COMPLETED",
                                   "merge/1": "COMPLETED", "evaluate/1": "RUNNING"}
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page,
                                re.S).group(1))
    loss = next(c for c in data["charts"] if c["id"] == "chart-finetune-loss")
    assert [(s["metric"], s["attempt"], len(s["steps"])) for s in loss["series"]] == [
        ("loss", 1, 120), ("loss", 2, 100), ("eval_loss", 1, 2), ("eval_loss", 2, 2)]
    assert "</script><b>" not in page and "&lt;/script&gt;&lt;b&gt;hi" in page   # sample text is escaped
    assert "30.0 GiB" in page and "28.0 GiB" in page and "1.333" in page      # predicted, measured, GPU-hours
    assert 'href="stages/finetune/attempt-2/slurm-200.out"' in page


def test_page_in_chromium(tmp_path):
    """The synthetic report in a real headless Chromium: loads clean, draws one point per logged step."""
    rec, cs, acct = synthetic_chain(tmp_path)
    report = collect.build(cs, acct, now=T0 + 1000)
    out = Path(rec.run_dir) / "report.html"
    out.write_text(html.render(report, out.parent, now=T0 + 1000))
    opened = check_report(out, tmp_path / "chromium")
    assert len(timeline_bars(opened.dom)) == 5
    assert drawn_points(opened.dom, "chart-finetune-loss") == {"loss/1": 120, "loss/2": 100,
                                                               "eval_loss/1": 2, "eval_loss/2": 2}
    assert 'data-charts-drawn="5"' in opened.dom


def test_the_checker_sees_console_output_and_requests(tmp_path):
    """The Chromium checks catch what they look for (else a clean report would prove nothing)."""
    page = tmp_path / "bad.html"
    page.write_text('<html><body><script>console.error("boom")</script>'
                    '<img src="http://example.invalid/x.png"></body></html>')
    opened = open_page(page, tmp_path / "chromium", screenshot=False)
    assert any('"boom"' in line for line in opened.console), opened.console
    assert any("example.invalid" in r for r in opened.requests), opened.requests
