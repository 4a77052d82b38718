"""The ``grpo`` stage kind and the ``qwen2-grpo`` recipe: GRPO's batch rules and the reward
functions checked before submission, and one real chain on the devcluster's two nodes (accelerate
+ DeepSpeed ZeRO-3, a tiny Qwen2) whose held-out reward rises only if training happened."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import CLI, wait_chain

from hpcjobs.errors import ConfigError
from hpcjobs.stages.grpo import check_reward_function, grpo_batch

# A user's reward file: one good function, one without **kwargs, one with an argument TRL never passes.
USER_REWARDS = '''\
def ends_early(completions, completion_ids, **kwargs):
    """1 for a completion of at most 6 tokens (EOS included); also checks that TRL passes the columns."""
    assert len(kwargs["answer"]) == len(completions), sorted(kwargs)
    return [1.0 if len(ids) <= 6 else 0.0 for ids in completion_ids]


def no_kwargs(completions):
    return [0.0 for _ in completions]


def needs_judge(completions, judge, **kwargs):
    return [0.0 for _ in completions]
'''


def _section(out: str, name: str) -> str:
    return out.split(f"/{name} <==\n", 1)[1].split("\n==>", 1)[0]


@pytest.fixture(scope="module")
def grpo_assets(tmp_path_factory, hpcjobs_home):
    """`hpcjobs demo-assets --recipe qwen2-grpo`: tiny Qwen2, prompts.jsonl, demo.yaml; a reward file."""
    out = tmp_path_factory.mktemp("grpo-demo")
    CLI()("demo-assets", "--recipe", "qwen2-grpo", out, timeout=600)
    (out / "my_rewards.py").write_text(USER_REWARDS)
    return out


def _render(hpcjobs, assets, *args, check=True):
    return hpcjobs("render", "qwen2-grpo", "--nodes", "2", "--profile", "local", "--config",
                   assets / "demo.yaml", *args, check=check)


# ---------------------------------------------------------------- unit level (no Slurm)

def test_batch_rules_mirror_trl():
    # the seed: per_device_train_batch_size 4, gradient_accumulation_steps 2, 2 ranks, TRL's 8 generations
    assert grpo_batch(micro=4, grad_accum=2, world=2, num_generations=8, steps_per_generation=None,
                      generation_batch_size=None) == (2, 16)
    with pytest.raises(ConfigError) as e:
        grpo_batch(micro=4, grad_accum=2, world=2, num_generations=3, steps_per_generation=None,
                   generation_batch_size=None)
    assert e.value.key == "num_generations" and "3 does not divide the generation batch" in e.value.message
    assert "micro_batch_size 4 × world size 2 × steps_per_generation 2" in e.value.message and "= 16" in e.value.message
    with pytest.raises(ConfigError, match="at least 2"):
        grpo_batch(micro=4, grad_accum=2, world=2, num_generations=1, steps_per_generation=None,
                   generation_batch_size=None)
    with pytest.raises(ConfigError, match="24 is not a multiple of the global batch .* = 16"):
        grpo_batch(micro=8, grad_accum=1, world=2, num_generations=4, steps_per_generation=None,
                   generation_batch_size=24)
    assert grpo_batch(micro=8, grad_accum=1, world=2, num_generations=4, steps_per_generation=None,
                      generation_batch_size=32) == (2, 32)
    with pytest.raises(ConfigError, match="evaluation batch .* = 6 is not a multiple of num_generations 4"):
        grpo_batch(micro=4, grad_accum=1, world=2, num_generations=4, steps_per_generation=None,
                   generation_batch_size=None, eval_on=True, eval_micro=3)


@pytest.mark.train
def test_the_installed_trl_agrees_with_the_batch_rules():
    """Same numbers through TRL's own GRPOConfig (one process: world size 1)."""
    from trl import GRPOConfig

    def trl(**kw):
        try:
            c = GRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", **kw)
            return c.steps_per_generation, c.generation_batch_size
        except ValueError:
            return None

    def ours(**kw):
        try:
            return grpo_batch(world=1, micro=kw["per_device_train_batch_size"],
                              grad_accum=kw.get("gradient_accumulation_steps", 1),
                              num_generations=kw["num_generations"],
                              steps_per_generation=kw.get("steps_per_generation"),
                              generation_batch_size=kw.get("generation_batch_size"))
        except ConfigError:
            return None

    for kw in ({"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "num_generations": 8},
               {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_generations": 3},
               {"per_device_train_batch_size": 4, "num_generations": 2, "generation_batch_size": 12},
               {"per_device_train_batch_size": 4, "num_generations": 4, "generation_batch_size": 10},
               {"per_device_train_batch_size": 6, "num_generations": 4, "steps_per_generation": 2},
               {"per_device_train_batch_size": 4, "num_generations": 1}):
        assert trl(**kw) == ours(**kw), kw


def test_reward_functions_are_read_without_importing_them(tmp_path):
    f = tmp_path / "r.py"
    f.write_text(USER_REWARDS + "\nimport torch_is_not_imported_here\n")
    spec = check_reward_function(f"{f}:ends_early", workdir=str(tmp_path))
    assert spec["kind"] == "file" and spec["required"] == ["completions", "completion_ids"]
    assert check_reward_function("r.py:ends_early", workdir=str(tmp_path))["path"] == str(f)
    with pytest.raises(ConfigError, match="takes no \\*\\*kwargs"):
        check_reward_function(f"{f}:no_kwargs", workdir=str(tmp_path))
    with pytest.raises(ConfigError, match="defines no function 'nope'"):
        check_reward_function(f"{f}:nope", workdir=str(tmp_path))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("import torch_would_fail_here\n")
    (tmp_path / "pkg" / "mod.py").write_text("def fmt(completions, **kw):\n    return [1.0 for _ in completions]\n")
    assert check_reward_function("pkg.mod:fmt", workdir=str(tmp_path))["module"] == "pkg.mod"
    with pytest.raises(ConfigError, match="module pkg.nothing not found"):
        check_reward_function("pkg.nothing:fmt", workdir=str(tmp_path))
    with pytest.raises(ConfigError, match="not a shipped reward"):
        check_reward_function("target_lenght", workdir=str(tmp_path))


def test_shipped_rewards():
    from hpcjobs.train import rewards

    spec = {"functions": [{"kind": "shipped", "function": n} for n in ("target_length", "regex", "exact_match")],
            "target_length": 5, "length_unit": "chars", "pattern": r"[a-z]+ \d", "reference_column": "answer",
            "weights": [1.0, 2.0, 3.0]}
    funcs = rewards.build(spec)
    rows = [{"prompt": "p", "answer": "abc 1"}, {"prompt": "q", "answer": "x"}]
    s = rewards.score(funcs, rewards.weights(spec), rows, ["abc 1", "too long text"], [[1, 2], [3]])
    assert s["per_function"] == {"target_length": [0.0, -8.0], "regex": [1.0, 0.0], "exact_match": [1.0, 0.0]}
    assert s["total"] == [5.0, -8.0]
    tokens = rewards.target_length_reward(4, "tokens")
    assert tokens(["a", "b"], completion_ids=[[1, 2, 3, 4], [1]]) == [0.0, -3.0]


def test_accelerate_yaml_with_gradient_accumulation_auto(hpcjobs, tmp_path):
    """The seed's accelerate YAML (DeepSpeed ZeRO-3, fp16, gradient_accumulation_steps: auto, 2 GPUs)
    on an A800 profile: accepted; accelerate never sees the "auto", DeepSpeed gets the numbers."""
    accel = tmp_path / "ds_config.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nmixed_precision: fp16\n"
                     "num_machines: 1\nnum_processes: 2\ndeepspeed_config:\n  gradient_accumulation_steps: auto\n"
                     "  zero_stage: 3\n  offload_optimizer_device: none\n  zero3_init_flag: true\n")
    out = hpcjobs("render", "qwen2-grpo", "--profile", "a800", "model.source=/m", "data.path=/d.parquet",
                  f"grpo.accelerate_config={accel}", "grpo.gpus_per_node=2", "grpo.precision=fp16").stdout
    made = _section(out, "accelerate.yaml")
    assert "gradient_accumulation_steps" not in made and "mixed_precision" not in made
    assert "num_processes: 2" in made and "zero3_init_flag: true" in made
    ds = json.loads(_section(out, "ds_config.json"))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (16, 4, 2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["fp16"]["enabled"] is True
    cfg = json.loads(_section(out, "grpo.json"))
    assert cfg["train"]["generation_batch_size"] == 16 and cfg["train"]["num_generations"] == 8


def test_render_reads_a_torch_reward_file_without_importing_torch(tmp_path):
    from test_login_path import HEAVY, _imported

    rw = tmp_path / "heavy_rewards.py"
    rw.write_text("import torch\n\ndef fmt(completions, **kwargs):\n    return [float(torch.tensor(1.0))] * len(completions)\n")
    mods = _imported("render", "qwen2-grpo", "--profile", "a800", "--nodes", "2", "model.source=/m",
                     "data.path=/d.parquet", f"grpo.reward.functions=[{rw}:fmt]")
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_progress_line_shows_reward_kl_and_completion_length(tmp_path):
    from hpcjobs import progress

    recs = [{"event": "start", "step": 0, "max_steps": 10},
            {"time": 100.0, "step": 2, "max_steps": 10, "loss": 0.1, "learning_rate": 1e-3, "reward": -3.0},
            {"time": 104.0, "step": 4, "max_steps": 10, "loss": 0.05, "learning_rate": 1e-3, "reward": -1.25,
             "reward_std": 0.4, "kl": 0.012, "completion_length": 4.2}]
    f = tmp_path / "progress.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    line = progress.read(f).line()
    assert "step 4/10" in line and "reward -1.250 ± 0.400" in line and "KL 0.0120" in line, line
    assert "completion 4.2 tokens" in line and "ETA 12s" in line, line


# ---------------------------------------------------------------- refusals before submission

def _queued(devcluster, prefix):
    out = subprocess.run(["squeue", "--noheader", "--format=%j"], env={**os.environ, **devcluster.env()},
                         capture_output=True, text=True, check=True).stdout
    return [j for j in out.split() if j.startswith(prefix)]


@pytest.mark.cluster
@pytest.mark.train
def test_bad_settings_are_refused_before_submission(devcluster, hpcjobs, grpo_assets):
    def refused(name, *args):
        proc = hpcjobs("submit", "qwen2-grpo", "--nodes", "2", "--profile", "local", "--config",
                       grpo_assets / "demo.yaml", "--name", name, *args, check=False)
        assert proc.returncode == 2 and "nothing was submitted" in proc.stderr, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and _queued(devcluster, name) == []
        return proc.stderr

    rw = grpo_assets / "my_rewards.py"
    err = refused("grpo-ngen", "grpo.num_generations=3")
    assert "grpo.num_generations" in err and "3 does not divide the generation batch" in err and "= 16" in err
    err = refused("grpo-nofn", f"grpo.reward.functions=[{rw}:missing_one]")
    assert "grpo.reward.functions" in err and "defines no function 'missing_one'" in err, err
    err = refused("grpo-sig", f"grpo.reward.functions=[{rw}:no_kwargs]")
    assert "takes no **kwargs" in err, err
    err = refused("grpo-arg", f"grpo.reward.functions=[{rw}:needs_judge]")
    assert "requires judge, which TRL does not pass" in err, err
    err = refused("grpo-file", f"grpo.reward.functions=[{grpo_assets / 'nope.py'}:f]")
    assert "nope.py" in err, err
    ds = grpo_assets / "ds32.json"
    ds.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    err = refused("grpo-ds", f"grpo.deepspeed={ds}")
    assert "32" in err and "16" in err, err


# ---------------------------------------------------------------- the chain on two nodes

@pytest.fixture(scope="module")
def grpo_chain(devcluster, grpo_assets):
    """qwen2-grpo on both nodes: 2 ranks (the seed's micro batch 4 × accumulation 2), ZeRO-3,
    target length 4 tokens plus the user's own reward from a file, beta > 0 (KL logged)."""
    cli = CLI()
    sub = cli.json("submit", "qwen2-grpo", "--nodes", "2", "--profile", "local", "--config",
                   grpo_assets / "demo.yaml", "--name", "grpo-e2e",
                   f"grpo.reward.functions=[target_length, {grpo_assets / 'my_rewards.py'}:ends_early]",
                   "grpo.max_steps=16", "grpo.beta=0.02", "grpo.save_steps=100")
    final = wait_chain(cli, sub["chain"], timeout=900)
    return sub, final


@pytest.mark.cluster
@pytest.mark.train
def test_grpo_chain_raises_the_held_out_reward(hpcjobs, grpo_chain):
    sub, final = grpo_chain
    assert final["state"] == "COMPLETED", (final, hpcjobs("logs", sub["chain"], "grpo", check=False).stdout[-4000:])
    run = Path(sub["run_dir"])
    adir = run / "stages" / "grpo" / "attempt-1"
    # two nodes, the seed's batch numbers
    assert json.loads((adir / "ds_config.json").read_text())["train_batch_size"] == 16
    log = (adir / f"slurm-{sub['jobs']['grpo']}.out").read_text()
    assert "node rank 1 of 2, accelerate" in log and "world_size=2" in log
    # progress: step/total, reward, its std, KL (beta > 0), completion length
    lines = [json.loads(x) for x in (adir / "progress.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "reward" in x and "event" not in x]
    assert steps[-1]["step"] == 16 and steps[-1]["max_steps"] == 16
    assert all(k in steps[-1] for k in ("reward_std", "kl", "completion_length"))
    assert set(steps[-1]["rewards"]) == {"target_length", "ends_early"}
    status = hpcjobs("status", sub["chain"]).stdout
    assert "reward " in status and "KL " in status and "completion " in status, status
    # the trained model is a normal HF directory; evaluate scored base vs trained on held-out prompts
    assert (run / "grpo" / "config.json").is_file() and (run / "grpo" / "tokenizer.json").is_file()
    report = json.loads((run / "eval" / "report.json").read_text())["reward"]
    base, trained = report["base"], report["merged"]
    assert report["prompts"] == 16 and report["functions"] == ["target_length", "ends_early"]
    # The untrained model answers greedily in about 8-16 tokens (target_length -4 to -12, ends_early
    # 0); the trained one ends near 4 tokens. Without training both models answer alike (greedy):
    # every difference below would be 0. Measured: target_length -6.4 -> -2.0, ends_early 0 -> 1,
    # 10.4 -> 2.0 tokens.
    assert base["per_function"]["target_length"] < -4 and base["per_function"]["ends_early"] < 0.3, base
    assert trained["per_function"]["target_length"] > base["per_function"]["target_length"] + 2.5, (base, trained)
    assert trained["per_function"]["ends_early"] > base["per_function"]["ends_early"] + 0.5, (base, trained)
    assert trained["mean_completion_tokens"] < base["mean_completion_tokens"] - 3, (base, trained)
    assert trained["mean_reward"] > base["mean_reward"] + 3, (base, trained)
    md = (run / "eval" / "report.md").read_text()
    assert "## Reward on held-out prompts" in md and "Sample completions" in md
    # TensorBoard by default, like every training stage: the reward curve at the logged steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / "grpo" / "attempt-1"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/reward")] == [x["step"] for x in steps]
    assert "curves: tensorboard --logdir" in log
