"""hpcjobs.train.finetune: config contract, checkpoints, preemption, DeepSpeed ZeRO-2 on CPU.

The heavy tests run the real entry point in subprocesses, the way the Slurm job
does: ``python -m hpcjobs.train.finetune`` for a single process, and two
concurrent ``deepspeed --no_ssh --node_rank=0|1`` launchers (hostfile
``node1 slots=1`` / ``node2 slots=1``, master 127.0.0.1) for a 2-"node" ZeRO-2
run on CPU with gloo.

Preemption is exercised as Slurm does it: the launchers run with SIGUSR2
ignored (``trap '' USR2; exec deepspeed ...``, inherited by DeepSpeed's runner
and launch.py) and SIGUSR2 is sent to each launcher's whole process group; only
the ranks (which install a handler) react.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcjobs.errors import HpcjobsError
from hpcjobs.train import finetune as F
from hpcjobs.train import runtime as R

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "Description: {Description} Patient: {Patient} Doctor: {Doctor}"


# ----------------------------------------------------------------------------
# light tests (no torch)
# ----------------------------------------------------------------------------


def test_load_train_config_defaults_and_paths(tmp_path):
    (tmp_path / "train.json").write_text(
        json.dumps({"model_path": "model", "output_dir": "run/adapter", "data": {"path": "d.parquet"}})
    )
    cfg = F.load_train_config(tmp_path / "train.json")
    assert cfg["model_path"] == str(tmp_path / "model")  # relative to train.json's directory
    assert cfg["output_dir"] == str(tmp_path / "run" / "adapter")
    assert cfg["checkpoint_dir"] == str(tmp_path / "run" / "checkpoints")
    assert cfg["data"]["path"] == str(tmp_path / "d.parquet")
    assert cfg["resume"] == "auto" and cfg["deepspeed_config"] is None and cfg["progress_file"] is None
    assert cfg["lora"] == {"r": 8, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    assert cfg["train"]["max_grad_norm"] == 0.3 and cfg["train"]["precision"] == "bf16"


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"output_dir": "/a", "data": {"path": "/d"}}, "model_path: required"),
        ({"model_path": "/m", "output_dir": "/a"}, "data.path: required"),
        ({"model_path": "/m", "output_dir": "/a", "data": {"path": "/d"}, "device": "tpu"}, "device"),
        ({"model_path": "/m", "output_dir": "/a", "data": {"path": "/d"}, "train": {"precision": "fp8"}}, "precision"),
        ({"model_path": "/m", "output_dir": "/a", "data": {"path": "/d"}, "train": {"micro_batch_size": 0}},
         "micro_batch_size"),
    ],
)
def test_load_train_config_errors(tmp_path, raw, match):
    p = tmp_path / "train.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(HpcjobsError, match=match) as ei:
        F.load_train_config(p)
    assert str(p) in str(ei.value)


def test_load_train_config_bad_json(tmp_path):
    p = tmp_path / "train.json"
    p.write_text('{"model_path": "/m",\n  oops}')
    with pytest.raises(HpcjobsError, match=r"train.json:2: invalid JSON"):
        F.load_train_config(p)
    with pytest.raises(HpcjobsError, match="not found"):
        F.load_train_config(tmp_path / "missing.json")


def test_find_resume_checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    assert R.find_resume_checkpoint(str(d), "auto", deepspeed=False) is None
    for step, complete in ((5, True), (10, True), (15, False)):
        c = d / f"checkpoint-{step}"
        c.mkdir(parents=True)
        if complete:
            (c / "trainer_state.json").write_text("{}")
    (d / "checkpoint-xyz").mkdir()
    # checkpoint-15 is incomplete (killed while saving): skipped
    assert R.find_resume_checkpoint(str(d), "auto", deepspeed=False) == str(d / "checkpoint-10")
    assert R.find_resume_checkpoint(str(d), "never", deepspeed=False) is None
    # with DeepSpeed the engine state must be there too
    assert R.find_resume_checkpoint(str(d), "auto", deepspeed=True) is None
    (d / "checkpoint-5" / "global_step5").mkdir()
    assert R.find_resume_checkpoint(str(d), "auto", deepspeed=True) == str(d / "checkpoint-5")
    assert R.find_resume_checkpoint(str(d), str(d / "checkpoint-5"), deepspeed=False) == str(d / "checkpoint-5")
    with pytest.raises(HpcjobsError, match="not a complete Trainer checkpoint"):
        R.find_resume_checkpoint(str(d), str(d / "checkpoint-15"), deepspeed=False)


def test_fix_adapter_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "rel/model", "r": 8}))
    F.fix_adapter_config(str(tmp_path), str(tmp_path / "model"))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg == {"base_model_name_or_path": str(tmp_path / "model"), "r": 8}


def test_preempt_flag_installs_handler():
    old = signal.getsignal(signal.SIGUSR2)
    try:
        flag = R.PreemptFlag().install()
        assert not flag.signalled
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert flag.signalled and flag.signal_time
    finally:
        signal.signal(signal.SIGUSR2, old)


def _finetune_train_json(*overrides):
    from hpcjobs import config, plan, render

    composed = config.compose("llama2-lora", "a800", overrides=["model.source=/models/llama-2-7b",
                                                                "data.path=/data/d.parquet", *overrides])
    rendered = render.render(plan.build(composed, chain_id="reportto"))
    ft = next(s for s in rendered.stages if s.name == "finetune")
    return json.loads(ft.files["train.json"])


def test_report_to_is_a_closed_list_passed_through():
    """finetune.report_to: the Trainer's integrations; tensorboard by default, with the event
    files in the chain's tensorboard tree; wandb/mlflow are accepted as they are (they read
    their own WANDB_*/MLFLOW_* environment); [] and [none] turn reporting off."""
    from hpcjobs.errors import ConfigError

    train = _finetune_train_json()
    assert train["train"]["report_to"] == ["tensorboard"]
    assert train["tensorboard_dir"].endswith("/reportto/tensorboard/finetune/attempt-1")
    assert train["memory_file"].endswith("/reportto/stages/finetune/attempt-1/memory_measured.json")
    assert _finetune_train_json("finetune.report_to=[wandb,mlflow]")["train"]["report_to"] == ["wandb", "mlflow"]
    assert _finetune_train_json("finetune.report_to=[none]")["train"]["report_to"] == []
    assert _finetune_train_json("finetune.report_to=[]")["train"]["report_to"] == []
    for value, needle in [("[tensorbord]", "got 'tensorbord'"),
                          ("[tensorboard,wandb,bogus]", "must be one of azure_ml,"),
                          ("[all]", "reports to whatever happens to be installed on the nodes"),
                          ("[none,wandb]", "none turns reporting off; it cannot go with wandb")]:
        with pytest.raises(ConfigError) as e:
            _finetune_train_json(f"finetune.report_to={value}")
        assert e.value.key == "finetune.report_to" and needle in str(e.value), str(e.value)


@pytest.mark.train
def test_report_to_list_matches_transformers():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from hpcjobs import schema

    assert set(schema.REPORT_TO_INTEGRATIONS) == set(INTEGRATION_TO_CALLBACK)


def test_curves_lines():
    assert R.curves_lines(["tensorboard"], "/r/c1/tensorboard/finetune/attempt-2") == [
        "curves: tensorboard --logdir /r/c1/tensorboard (this run: finetune/attempt-2)"]
    assert R.curves_lines(["tensorboard"], "/tmp/my tb") == ["curves: tensorboard --logdir '/tmp/my tb'"]
    os.environ["MLFLOW_TRACKING_URI"] = "https://user:secret@mlflow.example/"
    try:
        assert R.curves_lines(["mlflow", "wandb"], None) == [
            "curves: mlflow (MLFLOW_TRACKING_URI=https://mlflow.example/)", "curves: wandb"]
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert R.curves_lines([], None) == ["curves: report_to is empty: none besides progress.jsonl"]


# ----------------------------------------------------------------------------
# helpers for the subprocess tests
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    try:
        from tinymodels import make_dialogue_parquet, make_tiny_llama
    except ImportError:  # tests/ imported as a package
        from tests.tinymodels import make_dialogue_parquet, make_tiny_llama
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_llama(root / "model"), make_dialogue_parquet(root / "data.parquet", n=120)


def write_config(run: Path, model: Path, data: Path, *, deepspeed: Path | None = None, **train) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_path": str(model),
        "output_dir": str(run / "adapter"),
        "checkpoint_dir": str(run / "checkpoints"),
        "progress_file": str(run / "stages" / "finetune" / "attempt-1" / "progress.jsonl"),
        "memory_file": str(run / "stages" / "finetune" / "attempt-1" / "memory_measured.json"),
        "deepspeed_config": str(deepspeed) if deepspeed else None,
        "resume": "auto",
        "device": "cpu",
        "data": {"path": str(data), "columns": ["Description", "Patient", "Doctor"], "template": TEMPLATE,
                 "split": [0.8, 0.1, 0.1], "seed": 42},
        "lora": {"r": 8, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bias": "none"},
        "train": {
            "micro_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 2e-2, "max_steps": 40,
            "num_train_epochs": 1, "warmup_steps": 4, "lr_scheduler_type": "cosine", "max_seq_length": 96,
            "gradient_checkpointing": True, "precision": "fp32", "max_grad_norm": 0.3, "logging_steps": 1,
            "save_steps": 25, "save_total_limit": 2, "eval_steps": None, "seed": 42, "optim": "adamw_torch",
            **train,
        },
    }
    p = run / "train.json"
    p.write_text(json.dumps(cfg, indent=2))
    return p


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def progress_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_lines(lines: list[dict]) -> list[dict]:
    return [r for r in lines if "event" not in r and "loss" in r]


def wait_for_step(progress: Path, procs: list[subprocess.Popen], step: int, timeout: float) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [r["step"] for r in step_lines(progress_lines(progress))]
        if steps and max(steps) >= step:
            return max(steps)
        if any(p.poll() is not None for p in procs):
            raise AssertionError("training exited before the signal could be sent")
        time.sleep(0.05)
    raise AssertionError(f"no step >= {step} in {progress} after {timeout}s")


def stop_group(p: subprocess.Popen) -> None:
    """Kill a launcher we started (its own session) if it is still running."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def run_single(config: Path, log: Path) -> subprocess.Popen:
    fh = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "hpcjobs.train.finetune", "--config", str(config)],
        cwd=REPO, env=job_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(run: Path, config: Path, tag: str) -> tuple[list[subprocess.Popen], list[Path]]:
    hostfile = run / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    deepspeed = Path(sys.executable).with_name("deepspeed")
    port = free_port()
    procs, logs = [], []
    for node_rank in (0, 1):
        cmd = [
            str(deepspeed), "--no_ssh", f"--node_rank={node_rank}", "--hostfile", str(hostfile),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "--module", "hpcjobs.train.finetune", "--config", str(config),
        ]
        # as in the job script: launchers ignore SIGUSR2, ranks handle it
        shell = "trap '' USR2; exec " + " ".join(shlex.quote(c) for c in cmd)
        log = run / f"{tag}-node{node_rank}.log"
        fh = open(log, "wb")
        procs.append(
            subprocess.Popen(["bash", "-c", shell], cwd=REPO, env=job_env(), stdout=fh, stderr=subprocess.STDOUT,
                             start_new_session=True)
        )
        logs.append(log)
    return procs, logs


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for p in procs:
            stop_group(p)
        raise AssertionError("timeout; logs:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
    return [p.returncode for p in procs]


def assert_adapter(run: Path, model: Path) -> None:
    adapter = run / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(model.resolve())
    assert os.path.isabs(cfg["base_model_name_or_path"])
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert (adapter / "adapter_model.safetensors").is_file()


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.train
def test_bad_data_fails_fast_with_message(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, _ = tiny
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"Description": ["d"] * 10, "Patient": ["p"] * 10}), bad)
    run = tmp_path / "run"
    config = write_config(run, model, bad)
    r = subprocess.run([sys.executable, "-m", "hpcjobs.train.finetune", "--config", str(config)], cwd=REPO,
                       env=job_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{bad}: missing column(s) 'Doctor'; found: 'Description', 'Patient'" in r.stdout
    events = progress_lines(run / "stages" / "finetune" / "attempt-1" / "progress.jsonl")
    assert events[-1]["event"] == "error" and "'Doctor'" in events[-1]["message"]


# ----------------------------------------------------------------------------
# single process: train, SIGUSR2 -> checkpoint + 75, resume
# ----------------------------------------------------------------------------


@pytest.mark.train
def test_single_process_preempt_and_resume(tiny, tmp_path):
    model, data = tiny
    run = tmp_path / "run"
    config = write_config(run, model, data, max_steps=300, save_steps=1000, eval_steps=100)
    progress = run / "stages" / "finetune" / "attempt-1" / "progress.jsonl"
    log = run / "finetune.log"

    p = run_single(config, log)
    try:
        seen = wait_for_step(progress, [p], 3, timeout=180)
        os.kill(p.pid, signal.SIGUSR2)
        rc = p.wait(timeout=120)
    finally:
        stop_group(p)
    out = log.read_text()
    assert rc == R.EXIT_PREEMPTED, out[-3000:]
    lines = progress_lines(progress)
    pre = [r for r in lines if r.get("event") == "preempted"]
    assert len(pre) == 1, lines
    stop = pre[0]["step"]
    assert seen <= stop < 300
    assert Path(pre[0]["checkpoint"]) == run / "checkpoints" / f"checkpoint-{stop}"
    assert (run / "checkpoints" / f"checkpoint-{stop}" / "trainer_state.json").is_file()
    assert any(r.get("event") == "checkpoint" and r["step"] == stop for r in lines)
    assert not (run / "adapter").exists()  # no final adapter on preemption
    assert "rank=0 world_size=1" in out and f"hostname={socket.gethostname()}" in out
    # measured at the time-limit checkpoint too
    measured = json.loads((run / "stages/finetune/attempt-1/memory_measured.json").read_text())["ranks"]
    assert [(r["rank"], r["device"]) for r in measured] == [(0, "cpu")] and measured[0]["model_state_bytes"] > 0

    # rerun: resume=auto continues from the saved global step
    p = run_single(config, log)
    try:
        rc = p.wait(timeout=300)
    finally:
        stop_group(p)
    assert rc == 0, log.read_text()[-3000:]
    lines = progress_lines(progress)
    starts = [r for r in lines if r.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, stop]
    assert starts[1]["resumed_from"] == str(run / "checkpoints" / f"checkpoint-{stop}")
    after = [r for r in lines[lines.index(starts[1]):] if "event" not in r and "loss" in r]
    assert after[0]["step"] == stop + 1 and after[-1]["step"] == 300
    end = [r for r in lines if r.get("event") == "end"]
    assert len(end) == 1 and end[0]["step"] == 300
    for r in step_lines(lines):
        assert {"time", "step", "max_steps", "epoch", "loss", "learning_rate"} <= set(r)
        assert r["max_steps"] == 300
    assert_adapter(run, model)
    losses = [r["loss"] for r in step_lines(lines)]
    assert mean(losses[-10:]) < mean(losses[:5]) - 0.05
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [100, 200, 300] and all(r["eval_loss"] > 0 for r in evals)


# ----------------------------------------------------------------------------
# DeepSpeed ZeRO-2, world size 2 as two "nodes"
# ----------------------------------------------------------------------------


@pytest.mark.train
@pytest.mark.slow
def test_deepspeed_zero2_two_nodes_preempt_resume(tiny, tmp_path):
    pytest.importorskip("deepspeed")
    model, data = tiny
    run = tmp_path / "run"
    micro, ga, world = 4, 1, 2
    ds = run / "ds_config.json"
    run.mkdir(parents=True)
    ds.write_text(json.dumps({
        "train_batch_size": micro * ga * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.3,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }))
    max_steps = 120
    config = write_config(run, model, data, deepspeed=ds, micro_batch_size=micro, gradient_accumulation_steps=ga,
                          max_steps=max_steps, save_steps=50)
    progress = run / "stages" / "finetune" / "attempt-1" / "progress.jsonl"

    # --- attempt 1: preempted by SIGUSR2 to every process of both "nodes"
    procs, logs = launch_two_nodes(run, config, "a1")
    try:
        # first run on a machine compiles DeepSpeed's shm comm op (~25 s)
        seen = wait_for_step(progress, procs, 3, timeout=400)
        # only "node 2" gets the signal: the flag is all-reduced, so rank 0 stops at the same step
        os.killpg(procs[1].pid, signal.SIGUSR2)
        rcs = wait_all(procs, logs, timeout=180)
    finally:
        for p in procs:
            stop_group(p)
    texts = [log.read_text() for log in logs]
    assert rcs == [R.EXIT_PREEMPTED, R.EXIT_PREEMPTED], "\n".join(t[-3000:] for t in texts)
    for node_rank, text in enumerate(texts):
        assert f"rank={node_rank} world_size=2" in text
        assert f"distributed: rank={node_rank} world_size=2 backend=gloo" in text
        assert f"hostname={socket.gethostname()}" in text
        assert "preempted: checkpoint" in text
    assert "received signal" in texts[1] and "received signal" not in texts[0]
    lines = progress_lines(progress)
    pre = [r for r in lines if r.get("event") == "preempted"]
    assert len(pre) == 1
    stop = pre[0]["step"]
    assert seen <= stop < max_steps
    ckpt = run / "checkpoints" / f"checkpoint-{stop}"
    assert (ckpt / "trainer_state.json").is_file()
    gs = ckpt / f"global_step{stop}"
    assert sorted(f.name for f in gs.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (run / "adapter").exists()

    # --- attempt 2: resume=auto continues from that global step
    procs, logs = launch_two_nodes(run, config, "a2")
    try:
        rcs = wait_all(procs, logs, timeout=400)
    finally:
        for p in procs:
            stop_group(p)
    texts = [log.read_text() for log in logs]
    assert rcs == [0, 0], "\n".join(t[-3000:] for t in texts)
    assert f"resuming from {ckpt}" in texts[0]
    lines = progress_lines(progress)
    starts = [r for r in lines if r.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, stop] and all(s["world_size"] == 2 for s in starts)
    assert starts[1]["global_batch_size"] == micro * ga * world
    after = step_lines(lines[lines.index(starts[1]):])
    assert after[0]["step"] == stop + 1 and after[-1]["step"] == max_steps
    steps = [r["step"] for r in step_lines(lines)]
    assert steps == list(range(1, max_steps + 1))  # every global step exactly once across both attempts
    end = [r for r in lines if r.get("event") == "end"]
    assert len(end) == 1 and end[0]["step"] == max_steps
    losses = [r["loss"] for r in step_lines(lines)]
    assert mean(losses[-10:]) < mean(losses[:5]) - 0.05, losses
    assert_adapter(run, model)
