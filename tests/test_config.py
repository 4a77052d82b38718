"""Configuration layering and bad input, through the real CLI (no Slurm needed: render)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FIXTURES

from hpcjobs import config, plan
from hpcjobs.errors import ConfigError

A800 = ["--profile", "a800", "model.source=/models/llama-2-7b", "data.path=/data/d.parquet"]


def _build(recipe="llama2-lora", profile="a800", overrides=(), **kw):
    c = config.compose(recipe, profile, overrides=list(overrides), **kw)
    return c, plan.build(c, chain_id="test-chain")


def test_layers_in_order(hpcjobs_home, tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("finetune:\n  lr: 3.0e-4\n  micro_batch_size: 8\n")
    c, p = _build(overrides=["model.source=/m", "data.path=/d", "finetune.micro_batch_size=4"],
                  config_files=[str(user)], cli={"run.nodes": 2})
    ft = p.stage("finetune")
    assert ft.cfg.lr == 3e-4                 # config file beats the recipe's 1e-3
    assert ft.cfg.micro_batch_size == 4      # command line beats the config file
    assert ft.cfg.zero_stage == 2            # recipe
    assert p.chain.profile.partition == "ai"  # profile
    assert ft.cfg.save_steps == 100          # package default
    src, line = c.where("finetune.lr")
    assert src == str(user) and line == 2
    assert c.where("finetune.micro_batch_size")[0] == "command line"


def test_user_profile_layers_over_shipped(hpcjobs_home):
    prof = Path(hpcjobs_home) / "config" / "profiles"
    prof.mkdir(exist_ok=True)
    (prof / "a800.yaml").write_text("account: proj-llm\nqos: high\n")
    try:
        _, p = _build(overrides=["model.source=/m", "data.path=/d"])
        assert p.chain.profile.account == "proj-llm"
        assert p.chain.profile.partition == "ai"
        assert p.stage("convert").sbatch["account"] == "proj-llm"
    finally:
        (prof / "a800.yaml").unlink()


def test_a800_two_nodes_world_size_16(hpcjobs_home):
    _, p = _build(overrides=["model.source=/m", "data.path=/d"], cli={"run.nodes": 2})
    ft = p.stage("finetune")
    assert ft.world_size == 16
    assert ft.ds_config["train_batch_size"] == 16 * 1 * 16
    assert ft.ds_config["train_micro_batch_size_per_gpu"] == 16
    assert ft.sbatch["gpus-per-node"] == "8" and ft.sbatch["nodes"] == "2"
    assert ft.ds_config["bf16"]["enabled"] is True


@pytest.mark.parametrize("args, needle", [
    (["no-such-recipe", "--profile", "a800"], "unknown recipe 'no-such-recipe'; known recipes:"),
    (["llama2-lora", "--profile", "nope"], "unknown profile 'nope'; known profiles: a100, a800, local"),
    (["llama2-lora", *A800, "finetune.lrr=1"], "command line: finetune.lrr: unknown key"),
    (["llama2-lora", *A800, "finetune.lr=fast"], "command line: finetune.lr: expects a number, got 'fast'"),
    (["llama2-lora", *A800, "--nodes", "0"], "command line: run.nodes: needs at least 1 node, got 0"),
    (["llama2-lora", *A800, "--name", "x; rm -rf ~"], "'x; rm -rf ~' is not a valid name"),
    (["llama2-lora", "--profile", "a800", "data.path=/d"], "model.source: a value is required"),
    (["llama2-lora", *A800, "finetune.zero_stage=4"], "finetune.zero_stage: must be 0, 1, 2 or 3"),
    (["llama2-lora", *A800, "finetune.offload_param=cpu"], "parameter offload needs zero_stage 3"),
    (["llama2-lora", *A800, "--include", "node1:0,1", "--exclude", "node2"], "cannot be used together"),
    (["llama2-lora", *A800, "--include", "gpu01:8"], "slot 8 does not exist on a node with 8 GPUs"),
    (["llama2-lora", *A800, "--include", "gpu01:0@gpu01:1"], "host gpu01 appears twice"),
    (["llama2-lora", *A800, "--nodes", "3", "--include", "gpu01@gpu02"], "is 3 but the include spec selects 2"),
    (["llama2-lora", *A800, "pipeline.convert.kind=merge"], "cannot be overridden"),
    (["llama2-lora", *A800, "finetune.lr"], "is not KEY=VALUE"),
])
def test_bad_input_is_a_clear_error(hpcjobs, args, needle):
    proc = hpcjobs("render", *args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert "nothing was submitted" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_key_suggests_the_right_one(hpcjobs):
    proc = hpcjobs("render", "llama2-lora", *A800, "finetune.learning_rate=1", check=False)
    assert "unknown key" in proc.stderr
    proc = hpcjobs("render", "llama2-lora", *A800, "finetune.zero_stag=1", check=False)
    assert "did you mean finetune.zero_stage?" in proc.stderr


def test_errors_in_files_name_file_and_line(hpcjobs, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("finetune:\n  lr: 1.0e-4\n  micro_batch: 8\n")
    proc = hpcjobs("render", "llama2-lora", *A800, "--config", cfg, check=False)
    assert f"{cfg}:3: finetune.micro_batch: unknown key" in proc.stderr
    cfg.write_text("finetune:\n  zero_stage: two\n")
    proc = hpcjobs("render", "llama2-lora", *A800, "--config", cfg, check=False)
    assert f"{cfg}:2: finetune.zero_stage: expects an integer, got 'two'" in proc.stderr
    cfg.write_text("finetune:\n  lr: [1\n")
    proc = hpcjobs("render", "llama2-lora", *A800, "--config", cfg, check=False)
    assert f"{cfg}:" in proc.stderr and "invalid YAML" in proc.stderr


def test_semantic_errors_point_at_their_source(hpcjobs, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("finetune:\n  micro_batch_size: 2\n\n  zero_stage: 7\n")
    proc = hpcjobs("render", "llama2-lora", *A800, "--config", cfg, check=False)
    assert f"{cfg}:4: finetune.zero_stage: must be 0, 1, 2 or 3, got 7" in proc.stderr


def test_user_deepspeed_config_batch_mismatch_shows_the_numbers(hpcjobs, tmp_path):
    ds = tmp_path / "ds_config.json"
    ds.write_text('{\n  "train_batch_size": 64,\n  "train_micro_batch_size_per_gpu": 16,\n'
                  '  "gradient_accumulation_steps": 1,\n  "zero_optimization": {"stage": 2}\n}\n')
    proc = hpcjobs("render", "llama2-lora", *A800, "--nodes", "2", f"finetune.deepspeed_config={ds}",
                   check=False)
    assert proc.returncode == 2
    err = proc.stderr
    assert "64" in err and "16" in err and "256" in err, err
    # The same file agrees with a 4-GPU single node: accepted.
    ok = hpcjobs("render", "llama2-lora", *A800, "--nodes", "1", "finetune.gpus_per_node=4",
                 f"finetune.deepspeed_config={ds}")
    assert '"train_batch_size": 64' in ok.stdout


def test_include_and_hostfile_set_world_size(hpcjobs_home, tmp_path):
    _, p = _build(profile="local", overrides=["model.source=/m", "data.path=/d"],
                  launch={"include": "node1:0,1@node2:0"})
    ft = p.stage("finetune")
    assert (ft.world_size, ft.nodes, ft.gpus_per_node) == (3, 2, 2)
    assert ft.sbatch["nodelist"] == "node1,node2"
    assert ft.ds_config["train_batch_size"] == 3 * 16
    hf = tmp_path / "hosts"
    hf.write_text("# two nodes\nnode1 slots=4\nnode2 slots=4\n")
    _, p = _build(profile="local", overrides=["model.source=/m", "data.path=/d"],
                  launch={"hostfile": str(hf), "exclude": "node2:1,2,3"})
    ft = p.stage("finetune")
    assert (ft.world_size, ft.nodes, ft.gpus_per_node) == (5, 2, 4)
    # A slot-level exclude without a hostfile pins that host into the allocation.
    _, p = _build(profile="a800", overrides=["model.source=/m", "data.path=/d"], cli={"run.nodes": 2},
                  launch={"exclude": "gpu07:7"})
    ft = p.stage("finetune")
    assert ft.world_size == 15 and ft.sbatch["nodelist"] == "gpu07" and ft.ds_filter == ("exclude", "gpu07:7")
    # Excluding a whole host is Slurm's job, and DeepSpeed never sees that host.
    _, p = _build(profile="a800", overrides=["model.source=/m", "data.path=/d"], cli={"run.nodes": 2},
                  launch={"exclude": "gpu03"})
    ft = p.stage("finetune")
    assert ft.world_size == 16 and ft.sbatch["exclude"] == "gpu03" and ft.ds_filter is None


def test_hostfile_errors_name_file_and_line(hpcjobs, tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("node1 slots=4\nnode2 slots=four\n")
    proc = hpcjobs("render", "llama2-lora", "--profile", "local", "model.source=/m", "data.path=/d",
                   "--hostfile", hf, check=False)
    assert proc.returncode == 2 and f"{hf}:2" in proc.stderr, proc.stderr
    hf.write_text("node1 slots=4\nnode2 slots=4\n")
    proc = hpcjobs("render", "llama2-lora", "--profile", "local", "model.source=/m", "data.path=/d",
                   "--hostfile", hf, "--include", "node3:0", check=False)
    assert proc.returncode == 2 and "node3" in proc.stderr, proc.stderr


def test_compose_api_error_type():
    with pytest.raises(ConfigError):
        config.compose("llama2-lora", "a800", overrides=["finetune.nope=1"])


def test_three_stage_fixture_plans(hpcjobs_home):
    c = config.compose(str(FIXTURES / "three-stage.yaml"), "local")
    p = plan.build(c, chain_id="t")
    assert [s.name for s in p.stages] == ["first", "second", "third"]
    assert p.stage("second").after == ["first"]
    assert p.stage("first").nodes == 2 and p.stage("third").nodes == 1
