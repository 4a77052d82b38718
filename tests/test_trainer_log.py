"""Progress read from what an unmodified HF Trainer prints (hpcjobs.progress.from_trainer_log).

The fixtures under fixtures/trainer_logs/ are real output, stdout and stderr in one file as
in a Slurm log (transformers 5.24, tqdm bars drawn with \\r):

* ``eval_1rank.log``: ``PYTHONUNBUFFERED=1 python scripts/hf_trainer_hpcjobs.py --max_steps 30
  --logging_steps 5 --eval_strategy steps --eval_steps 10 --eval_samples 96
  --per_device_eval_batch_size 4 --save_steps 15 --learning_rate 5e-3
  --per_device_train_batch_size 8 --step_sleep 0.05`` outside hpcjobs (no HPCJOBS_* variables:
  the Trainer's own output only). Training bar x/30, evaluation bars x/24, "Writing model
  shards" bars; losses at steps 5..30: 3.767 3.16 2.802 2.48 2.229 2.12.
* ``torchrun_tee_2ranks.log``: ``torchrun --nproc-per-node 2 --tee 3 scripts/hf_trainer.py
  --max_steps 20 --logging_steps 5 --learning_rate 5e-3 --per_device_train_batch_size 4``:
  every line labelled ``[default0]:``/``[default1]:`` (and torch's ``[rank1]:``); losses
  3.746 3.181 2.851 2.662.

The test marked ``train`` runs a Trainer now and reads its live output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcjobs import progress
from hpcjobs.progress import from_trainer_log

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LOGS = FIXTURES / "trainer_logs"
EVAL_LOSSES = [3.767, 3.16, 2.802, 2.48, 2.229, 2.12]


def _text(name: str) -> str:
    return (LOGS / name).read_bytes().decode("utf-8")


def test_a_finished_run_with_evaluation():
    p = from_trainer_log(_text("eval_1rank.log"))
    assert (p.step, p.max_steps) == (30, 30)          # the x/24 evaluation bars are not the training bar
    assert (p.loss, p.learning_rate) == (2.12, 0.0001667)
    assert p.eta_seconds == 0 and p.steps_per_second > 0
    assert p.event == "end"                           # the train_runtime summary came last
    assert p.line().startswith("step 30/30, loss 2.1200, lr 1.67e-04, ")


def test_cut_anywhere_gives_the_state_at_that_moment():
    text = _text("eval_1rank.log")
    # during the first evaluation (training bar at 10/30, evaluation bar at 12/24)
    p = from_trainer_log(text[:text.index("12/24") + 40])
    assert (p.step, p.max_steps, p.loss, p.learning_rate, p.event) == (10, 30, 3.16, 0.0035, None)
    assert p.eta_seconds == 5.0 and p.steps_per_second == 3.9
    # "11/30 [00:05<00:21,  1.11s/it]": seconds per step
    p = from_trainer_log(text[:text.index("11/30") + 40])
    assert p.step == 11 and p.steps_per_second == pytest.approx(1 / 1.11) and p.eta_seconds == 21.0
    # before the first log dict: a step but no loss yet
    p = from_trainer_log(text[:text.index("{'loss'")])
    assert p.step == 5 and p.loss is None and p.max_steps == 30
    # each cut of the real log: steps never go back and the loss is one the Trainer printed
    last = 0
    for cut in range(200, len(text), 97):
        p = from_trainer_log(text[:cut])
        assert p is not None and p.max_steps == 30 and p.step >= last
        assert p.loss is None or p.loss in EVAL_LOSSES
        last = p.step


def test_torchrun_rank_labels():
    p = from_trainer_log(_text("torchrun_tee_2ranks.log"))
    assert (p.step, p.max_steps, p.loss, p.learning_rate, p.event) == (20, 20, 2.662, 0.00025, "end")


def test_srun_label_and_pdsh_hostname_prefixes():
    text = _text("eval_1rank.log")
    for label in ("0: ", " 3: ", "node1: ", "[rank0]: "):
        labelled = "".join(label + line for line in text.splitlines(True))
        p = from_trainer_log(labelled)
        assert (p.step, p.max_steps, p.loss) == (30, 30, 2.12), label


def test_older_transformers_print_plain_floats_and_several_ranks_print():
    text = (
        "Map: 100%|██████████| 256/256 [00:00<00:00, 9000.00 examples/s]\n"
        "Loading checkpoint shards: 100%|██████████| 2/2 [00:03<00:00,  1.50s/it]\n"
        "  0%|          | 0/400 [00:00<?, ?it/s]\r 10%|█         | 40/400 [01:00<09:00,  1.50s/it]\n"
        "0: {'loss': 2.31, 'grad_norm': 0.5, 'learning_rate': 4e-05, 'epoch': 0.5}\n"
        "8: {'loss': 2.31, 'grad_norm': 0.5, 'learning_rate': 4e-05, 'epoch': 0.5}\n"
        "\r 11%|█         | 44/400 [01:06<1:02:03,  0.67it/s]\n"
    )
    p = from_trainer_log(text)
    assert (p.step, p.max_steps, p.loss, p.learning_rate) == (44, 400, 2.31, 4e-05)
    assert p.eta_seconds == 3723.0 and p.steps_per_second == 0.67
    assert p.line() == "step 44/400, loss 2.3100, lr 4.00e-05, 0.67 steps/s, ETA 1h02m"


def test_eval_dicts_nan_loss_and_no_bar():
    # disable_tqdm=True: PrinterCallback's dicts only; the step is unknown
    p = from_trainer_log("{'loss': nan, 'learning_rate': 0.001, 'epoch': 0.1}\n"
                         "{'eval_loss': 1.5, 'epoch': 0.1}\n")
    assert (p.step, p.max_steps, p.loss, p.learning_rate) == (0, None, None, 0.001)
    p = from_trainer_log("{'loss': '1.25', 'grad_norm': '0.3', 'learning_rate': '2e-05', 'epoch': '1'}\n")
    assert (p.loss, p.learning_rate) == (1.25, 2e-05)


@pytest.mark.parametrize("text", ["", "hello\nworld\n", "Map: 100%|███| 256/256 [00:00<00:00, 9000.00 examples/s]\n",
                                  "{'eval_loss': 1.5}\n", "Writing model shards: 50%|█ | 1/2 [00:00<00:00, 2.0it/s]"])
def test_nothing_recognised(text):
    assert from_trainer_log(text) is None


def test_for_attempt_prefers_progress_jsonl(tmp_path):
    log = tmp_path / "slurm.log"
    log.write_bytes((LOGS / "eval_1rank.log").read_bytes())
    attempt = tmp_path / "attempt"
    attempt.mkdir()
    assert progress.for_attempt(attempt, None) is None
    assert progress.for_attempt(attempt, tmp_path / "missing.log") is None
    assert progress.for_attempt(attempt, log).step == 30          # no progress.jsonl: the log
    (attempt / "progress.jsonl").write_text("")
    assert progress.for_attempt(attempt, log).step == 30          # empty: the log
    (attempt / "progress.jsonl").write_text(json.dumps({"time": 1.0, "event": "start", "step": 7, "max_steps": 9}) + "\n")
    p = progress.for_attempt(attempt, log)
    assert (p.step, p.max_steps, p.resumed_from) == (7, 9, 7)     # the callback's file wins


def test_for_attempt_reads_head_and_tail_of_a_huge_log(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "_LOG_WHOLE", 4096)
    monkeypatch.setattr(progress, "_LOG_HEAD", 1024)
    monkeypatch.setattr(progress, "_LOG_TAIL", 2048)
    log = tmp_path / "slurm.log"
    log.write_text("  0%|          | 0/500 [00:00<?, ?it/s]\n" + "x" * 20000 + "\n"
                   + "{'loss': '0.5', 'learning_rate': '1e-05', 'epoch': '2'}\n 90%|█████████ | 450/500 [10:00<01:06, 0.75it/s]\n")
    p = progress.for_attempt(tmp_path, log)
    assert (p.step, p.max_steps, p.loss) == (450, 500, 0.5)


@pytest.mark.train
def test_a_live_trainer_run(tmp_path):
    """hf_trainer.py (an unmodified Trainer script) run now, stdout and stderr into one file."""
    out = tmp_path / "result.json"
    log = tmp_path / "slurm.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("HPCJOBS_ATTEMPT_DIR", "HPCJOBS_PROGRESS_FILE", "HPCJOBS_PREEMPT_FILE"):
        env.pop(key, None)
    with open(log, "wb") as fh:
        proc = subprocess.run(
            [sys.executable, str(FIXTURES / "scripts" / "hf_trainer.py"), "--output_dir", str(tmp_path / "out"),
             "--out", str(out), "--max_steps", "24", "--logging_steps", "4", "--per_device_train_batch_size", "8",
             "--learning_rate", "5e-3", "--report_to", "none", "--save_strategy", "no"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    result = json.loads(out.read_text())
    p = from_trainer_log(text)
    assert (p.step, p.max_steps, p.event) == (result["global_step"], 24, "end")
    assert p.loss == pytest.approx(result["losses"][-1], rel=1e-3)   # printed with 4 significant digits
    assert p.learning_rate is not None and p.steps_per_second > 0
    # cut after the second log dict and the bar tqdm redraws below it: step 8 and its loss
    # (tqdm redraws at most every 0.1 s, so the bar just before a dict may lag behind)
    second = text.index("{'loss'", text.index("{'loss'") + 1)
    p = from_trainer_log(text[:text.index("it/s]", second) + 5])
    assert p.loss == pytest.approx(result["losses"][1], rel=1e-3) and 8 <= p.step < 24
