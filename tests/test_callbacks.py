"""hpcjobs.train.callbacks: HpcjobsCallback in a user's own HF Trainer script.

Real Trainer runs of fixtures/scripts/hf_trainer_hpcjobs.py (a tiny Llama learning to
count, on the CPU) in subprocesses with the environment a script stage's job gives them
(HPCJOBS_ATTEMPT_DIR, HPCJOBS_PROGRESS_FILE, HPCJOBS_PREEMPT_FILE): progress.jsonl as
`hpcjobs watch` reads it, a time-limit warning mid-run (the flag file, or SIGUSR2 to one
rank of two) ending every rank with a checkpoint and exit code 75, and the next run
resuming from that checkpoint's global step.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcjobs import progress

pytestmark = pytest.mark.train

SCRIPT = Path(__file__).resolve().parent / "fixtures" / "scripts" / "hf_trainer_hpcjobs.py"
ENV_KEYS = ("HPCJOBS_ATTEMPT_DIR", "HPCJOBS_PROGRESS_FILE", "HPCJOBS_PREEMPT_FILE")


def _records(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _steps(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r and "event" not in r]


def _job_env(attempt: Path, **extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HPCJOBS_ATTEMPT_DIR=str(attempt),
               HPCJOBS_PROGRESS_FILE=str(attempt / "progress.jsonl"), HPCJOBS_PREEMPT_FILE=str(attempt / "preempt"))
    env.update(extra)
    return env


def _command(out: Path, result: Path, max_steps: int, *extra: str, report_to: str = "none") -> list[str]:
    return [sys.executable, str(SCRIPT), "--output_dir", str(out), "--out", str(result),
            "--max_steps", str(max_steps), "--logging_steps", "1", "--save_steps", "1000",
            "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--report_to", report_to, *extra]


def _model_state_bytes_of_full_fp32_adam(checkpoint: Path) -> int:
    """What a rank of a plain (DDP or single-process) fp32 full finetune with torch AdamW holds:
    weights, gradients and Adam's two moments (4 + 4 + 8 bytes a parameter), and Adam's step
    counter, a float32 scalar per parameter tensor."""
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    return sum(16 * math.prod(shape) + 4 for shape in shapes)


def _run_until_step(procs, progress_file: Path, step: int, then, timeout: float = 240) -> list[int]:
    """Wait for a progress record at ``step`` or later, call ``then()`` once, wait for every process."""
    deadline = time.monotonic() + timeout
    fired = False
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError("training did not finish in time")
        if not fired and any(r["step"] >= step for r in _steps(_records(progress_file))):
            then()
            fired = True
        time.sleep(0.05)
    assert fired, "training ended before the preemption was requested"
    return [p.wait() for p in procs]


# ---------------------------------------------------------------------------- resume_checkpoint


def test_resume_checkpoint_takes_the_latest_complete_one(tmp_path, capsys):
    from hpcjobs.train.callbacks import resume_checkpoint

    assert resume_checkpoint(tmp_path / "missing") is None
    assert resume_checkpoint(tmp_path) is None
    for name in ("checkpoint-5", "checkpoint-40", "checkpoint-100", "checkpoint-x", "checkpoint-7.bak"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-5", "checkpoint-40", "checkpoint-x", "checkpoint-7.bak"):
        (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-200").write_text("a file")
    # checkpoint-100 was cut short (no trainer_state.json): numeric order, not text order
    assert resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-40")
    assert "skipping incomplete checkpoint" in capsys.readouterr().out


# ---------------------------------------------------------------------------- outside hpcjobs


def test_outside_hpcjobs_it_writes_nothing_and_training_completes(tmp_path, monkeypatch):
    """In-process: no HPCJOBS_* variables, no files besides the Trainer's, no SIGUSR2 handler."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    before = signal.getsignal(signal.SIGUSR2)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hpcjobs.train.callbacks import HpcjobsCallback, preempted

    cb = HpcjobsCallback()
    assert cb.progress_file is None and cb.preempt_file is None and not cb._watching  # no per-step all-reduce
    assert signal.getsignal(signal.SIGUSR2) is before
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    data = [{"input_ids": torch.arange(8) % 32, "labels": torch.arange(8) % 32} for _ in range(16)]
    monkeypatch.chdir(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 3 and not preempted() and cb.stopped_at is None
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["out"])
    assert not any(tmp_path.rglob("*.jsonl"))


# ---------------------------------------------------------------------------- single process


def test_preempt_by_flag_file_then_resume_at_that_step(tmp_path):
    attempt, out, result = tmp_path / "attempt", tmp_path / "out", tmp_path / "result.json"
    attempt.mkdir()
    pfile = attempt / "progress.jsonl"
    log = open(tmp_path / "run1.log", "wb")
    # run 1: the job script touches the flag file at step >= 5; the script calls exit_if_preempted()
    # itself (exit_on_preempt=False), so trainer.train() returned normally first
    # the curves go where a script stage's job points TENSORBOARD_LOGGING_DIR
    tb = tmp_path / "run" / "tensorboard" / "train" / "attempt-1"
    p = subprocess.Popen(_command(out, result, 40, "--step_sleep", "0.1", "--exit_on_preempt", "false",
                                  report_to="tensorboard"),
                         env=_job_env(attempt, TENSORBOARD_LOGGING_DIR=str(tb)), stdout=log, stderr=subprocess.STDOUT)
    rc = _run_until_step([p], pfile, 5, lambda: (attempt / "preempt").touch())
    text1 = (tmp_path / "run1.log").read_text()
    assert rc == [75], text1[-3000:]
    assert not result.exists()  # the code after exit_if_preempted() did not run
    assert f"[hpcjobs] curves: tensorboard --logdir {tmp_path / 'run' / 'tensorboard'} (this run: train/attempt-1)" \
        in text1

    recs = _records(pfile)
    assert recs[0]["event"] == "start" and recs[0]["step"] == 0 and recs[0]["max_steps"] == 40
    assert recs[0]["resumed_from"] is None and recs[0]["world_size"] == 1 and recs[0]["global_batch_size"] == 8
    steps = _steps(recs)
    numbers = [r["step"] for r in steps]
    assert numbers == list(range(1, len(numbers) + 1)) and numbers[-1] >= 5
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3   # the model learns
    assert all(r["max_steps"] == 40 and r["learning_rate"] > 0 and r["samples_per_second"] > 0 for r in steps)
    stopped = numbers[-1]
    ckpt = out / f"checkpoint-{stopped}"
    assert [(r["event"], r["step"]) for r in recs if "event" in r] == [("start", 0), ("checkpoint", stopped),
                                                                      ("preempted", stopped)]
    assert recs[-1]["checkpoint"] == str(ckpt) and recs[-1]["max_steps"] == 40
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == stopped
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "scheduler.pt").is_file()
    seen = progress.read(pfile)
    assert (seen.step, seen.event) == (stopped, "preempted")
    # the same run seen through the Trainer's own output (what `watch` shows without the callback)
    from_log = progress.from_trainer_log(text1)
    assert from_log.max_steps == 40 and stopped - 2 <= from_log.step <= stopped
    assert "[hpcjobs] preempted: checkpoint" in text1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == \
        [(r["step"], r["loss"]) for r in steps]
    # measured at the time-limit checkpoint, counted from the tensors
    measured = json.loads((attempt / "memory_measured.json").read_text())["ranks"]
    assert [(r["rank"], r["device"], r["max_allocated"]) for r in measured] == [(0, "cpu", None)]
    assert measured[0]["model_state_bytes"] == _model_state_bytes_of_full_fp32_adam(ckpt)
    assert measured[0]["peak_rss"] > 100 * 2 ** 20

    # run 2: a requeue (the job script removes the old flag) resumes from resume_checkpoint(output_dir)
    (attempt / "preempt").unlink()
    log = open(tmp_path / "run2.log", "wb")
    p = subprocess.run(_command(out, result, 40), env=_job_env(attempt), stdout=log, stderr=subprocess.STDOUT,
                       timeout=300)
    assert p.returncode == 0, (tmp_path / "run2.log").read_text()[-3000:]
    res = json.loads(result.read_text())
    assert res["resumed_from"] == str(ckpt) and res["start_step"] == stopped and res["global_step"] == 40
    # the Trainer's log history, restored from the checkpoint and continued: every step once
    assert [step for step, _ in res["losses"]] == list(range(1, 41))
    recs = _records(pfile)
    run2 = recs[[i for i, r in enumerate(recs) if r.get("event") == "start"][-1]:]
    assert run2[0]["step"] == stopped and run2[0]["resumed_from"] == str(ckpt)
    assert [r["step"] for r in _steps(run2)] == list(range(stopped + 1, 41))
    assert [r.get("event") for r in run2 if "event" in r] == ["start", "checkpoint", "end"]
    assert run2[-1]["step"] == 40 and run2[-1]["train_loss"] > 0 and "train_runtime" in run2[-1]
    seen = progress.read(pfile)
    assert (seen.step, seen.max_steps, seen.resumed_from, seen.event) == (40, 40, stopped, "end")
    assert _steps(run2)[-1]["loss"] < steps[0]["loss"] - 1.0


# ---------------------------------------------------------------------------- two ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine", ["ddp", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_two_ranks_sigusr2_to_one_rank_stops_both_at_one_step(tmp_path, engine):
    """torch.distributed from the environment, as the srun launcher starts ranks (gloo on CPU),
    plain DDP or DeepSpeed ZeRO-2 (``--deepspeed ds.json``); SIGUSR2 reaches rank 1 only and no
    flag file exists: the all-reduce tells rank 0, both save their part and exit 75."""
    attempt, out, result = tmp_path / "attempt", tmp_path / "out", tmp_path / "result.json"
    attempt.mkdir()
    port = str(_free_port())
    extra = ["--step_sleep", "0.1", "--per_device_train_batch_size", "4"]
    if engine == "deepspeed":
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                  "train_batch_size": "auto", "gradient_clipping": "auto",
                                  "zero_optimization": {"stage": 2}}))
        extra += ["--deepspeed", str(ds)]
    procs = []
    for rank in range(2):
        env = _job_env(attempt, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            _command(out, result, 40, *extra), env=env, stdout=open(tmp_path / f"rank{rank}.log", "wb"), stderr=subprocess.STDOUT))
    rcs = _run_until_step(procs, attempt / "progress.jsonl", 4, lambda: procs[1].send_signal(signal.SIGUSR2))
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert rcs == [75, 75], "\n\n".join(x[-2000:] for x in logs)
    assert not (attempt / "preempt").exists() and not result.exists()
    recs = _records(attempt / "progress.jsonl")  # rank 0 only: one line per step
    numbers = [r["step"] for r in _steps(recs)]
    assert numbers == list(range(1, len(numbers) + 1))
    stopped = numbers[-1]
    assert recs[0]["world_size"] == 2 and recs[0]["global_batch_size"] == 8
    assert [(r["event"], r["step"]) for r in recs if "event" in r] == [("start", 0), ("checkpoint", stopped),
                                                                      ("preempted", stopped)]
    ckpt = out / f"checkpoint-{stopped}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == stopped
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    if engine == "deepspeed":  # the engine's own state (ZeRO partitions of both ranks)
        assert (ckpt / "latest").read_text().strip() == f"global_step{stopped}"
        assert len(list((ckpt / f"global_step{stopped}").glob("*optim_states.pt"))) == 2
    assert "on another rank" in logs[0]
    # each rank's measured memory, gathered to rank 0 at the time-limit checkpoint
    measured = json.loads((attempt / "memory_measured.json").read_text())["ranks"]
    assert [r["rank"] for r in measured] == [0, 1]
    if engine == "ddp":   # every rank holds the whole model and optimizer
        want = _model_state_bytes_of_full_fp32_adam(ckpt)
        assert [r["model_state_bytes"] for r in measured] == [want, want]
    else:   # ZeRO-2: each rank its half of the optimizer states, the same on both (an even split)
        assert 0 < measured[0]["model_state_bytes"] == measured[1]["model_state_bytes"]
    assert (out / "saves.txt").read_text() == f"{stopped}\n"  # a callback after ours saw the save before the exit
