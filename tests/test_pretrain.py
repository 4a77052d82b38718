"""The `llm-pretrain` recipe: tokenizer -> pretrain (accelerate + DeepSpeed ZeRO-2 on the
devcluster's two nodes) -> evaluate, on a tiny model and a small repetitive corpus, with one
time-limit warning in the middle of training (requeue, resume at the same global step);
plus the refusals and the settled DeepSpeed JSON, which need no Slurm job."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import CLI, wait_chain, wait_for


def _progress(attempt_dir: Path) -> list:
    path = attempt_dir / "progress.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


@pytest.fixture(scope="module")
def pretrain_assets(tmp_path_factory, hpcjobs_home):
    out = tmp_path_factory.mktemp("pretrain-demo")
    CLI()("demo-assets", "--recipe", "llm-pretrain", out)
    return out


# ---------------------------------------------------------------- before submission (no Slurm job)

def test_auto_values_are_settled_in_the_rendered_deepspeed_json(hpcjobs, pretrain_assets, tmp_path):
    ds = tmp_path / "ds_config.json"   # MiniMind-style: "auto" wherever the Trainer would fill it
    ds.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": True}}))
    out = tmp_path / "rendered"
    hpcjobs("render", "llm-pretrain", "--nodes", "2", "--profile", "local", "--config",
            pretrain_assets / "demo.yaml", "--out", out, f"pretrain.deepspeed={ds}", "pretrain.grad_accum=3",
            "pretrain.grad_clip=0.5")
    attempt = out / "stages/pretrain/attempt-1"
    resolved = json.loads((attempt / "ds_config.json").read_text())
    assert "auto" not in json.dumps(resolved)
    assert (resolved["train_batch_size"], resolved["train_micro_batch_size_per_gpu"],
            resolved["gradient_accumulation_steps"]) == (8 * 3 * 2, 8, 3)
    assert resolved["gradient_clipping"] == 0.5
    assert resolved["bf16"]["enabled"] is False and resolved["fp16"]["enabled"] is False   # fp32 on CPU
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 64 * 64                  # dim²
    accel = (attempt / "accelerate.yaml").read_text()
    assert f"deepspeed_config_file: {attempt / 'ds_config.json'}" in accel and "num_processes: 2" in accel
    assert "gradient_accumulation_steps" not in accel
    spec = json.loads((attempt / "launch.json").read_text())
    assert spec["launcher"] == "accelerate" and spec["program"] == ["-m", "hpcjobs.train.pretrain"]
    assert "train_batch_size 48 = micro 8 x accumulation 3 x world 2" in (attempt / "job.sbatch").read_text()


def test_gpu_profile_renders_bf16_and_imports_nothing_heavy(pretrain_assets, tmp_path):
    from test_login_path import HEAVY, _imported

    out = tmp_path / "a800"
    mods = _imported("render", "llm-pretrain", "--nodes", "2", "--profile", "a800", "--out", out,
                     f"data.path={pretrain_assets / 'corpus.jsonl'}")
    assert not mods & set(HEAVY), mods & set(HEAVY)
    attempt = out / "stages/pretrain/attempt-1"
    ds = json.loads((attempt / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False     # bf16 on GPU profiles
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    # MiniMind's numbers: micro 24 x accumulation 32 x (2 nodes x 8 GPUs)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (24 * 32 * 16, 24, 32)
    cfg = json.loads((attempt / "pretrain.json").read_text())
    assert cfg["model"]["hidden_size"] == 1024 and cfg["model"]["num_hidden_layers"] == 32
    assert cfg["train"]["precision"] == "bf16" and cfg["train"]["max_seq_len"] == 1024


@pytest.mark.cluster
def test_bad_sizes_are_refused_before_submission(devcluster, hpcjobs, pretrain_assets, tmp_path):
    for override, key, words in (("pretrain.dim=66", "pretrain.dim", "not divisible by n_heads (4)"),
                                 ("pretrain.dim=100", "pretrain.dim", "dim / n_heads = 25 is odd"),
                                 ("pretrain.n_kv_heads=3", "pretrain.n_kv_heads", "does not divide n_heads (4)")):
        proc = hpcjobs("submit", "llm-pretrain", "--nodes", "2", "--profile", "local", "--name", "badsize",
                       "--config", pretrain_assets / "demo.yaml", override, check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert key in proc.stderr and words in proc.stderr and "nothing was submitted" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    too_big = _fake_tokenizer(tmp_path / "tok600", 600)
    proc = hpcjobs("submit", "llm-pretrain", "--nodes", "2", "--profile", "local", "--name", "badsize",
                   "--config", pretrain_assets / "demo.yaml", f"pretrain.tokenizer={too_big}", check=False)
    assert proc.returncode == 2 and "pretrain.vocab_size: 512 is smaller than the tokenizer's 600 tokens" in \
        proc.stderr, proc.stderr


def _fake_tokenizer(path: Path, size: int) -> Path:
    """A directory with a tokenizer.json of ``size`` ids: all the login node reads of a tokenizer."""
    path.mkdir()
    vocab = {f"t{i}": i for i in range(size - 3)}
    added = [{"id": size - 3 + i, "content": c} for i, c in enumerate(("<pad>", "<s>", "</s>"))]
    (path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab},
                                                     "added_tokens": added}))
    return path


def test_a_given_tokenizer_is_checked_not_trained(hpcjobs, pretrain_assets, tmp_path):
    given = _fake_tokenizer(tmp_path / "tok", 300)
    out = tmp_path / "rendered"
    proc = hpcjobs("render", "llm-pretrain", "--nodes", "2", "--profile", "local", "--config",
                   pretrain_assets / "demo.yaml", "--out", out, f"pretrain.tokenizer={given}")
    assert "warning" not in proc.stderr, proc.stderr
    script = (out / "stages/tokenizer/attempt-1/job.sbatch").read_text()
    assert f"--check {given}" in script and "nothing to train" in script
    cfg = json.loads((out / "stages/pretrain/attempt-1/pretrain.json").read_text())
    assert cfg["tokenizer"] == str(given)


# ---------------------------------------------------------------- the chain, once, on two nodes

@pytest.fixture(scope="module")
def chain(devcluster, pretrain_assets):
    """The whole recipe on two nodes; a time-limit warning (SIGUSR2 to the batch shell, as Slurm
    sends it `signal_grace` seconds before the limit) once training has passed step 40."""
    cli = CLI()
    sub = cli.json("submit", "llm-pretrain", "--nodes", "2", "--profile", "local", "--name", "pretrain",
                   "--config", pretrain_assets / "demo.yaml")
    run = Path(sub["run_dir"])
    attempt = run / "stages/pretrain/attempt-1"
    job = sub["jobs"]["pretrain"]
    # generous: the first DeepSpeed CPU op build (cached afterwards) can take minutes on a busy machine
    wait_for(lambda: any(r.get("step", 0) >= 40 and "loss" in r for r in _progress(attempt)), timeout=900,
             interval=0.5, what="pretraining to pass step 40")
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], env={**os.environ, **devcluster.env()}, check=True)
    final = wait_chain(cli, sub["chain"], timeout=900)
    return {"sub": sub, "final": final, "run": run, "attempt": attempt, "job": job}


@pytest.mark.cluster
@pytest.mark.train
def test_pretrain_chain_completes_on_two_nodes(chain, hpcjobs):
    final = chain["final"]
    assert final["state"] == "COMPLETED", (final, hpcjobs("logs", chain["sub"]["chain"], "pretrain").stdout[-3000:])
    assert [s["state"] for s in final["stages"]] == ["COMPLETED"] * 3
    pt = final["stages"][1]
    assert pt["nodes"] == "node[1-2]"
    prog = _progress(chain["attempt"])
    start = next(r for r in prog if r.get("event") == "start")
    assert start["world_size"] == 2 and start["global_batch_size"] == 16


@pytest.mark.cluster
@pytest.mark.train
def test_training_loss_falls_below_half(chain):
    losses = [(r["step"], r["loss"]) for r in _progress(chain["attempt"]) if r.get("loss") is not None]
    first, last = losses[0], losses[-1]
    assert first[0] == 1 and last[0] == 120, losses
    assert last[1] < first[1] / 2, losses
    # the same curve in TensorBoard (report_to defaults to tensorboard), the requeued run's part
    # in the same attempt's directory
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(chain["run"] / "tensorboard" / "pretrain" / "attempt-1"))
    events.Reload()
    assert {e.step for e in events.Scalars("train/loss")} == {step for step, _ in losses}


@pytest.mark.cluster
@pytest.mark.train
def test_saved_model_loads_and_beats_the_untrained_one(chain):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = chain["run"]
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert model.config.model_type == "llama" and model.config.hidden_size == 64
    assert model.config.num_key_value_heads == 2 and model.config.max_position_embeddings == 64
    ids = tok("Anna lives in Oslo and has 3 cats.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert (run / "checkpoints/checkpoint-60/model.safetensors").is_file()   # checkpoints load the same way
    report = json.loads((run / "eval/report.json").read_text())
    ppl = report["perplexity"]
    assert ppl["merged"] is not None and ppl["base"] is not None
    assert ppl["merged"] < ppl["base"] / 4, ppl                 # well below the untrained init's
    assert report["eval_examples"] == 30 and report["labels"]["base"] == "untrained init"
    assert len(report["samples"]) == 5 and all(s["merged"] for s in report["samples"])
    md = (run / "eval/report.md").read_text()
    assert "untrained init" in md and "pretrained" in md


@pytest.mark.cluster
@pytest.mark.train
def test_time_limit_warning_requeues_and_resumes_at_the_same_step(chain, hpcjobs):
    final = chain["final"]
    pt = final["stages"][1]
    assert pt["job_id"] == chain["job"] and pt["restarts"] == 1, pt
    prog = _progress(chain["attempt"])
    stopped = next(r for r in prog if r.get("event") == "preempted")
    starts = [r for r in prog if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["step"] == 0
    assert 40 <= stopped["step"] < 120 and starts[1]["step"] == stopped["step"], (stopped, starts)
    assert starts[1]["resumed_from"].endswith(f"checkpoint-{stopped['step']}")
    assert prog[-1]["event"] == "end" and prog[-1]["step"] == 120
    steps = [r["step"] for r in prog if "loss" in r]
    assert steps == sorted(steps)                                 # no step trained twice
    log = hpcjobs("logs", chain["sub"]["chain"], "pretrain").stdout
    assert "requeueing (restart 1 of" in log and "packed corpus" in log and "reused" in log
    status = hpcjobs("status", chain["sub"]["chain"]).stdout
    assert "tokens/s" in status, status
