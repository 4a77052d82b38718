"""hpcjobs.scriptbatch: a script stage's batch arithmetic, settled before submission.

Pure logic (no torch). The real launches with resolved configs are in
tests/test_launchers.py (marked ``train``).
"""

from __future__ import annotations

import pytest

from hpcjobs import launchers
from hpcjobs.errors import ConfigError
from hpcjobs.scriptbatch import Found, merge_ds_updates, read_script_args, resolve_batch

ALL_AUTO = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
            "zero_optimization": {"stage": 2}}


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def values(found: dict) -> dict:
    return {k: v.value for k, v in found.items()}


# --------------------------------------------------------------------------- read_script_args


class TestReadScriptArgs:
    def test_both_forms_and_provenance(self):
        found = read_script_args(["train.py", "--per_device_train_batch_size", "4",
                                  "--gradient_accumulation_steps=2", "--deepspeed", "ds.json",
                                  "--max_grad_norm", "0.5", "--learning_rate", "1e-4", "--output_dir", "out"])
        assert values(found) == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                                 "deepspeed": "ds.json", "max_grad_norm": 0.5}
        assert found["per_device_train_batch_size"].source == "args --per_device_train_batch_size"
        assert found["gradient_accumulation_steps"].source == "args --gradient_accumulation_steps"

    def test_dashed_spelling_and_last_one_wins(self):
        found = read_script_args(["--per-device-train-batch-size", "4", "--per_device_train_batch_size=6",
                                  "--gradient-accumulation-steps=3"])
        assert values(found) == {"per_device_train_batch_size": 6, "gradient_accumulation_steps": 3}

    @pytest.mark.parametrize("args, expect", [
        (["--bf16"], {"bf16": True}),
        (["--bf16", "--fp16", "false"], {"bf16": True, "fp16": False}),
        (["--bf16=no", "--fp16=1"], {"bf16": False, "fp16": True}),
        (["--bf16", "True", "--output_dir", "o"], {"bf16": True}),
        (["--fp16", "--bf16"], {"fp16": True, "bf16": True}),
    ])
    def test_boolean_flags(self, args, expect):
        assert values(read_script_args(args)) == expect

    @pytest.mark.parametrize("args, words", [
        (["--per_device_train_batch_size", "four"], "--per_device_train_batch_size: expected a whole number"),
        (["--gradient_accumulation_steps"], "--gradient_accumulation_steps needs a value"),
        (["--bf16", "maybe"], "--bf16: expected true or false"),
        (["--max_grad_norm=inf"], "--max_grad_norm: expected a finite number"),
    ])
    def test_bad_values(self, args, words):
        msg = error(read_script_args, args)
        assert words in msg and msg.startswith("args: ")

    def test_arguments_after_double_dash_are_not_read(self):
        assert read_script_args(["--", "--per_device_train_batch_size", "4"]) == {}

    def test_trl_config_yaml_with_command_line_winning(self, tmp_path):
        (tmp_path / "grpo.yaml").write_text(
            "model_name_or_path: m\n"
            "per_device_train_batch_size: 8\n"
            "gradient_accumulation_steps: 4\n"
            "bf16: true\n"
            "deepspeed: ds.json\n"
            "env:\n  WANDB_MODE: offline\n")
        found = read_script_args(["--config", "grpo.yaml", "--per_device_train_batch_size", "2"], cwd=tmp_path)
        assert values(found) == {"config": "grpo.yaml", "per_device_train_batch_size": 2,
                                 "gradient_accumulation_steps": 4, "bf16": True, "deepspeed": "ds.json"}
        assert found["per_device_train_batch_size"].source == "args --per_device_train_batch_size"
        assert found["gradient_accumulation_steps"].source == "grpo.yaml:3 gradient_accumulation_steps"
        assert found["bf16"].source == "grpo.yaml:4 bf16"

    def test_trl_config_errors_name_file_and_line(self, tmp_path):
        (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\nper_device_train_batch_size: lots\n")
        msg = error(read_script_args, ["--config", str(tmp_path / "c.yaml")])
        assert "c.yaml:2: per_device_train_batch_size: expected a whole number, got 'lots'" in msg
        assert "TRL config file not found" in error(read_script_args, ["--config", "nope.yaml"], cwd=tmp_path)


# --------------------------------------------------------------------------- resolve_batch: the seed cases


def flags(m=4, g=2, **more):
    args = ["--per_device_train_batch_size", str(m), "--gradient_accumulation_steps", str(g)]
    for k, v in more.items():
        args += [f"--{k}", str(v)]
    return read_script_args(args)


def test_seed_json_disagrees_with_the_flags():
    """The JSON says 32, the script's flags give 4 × 2 on 2 processes = 16: refused, with all four numbers."""
    msg = error(resolve_batch, declared=None, from_args=flags(4, 2), ds_json={"train_batch_size": 32},
                world_size=2, hf_script=True, ds_source="ds.json")
    assert ("train_batch_size is 32 (ds.json train_batch_size) but micro_batch_per_gpu 4 "
            "(args --per_device_train_batch_size) × gradient_accumulation_steps 2 "
            "(args --gradient_accumulation_steps) × world size 2 = 16") in msg
    assert "needs gradient_accumulation_steps 4" in msg  # the hint


def test_seed_all_auto_resolved_from_the_flags():
    res = resolve_batch(declared=None, from_args=flags(4, 2), ds_json=ALL_AUTO, world_size=2, hf_script=True)
    assert tuple(res.numbers) == (16, 4, 2, 2)
    assert {k: res.ds_json[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                        "gradient_accumulation_steps")} == {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    # the rest stays for the HF Trainer to fill
    assert res.ds_json["gradient_clipping"] == "auto" and res.ds_json["bf16"] == {"enabled": "auto"}
    assert res.ds_json["optimizer"]["params"]["lr"] == "auto"
    assert res.provenance == {"train_batch_size": "derived: M × G × W",
                              "micro_batch_per_gpu": "args --per_device_train_batch_size",
                              "gradient_accumulation_steps": "args --gradient_accumulation_steps"}
    assert res.script_args == []
    assert ALL_AUTO["train_batch_size"] == "auto"  # the input is not modified


def test_seed_accelerate_gradient_accumulation_auto():
    """gradient_accumulation_steps: auto in an accelerate YAML: removed from the YAML, and the
    DeepSpeed JSON gets the concrete number."""
    user = {"distributed_type": "DEEPSPEED",
            "deepspeed_config": {"gradient_accumulation_steps": "auto", "zero_stage": 2}}
    cfg, notes = launchers.accelerate_yaml(user, num_machines=2, num_processes=4, deepspeed_config="/run/ds.json",
                                           mixed_precision="bf16")
    assert "gradient_accumulation_steps" not in cfg["deepspeed_config"]
    ds = merge_ds_updates({"train_batch_size": "auto", "gradient_accumulation_steps": "auto"}, notes.ds_updates)
    res = resolve_batch(declared={"micro_batch_size": 2, "grad_accum": 4, "global_batch_size": None}, from_args={},
                        ds_json=ds, world_size=4, hf_script=False)
    assert res.ds_json["gradient_accumulation_steps"] == 4
    assert res.ds_json["train_batch_size"] == 32 and res.ds_json["train_micro_batch_size_per_gpu"] == 2
    assert res.ds_json["zero_optimization"] == {"stage": 2}
    assert res.ds_json["bf16"] == {"enabled": True} and res.ds_json["fp16"] == {"enabled": False}
    assert res.provenance["gradient_accumulation_steps"] == "batch.grad_accum"


# --------------------------------------------------------------------------- resolve_batch: derivations


class TestDerive:
    def test_global_batch_and_micro_give_accumulation(self):
        res = resolve_batch(declared={"global_batch_size": 64, "micro_batch_size": 4}, from_args={},
                            ds_json={"zero_optimization": {"stage": 1}}, world_size=8, hf_script=True)
        assert tuple(res.numbers) == (64, 4, 2, 8)
        assert res.provenance["gradient_accumulation_steps"] == "derived: T / (M × W)"
        assert res.provenance["train_batch_size"] == "batch.global_batch_size"
        # the HF script gets the numbers it must use
        assert res.script_args == ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]

    def test_json_total_and_flag_accumulation_give_micro(self):
        res = resolve_batch(declared=None, from_args=read_script_args(["--gradient_accumulation_steps", "2"]),
                            ds_json={"train_batch_size": 32}, world_size=4, hf_script=True)
        assert tuple(res.numbers) == (32, 4, 2, 4)
        assert res.provenance["micro_batch_per_gpu"] == "derived: T / (G × W)"
        assert res.script_args == ["--per_device_train_batch_size", "4"]

    def test_only_the_global_batch(self):
        res = resolve_batch(declared={"global_batch_size": 32}, from_args={}, ds_json=None, world_size=4,
                            hf_script=False)
        assert res.ds_json is None and tuple(res.numbers) == (32, 8, 1, 4)

    def test_hf_defaults_are_pinned(self):
        res = resolve_batch(declared=None, from_args={}, ds_json=dict(ALL_AUTO), world_size=2, hf_script=True)
        assert tuple(res.numbers) == (16, 8, 1, 2)
        assert res.provenance["micro_batch_per_gpu"].startswith("HF default")
        assert res.script_args == ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"]

    def test_numbers_from_a_trl_config_are_not_repeated(self, tmp_path):
        (tmp_path / "c.yaml").write_text("per_device_train_batch_size: 2\ngradient_accumulation_steps: 8\n")
        found = read_script_args(["--config", "c.yaml"], cwd=tmp_path)
        res = resolve_batch(declared=None, from_args=found, ds_json=None, world_size=4, hf_script=True)
        assert tuple(res.numbers) == (64, 2, 8, 4) and res.script_args == []
        assert res.provenance["micro_batch_per_gpu"] == "c.yaml:1 per_device_train_batch_size"

    def test_plain_script_without_json_or_numbers(self):
        res = resolve_batch(declared=None, from_args={}, ds_json=None, world_size=4, hf_script=False)
        assert res == (None, None, {}, [])

    def test_sequence_parallel_divides_the_world(self):
        res = resolve_batch(declared={"micro_batch_size": 1, "grad_accum": 1}, from_args={},
                            ds_json={"sequence_parallel_size": 4}, world_size=8, hf_script=False)
        assert tuple(res.numbers) == (2, 1, 1, 2)

    def test_json_values_equal_to_the_flags_are_fine(self):
        ds = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "gradient_clipping": 1.0, "bf16": {"enabled": True}}
        res = resolve_batch(declared=None, from_args=flags(4, 2, max_grad_norm=1, bf16="true"), ds_json=ds,
                            world_size=2, hf_script=True)
        assert tuple(res.numbers) == (16, 4, 2, 2)


# --------------------------------------------------------------------------- resolve_batch: refusals


class TestRefused:
    @pytest.mark.parametrize("ds, words", [
        ({"train_micro_batch_size_per_gpu": 8},
         "the micro batch per GPU is 4 (args --per_device_train_batch_size) but 8 (ds.json "
         "train_micro_batch_size_per_gpu)"),
        ({"gradient_accumulation_steps": 1},
         "gradient accumulation is 2 (args --gradient_accumulation_steps) but 1 (ds.json gradient_accumulation_steps)"),
    ])
    def test_json_disagrees_with_a_flag(self, ds, words):
        assert words in error(resolve_batch, declared=None, from_args=flags(4, 2), ds_json=ds, world_size=2,
                              hf_script=True)

    def test_declared_disagrees_with_a_flag(self):
        msg = error(resolve_batch, declared={"micro_batch_size": 8}, from_args=flags(4, 2), ds_json=None,
                    world_size=2, hf_script=True, declared_source="stages.train.batch")
        assert "the micro batch per GPU is 8 (stages.train.batch.micro_batch_size) but 4 (args " in msg

    def test_declared_total_not_consistent(self):
        msg = error(resolve_batch, declared={"micro_batch_size": 4, "grad_accum": 2, "global_batch_size": 24},
                    from_args={}, ds_json=None, world_size=2, hf_script=False)
        assert "train_batch_size is 24 (batch.global_batch_size) but micro_batch_per_gpu 4" in msg and "= 16" in msg

    def test_total_not_divisible(self):
        msg = error(resolve_batch, declared={"global_batch_size": 30, "micro_batch_size": 4}, from_args={},
                    ds_json=None, world_size=2, hf_script=False)
        assert "train_batch_size 30 (batch.global_batch_size) is not a multiple of" in msg and "= 8" in msg

    def test_gradient_clipping_and_max_grad_norm(self):
        msg = error(resolve_batch, declared=None, from_args=flags(max_grad_norm=0.3),
                    ds_json={"gradient_clipping": 1.0}, world_size=2, hf_script=True)
        assert "ds.json: gradient_clipping is 1 but the script's max_grad_norm is 0.3 (args --max_grad_norm)" in msg

    @pytest.mark.parametrize("flag, ds, words", [
        ("--bf16", {"bf16": {"enabled": False}}, "bf16.enabled is false but the script's --bf16 is true"),
        ("--fp16=false", {"fp16": {"enabled": True}}, "fp16.enabled is true but the script's --fp16 is false"),
    ])
    def test_precision(self, flag, ds, words):
        found = read_script_args(["--per_device_train_batch_size", "1", flag])
        assert words in error(resolve_batch, declared=None, from_args=found, ds_json=ds, world_size=1,
                              hf_script=True)

    def test_auto_in_a_plain_script_names_the_key(self):
        msg = error(resolve_batch, declared=None, from_args=flags(4, 2), ds_json=ALL_AUTO, world_size=2,
                    hf_script=False)
        assert 'ds.json: gradient_clipping is "auto", which only the HF Trainer fills in' in msg
        assert "bf16.enabled" in msg and "optimizer.params.lr" in msg

    def test_plain_script_with_batch_autos_only_is_resolved(self):
        ds = {k: ALL_AUTO[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                       "gradient_accumulation_steps")}
        res = resolve_batch(declared={"micro_batch_size": 2}, from_args={}, ds_json=ds, world_size=3,
                            hf_script=False)
        assert res.ds_json == {"train_batch_size": 6, "train_micro_batch_size_per_gpu": 2,
                               "gradient_accumulation_steps": 1}

    def test_nothing_sets_the_batch(self):
        msg = error(resolve_batch, declared=None, from_args={}, ds_json={"train_batch_size": "auto"},
                    world_size=2, hf_script=False)
        assert "nothing sets the batch size" in msg

    def test_json_types_checked(self):
        msg = error(resolve_batch, declared=None, from_args={}, ds_json={"train_batch_size": "16"}, world_size=2,
                    hf_script=True, ds_source="my.json")
        assert msg.startswith("my.json") and "train_batch_size" in msg

    def test_bad_declared_and_world(self):
        assert "unknown key(s) micro" in error(resolve_batch, declared={"micro": 1}, from_args={}, ds_json=None,
                                               world_size=1, hf_script=True)
        assert "micro_batch_size: must be a positive integer" in error(
            resolve_batch, declared={"micro_batch_size": 0}, from_args={}, ds_json=None, world_size=1,
            hf_script=True)
        assert "world_size" in error(resolve_batch, declared=None, from_args={}, ds_json=None, world_size=0,
                                     hf_script=True)

    def test_found_values_from_elsewhere(self):
        """from_args takes any Found, e.g. a value the lead reads from the stage settings."""
        res = resolve_batch(declared=None, from_args={"per_device_train_batch_size": Found(2, "stage.x")},
                            ds_json=None, world_size=2, hf_script=False)
        assert res.provenance["micro_batch_per_gpu"] == "stage.x" and tuple(res.numbers) == (4, 2, 1, 2)


# --------------------------------------------------------------------------- merge_ds_updates


class TestMergeDsUpdates:
    def test_fills_absent_and_auto(self):
        out = merge_ds_updates({"gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}},
                               {"gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
                                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
        assert out == {"gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
                       "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
        assert merge_ds_updates(None, {"bf16": {"enabled": True}}) == {"bf16": {"enabled": True}}
        assert merge_ds_updates({"gradient_clipping": 1}, {"gradient_clipping": 1.0}) == {"gradient_clipping": 1}

    def test_conflict_names_both(self):
        msg = error(merge_ds_updates, {"zero_optimization": {"stage": 3}}, {"zero_optimization": {"stage": 2}},
                    updates_source="acc.yaml", ds_source="ds.json")
        assert "zero_optimization.stage is 3 in ds.json but acc.yaml makes it 2" in msg
        msg = error(merge_ds_updates, {"bf16": {"enabled": False}}, {"bf16": {"enabled": True}})
        assert "bf16.enabled is false" in msg
