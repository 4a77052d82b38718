"""Reading the finetune stage's progress.jsonl (what `watch` shows)."""

from __future__ import annotations

import json

from hpcjobs import progress


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_progress_line_rate_and_eta(tmp_path):
    p = tmp_path / "progress.jsonl"
    _write(p, [
        {"time": 100.0, "event": "start", "step": 0, "max_steps": 100},
        {"time": 101.0, "step": 10, "max_steps": 100, "loss": 2.5, "learning_rate": 1e-3},
        {"time": 103.0, "step": 30, "max_steps": 100, "loss": 2.0, "learning_rate": 9e-4,
         "samples_per_second": 80.0},
        {"time": 103.5, "step": 30, "max_steps": 100, "eval_loss": 2.2},
    ])
    pr = progress.read(p)
    assert (pr.step, pr.max_steps, pr.loss, pr.learning_rate) == (30, 100, 2.0, 9e-4)
    assert pr.steps_per_second == 10.0 and pr.eta_seconds == 7.0
    assert pr.line() == "step 30/100, loss 2.0000, lr 9.00e-04, 80.0 samples/s, ETA 7s"


def test_a_requeued_run_starts_over_and_says_where_it_resumed(tmp_path):
    p = tmp_path / "progress.jsonl"
    _write(p, [
        {"time": 1.0, "event": "start", "step": 0, "max_steps": 50},
        {"time": 2.0, "step": 20, "max_steps": 50, "loss": 3.0, "learning_rate": 1e-3},
        {"time": 2.5, "event": "preempted", "step": 20},
        {"time": 9.0, "event": "start", "step": 20, "max_steps": 50},
        {"time": 10.0, "step": 30, "max_steps": 50, "loss": 2.0, "learning_rate": 5e-4},
    ])
    pr = progress.read(p)
    assert pr.resumed_from == 20 and pr.step == 30 and pr.event == "start"
    assert "resumed at step 20" in pr.line()


def test_missing_or_partial_file(tmp_path):
    assert progress.read(tmp_path / "nope.jsonl") is None
    p = tmp_path / "progress.jsonl"
    p.write_text('{"time": 1.0, "event": "start", "step": 0, "max_steps": 5}\n{"time": 2.0, "st')
    pr = progress.read(p)
    assert pr.step == 0 and pr.loss is None and pr.line() == "step 0/5"
