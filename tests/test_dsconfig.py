"""hpcjobs.dsconfig: the generated DeepSpeed config and its batch arithmetic.

Pure tests, plus ``TestDeepSpeedAccepts`` (marked ``train``), which hands configs to
DeepSpeed's own ``DeepSpeedConfig`` and batch-size code.
"""

from __future__ import annotations

import itertools
import json

import pytest

from hpcjobs.dsconfig import (
    AUTO,
    BatchNumbers,
    build_ds_config,
    check_batch_numbers,
    load_user_ds_config,
    parse_user_ds_config,
    resolve_batch_numbers,
)
from hpcjobs.errors import ConfigError
from hpcjobs.hostspec import filter_resources, world_size

BASE = dict(zero_stage=2, micro_batch_per_gpu=16, gradient_accumulation_steps=1, world_size=16, precision="bf16")


def build(**kwargs):
    return build_ds_config(**{**BASE, **kwargs})


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def check(cfg, micro=16, ga=1, world=16, source="ds_config.json"):
    return check_batch_numbers(
        cfg, micro_batch_per_gpu=micro, gradient_accumulation_steps=ga, world_size=world, source=source
    )


# --------------------------------------------------------------------------- arithmetic


class TestArithmetic:
    def test_two_nodes_of_eight(self):
        world = world_size(filter_resources({"node1": 8, "node2": 8}))
        assert world == 16
        cfg = build(micro_batch_per_gpu=16, gradient_accumulation_steps=1, world_size=world)
        assert cfg["train_batch_size"] == 256
        assert cfg["train_micro_batch_size_per_gpu"] == 16
        assert cfg["gradient_accumulation_steps"] == 1

    @pytest.mark.parametrize("micro, ga, world", [(1, 1, 1), (2, 4, 8), (4, 8, 3), (16, 1, 16), (1, 64, 1)])
    def test_product(self, micro, ga, world):
        cfg = build(micro_batch_per_gpu=micro, gradient_accumulation_steps=ga, world_size=world)
        assert cfg["train_batch_size"] == micro * ga * world

    def test_built_config_passes_its_own_check(self):
        cfg = build(gradient_accumulation_steps=4)
        assert check(cfg, ga=4) == BatchNumbers(1024, 16, 4, 16)


# --------------------------------------------------------------------------- generated config


class TestBuild:
    def test_no_optimizer_or_scheduler(self):
        for stage in range(4):
            cfg = build(zero_stage=stage)
            assert "optimizer" not in cfg and "scheduler" not in cfg

    def test_fixed_keys(self):
        cfg = build()
        assert cfg["steps_per_print"] >= 10**6
        assert cfg["wall_clock_breakdown"] is False
        json.dumps(cfg)  # plain JSON

    def test_stage_0(self):
        assert build(zero_stage=0)["zero_optimization"] == {"stage": 0}

    @pytest.mark.parametrize("stage", [1, 2])
    def test_stage_1_2(self, stage):
        zero = build(zero_stage=stage)["zero_optimization"]
        assert zero["stage"] == stage
        assert zero["contiguous_gradients"] is True and zero["overlap_comm"] is True
        assert zero["reduce_bucket_size"] > 0 and zero["allgather_bucket_size"] > 0
        assert "stage3_gather_16bit_weights_on_model_save" not in zero

    def test_stage_3(self):
        zero = build(zero_stage=3)["zero_optimization"]
        assert zero["stage"] == 3
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert zero["contiguous_gradients"] is True and zero["reduce_bucket_size"] > 0
        assert "allgather_bucket_size" not in zero

    def test_overlap_comm_off(self):
        assert build(overlap_comm=False)["zero_optimization"]["overlap_comm"] is False

    @pytest.mark.parametrize(
        "precision, bf16, fp16", [("bf16", True, False), ("fp16", False, True), ("fp32", False, False)]
    )
    def test_precision(self, precision, bf16, fp16):
        cfg = build(precision=precision)
        assert cfg["bf16"]["enabled"] is bf16 and cfg["fp16"]["enabled"] is fp16
        if fp16:
            assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling

    def test_offload_optimizer(self):
        cfg = build(zero_stage=2, offload_optimizer="cpu")
        assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert "offload_param" not in cfg["zero_optimization"]
        # the HF Trainer's torch optimizer is a "client optimizer" to DeepSpeed
        assert cfg["zero_force_ds_cpu_optimizer"] is False

    def test_offload_param(self):
        cfg = build(zero_stage=3, offload_param="cpu")
        assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
        assert "offload_optimizer" not in cfg["zero_optimization"]
        assert "zero_force_ds_cpu_optimizer" not in cfg

    def test_no_offload_by_default(self):
        zero = build(zero_stage=3)["zero_optimization"]
        assert "offload_optimizer" not in zero and "offload_param" not in zero

    def test_gradient_clipping(self):
        assert build()["gradient_clipping"] == AUTO  # HF fills it from max_grad_norm
        assert build(gradient_clipping=1)["gradient_clipping"] == 1.0
        assert build(gradient_clipping=0.0)["gradient_clipping"] == 0.0

    def test_extra_is_merged_recursively(self):
        cfg = build(
            zero_stage=3,
            extra={
                "zero_optimization": {"stage3_max_live_parameters": 10**8, "stage": 3},
                "bf16": {"enabled": True},
                "x": 1,
            },
        )
        assert cfg["zero_optimization"]["stage3_max_live_parameters"] == 10**8
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert cfg["x"] == 1

    def test_extra_may_set_clipping_left_auto(self):
        assert build(extra={"gradient_clipping": 0.5})["gradient_clipping"] == 0.5

    def test_extra_does_not_leak_into_caller(self):
        extra = {"zero_optimization": {"sub_group_size": 1}}
        cfg = build(extra=extra)
        cfg["zero_optimization"]["sub_group_size"] = 2
        assert extra == {"zero_optimization": {"sub_group_size": 1}}

    @pytest.mark.parametrize(
        "extra, expected",
        [
            ({"zero_optimization": {"stage": 3}}, "extra sets zero_optimization.stage to 3 but zero_stage makes it 2"),
            ({"bf16": {"enabled": False}}, "extra sets bf16.enabled to False but precision makes it True"),
            ({"fp16": {"enabled": True}}, "fp16.enabled"),
            ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer makes it 'none'"),
            ({"gradient_clipping": -1}, "gradient_clipping"),
        ],
    )
    def test_extra_cannot_contradict_arguments(self, extra, expected):
        assert expected in error(build, extra=extra)

    def test_extra_batch_numbers_are_checked(self):
        msg = error(build, extra={"train_batch_size": 64}, source="recipe.yaml")
        assert msg.startswith("recipe.yaml: extra: train_batch_size is 64 but")
        assert "(16) × gradient_accumulation_steps (1) × world size (16) = 256" in msg


class TestBuildRejects:
    @pytest.mark.parametrize("stage", [4, -1, "2", True, None, 2.0])
    def test_zero_stage(self, stage):
        msg = error(build, zero_stage=stage)
        assert msg.startswith("zero_stage: must be one of 0, 1, 2, 3")

    def test_offload_param_needs_stage_3(self):
        msg = error(build, zero_stage=2, offload_param="cpu")
        assert "offload_param: parameter offload needs ZeRO stage 3 (zero_stage is 2)" in msg

    def test_offload_optimizer_needs_stage_1(self):
        msg = error(build, zero_stage=0, offload_optimizer="cpu")
        assert "offload_optimizer: optimizer offload needs ZeRO stage 1, 2 or 3 (zero_stage is 0)" in msg

    @pytest.mark.parametrize("key", ["offload_optimizer", "offload_param"])
    def test_offload_device(self, key):
        assert "must be one of 'none', 'cpu'" in error(build, zero_stage=3, **{key: "nvme"})

    @pytest.mark.parametrize("key", ["micro_batch_per_gpu", "gradient_accumulation_steps", "world_size"])
    @pytest.mark.parametrize("value", [0, -4, 1.5, 2.0, True, "4", None])
    def test_positive_integers(self, key, value):
        msg = error(build, **{key: value})
        assert msg == f"{key}: must be a positive integer, got {value!r}"

    def test_precision(self):
        assert "precision: must be one of 'bf16', 'fp16', 'fp32', got 'bf32'" in error(build, precision="bf32")

    @pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "1.0", True])
    def test_gradient_clipping(self, value):
        assert error(build, gradient_clipping=value).startswith("gradient_clipping: must be a number >= 0")

    def test_overlap_comm(self):
        assert "overlap_comm" in error(build, overlap_comm="yes")

    def test_source_prefixes_messages(self):
        assert error(build, zero_stage=5, source="recipe.yaml").startswith("recipe.yaml: zero_stage: ")


# --------------------------------------------------------------------------- user config checks


class TestCheckBatchNumbers:
    def test_train_batch_mismatch_shows_the_product(self):
        cfg = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1}
        msg = error(check, cfg)
        assert msg.startswith(
            "ds_config.json: train_batch_size is 64 but train_micro_batch_size_per_gpu (16) × "
            "gradient_accumulation_steps (1) × world size (16) = 256"
        )

    def test_train_batch_alone_mismatch(self):
        msg = error(check, {"train_batch_size": 512}, ga=1)
        assert "train_batch_size is 512 but" in msg and "= 256" in msg
        assert "use gradient_accumulation_steps 2" in msg  # the hint

    def test_micro_batch_mismatch(self):
        msg = error(check, {"train_micro_batch_size_per_gpu": 8})
        assert msg.startswith(
            "ds_config.json: train_micro_batch_size_per_gpu is 8 but the job's micro batch per GPU is 16"
        )

    def test_grad_acc_mismatch(self):
        msg = error(check, {"gradient_accumulation_steps": 4}, ga=2)
        assert msg.startswith(
            "ds_config.json: gradient_accumulation_steps is 4 but the job's gradient accumulation is 2"
        )

    def test_matching_concrete_values(self):
        cfg = {"train_batch_size": 512, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2}
        assert check(cfg, ga=2) == BatchNumbers(512, 16, 2, 16)

    @pytest.mark.parametrize(
        "cfg",
        [
            {},
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
            },
            {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 16},
            {"train_batch_size": 256, "gradient_accumulation_steps": "auto"},
            {"train_batch_size": None},
        ],
    )
    def test_auto_and_absent_values_are_accepted(self, cfg):
        assert check(cfg) == BatchNumbers(256, 16, 1, 16)

    def test_ga_from_the_config(self):
        assert check({"gradient_accumulation_steps": 4}, ga=None) == BatchNumbers(1024, 16, 4, 16)

    def test_ga_derived_from_train_batch_size(self):
        assert check({"train_batch_size": 1024}, ga=None) == BatchNumbers(1024, 16, 4, 16)
        assert check({"train_batch_size": "auto"}, ga=None) == BatchNumbers(256, 16, 1, 16)
        assert check({}, ga=None).gradient_accumulation_steps == 1

    @pytest.mark.parametrize("t", [500, 128])
    def test_train_batch_size_must_be_multiple_of_micro_times_world(self, t):
        msg = error(check, {"train_batch_size": t}, ga=None)
        assert f"train_batch_size is {t} but it must be a multiple of" in msg
        assert "train_micro_batch_size_per_gpu (16) × world size (16) = 256" in msg

    @pytest.mark.parametrize(
        "value, expected",
        [("64", "got '64'"), (0, "got 0"), (-8, "got -8"), (True, "got True"), (64.5, "got 64.5"), ([64], "got [64]")],
    )
    def test_bad_values(self, value, expected):
        msg = error(check, {"train_batch_size": value})
        assert (
            msg.startswith('ds_config.json: train_batch_size: must be a positive integer or "auto"') and expected in msg
        )

    def test_float_with_integer_value(self):
        msg = error(check, {"train_micro_batch_size_per_gpu": 16.0})
        assert "must be a whole number, got 16.0: write 16" in msg

    def test_bad_job_numbers(self):
        assert "world_size: must be a positive integer" in error(check, {}, world=0)


class TestResolveBatchNumbers:
    """DeepSpeed's derivation of the missing batch keys, branch by branch."""

    @pytest.mark.parametrize(
        "cfg, world, expected",
        [
            (
                {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
                4,
                (32, 4, 2),
            ),
            ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 4, (32, 4, 2)),
            ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
            ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
            ({"train_batch_size": 32}, 4, (32, 8, 1)),
            ({"train_micro_batch_size_per_gpu": 4}, 4, (16, 4, 1)),
        ],
    )
    def test_branches(self, cfg, world, expected):
        assert resolve_batch_numbers(cfg, world_size=world) == BatchNumbers(*expected, world)

    @pytest.mark.parametrize(
        "cfg, world, expected",
        [
            (
                {"train_batch_size": 33, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
                4,
                "= 32",
            ),
            (
                {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4},
                4,
                "multiple of train_micro_batch_size_per_gpu (4) × world size (4) = 16",
            ),
            ({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4}, 4, "multiple of"),
            (
                {"train_batch_size": 30, "gradient_accumulation_steps": 2},
                4,
                "gradient_accumulation_steps (2) × world size (4) = 8",
            ),
            ({"train_batch_size": 6}, 4, "multiple of world size (4) = 4"),
            ({"gradient_accumulation_steps": 2}, 4, "neither train_batch_size nor train_micro_batch_size_per_gpu"),
            ({}, 1, "neither"),
            ({"train_batch_size": "auto"}, 1, '"auto": only the HF Trainer integration'),
        ],
    )
    def test_failures(self, cfg, world, expected):
        assert expected in error(resolve_batch_numbers, cfg, world_size=world, source="ds.json")


# --------------------------------------------------------------------------- user config files


class TestLoadUserConfig:
    def write(self, tmp_path, text, name="ds_config.json"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    def test_loads_and_keeps_auto(self, tmp_path):
        text = '{"train_batch_size": "auto", "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}'
        cfg = load_user_ds_config(self.write(tmp_path, text))
        assert cfg == {"train_batch_size": "auto", "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
        check(cfg)

    def test_syntax_error_names_file_line_and_column(self, tmp_path):
        path = self.write(tmp_path, '{\n  "zero_optimization": {\n    "stage": 2\n    "overlap_comm": true\n  }\n}\n')
        msg = error(load_user_ds_config, path)
        assert msg.startswith(f"{path}:4: invalid JSON at column 5: Expecting ',' delimiter")
        assert '    "overlap_comm": true\n        ^' in msg
        assert "comma is probably missing" in msg

    @pytest.mark.parametrize(
        "text, line, hint",
        [
            ('{\n  "a": 1,\n}\n', 3, "no comma after the last item"),
            ('{\n  // ZeRO\n  "a": 1\n}', 2, "JSON has no comments"),
            ("{'a': 1}", 1, "double quotes"),
            ('{"a": True}', 1, "lower case"),
        ],
    )
    def test_common_mistakes_get_hints(self, tmp_path, text, line, hint):
        path = self.write(tmp_path, text)
        msg = error(load_user_ds_config, path)
        assert msg.startswith(f"{path}:{line}: invalid JSON") and hint in msg

    def test_duplicate_key(self, tmp_path):
        path = self.write(tmp_path, '{\n  "train_batch_size": 8,\n  "train_batch_size": 16\n}')
        msg = error(load_user_ds_config, path)
        assert msg.startswith(
            f"{path}:3: key 'train_batch_size' appears twice in one object (lines with that key: 2, 3)"
        )

    def test_same_key_in_different_objects_is_fine(self, tmp_path):
        cfg = load_user_ds_config(self.write(tmp_path, '{"bf16": {"enabled": true}, "fp16": {"enabled": false}}'))
        assert cfg["bf16"] == {"enabled": True}

    @pytest.mark.parametrize(
        "text, expected",
        [
            ("", "the file is empty"),
            ("  \n", "the file is empty"),
            ("[1, 2]", "holds a list"),
            ('{"a": NaN}', "NaN is not a JSON number"),
            ("\ufeff{}", "byte-order mark"),
        ],
    )
    def test_other_errors(self, tmp_path, text, expected):
        path = self.write(tmp_path, text)
        msg = error(load_user_ds_config, path)
        assert msg.startswith(f"{path}:") and expected in msg

    def test_missing_file(self, tmp_path):
        path = tmp_path / "nope.json"
        assert error(load_user_ds_config, path) == f"{path}: DeepSpeed config not found"

    def test_not_utf8(self, tmp_path):
        path = tmp_path / "ds.json"
        path.write_bytes(b'{"a": "\xff"}')
        assert "not UTF-8" in error(load_user_ds_config, path)

    def test_parse_text_directly(self):
        assert parse_user_ds_config('{"a": 1}') == {"a": 1}
        assert error(parse_user_ds_config, "{", source="inline").startswith("inline:1: invalid JSON")


# --------------------------------------------------------------------------- DeepSpeed itself


def _valid_combinations():
    for stage, precision, opt, param in itertools.product(
        range(4), ("bf16", "fp16", "fp32"), ("none", "cpu"), ("none", "cpu")
    ):
        if (param == "cpu" and stage != 3) or (opt == "cpu" and stage == 0):
            continue
        yield stage, precision, opt, param


@pytest.fixture(scope="module")
def ds():
    return pytest.importorskip("deepspeed.runtime.config")


@pytest.fixture
def fake_world(ds, monkeypatch):
    """Make DeepSpeedConfig see a world of N ranks without a process group.

    DeepSpeedConfig asks deepspeed.comm for the rank and world size and falls back to
    world size 1 when no process group exists; patching the two functions is enough.
    """
    import deepspeed.comm as dist

    def set_world(n: int) -> None:
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: n)
        monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)

    return set_world


@pytest.mark.train
class TestDeepSpeedAccepts:
    def test_every_option_combination_world_1(self, ds):
        # No process group: DeepSpeedConfig falls back to world size 1.
        combos = list(_valid_combinations())
        assert len(combos) == 27
        for stage, precision, opt, param in combos:
            cfg = build_ds_config(
                zero_stage=stage,
                micro_batch_per_gpu=4,
                gradient_accumulation_steps=2,
                world_size=1,
                precision=precision,
                offload_optimizer=opt,
                offload_param=param,
                gradient_clipping=1.0,
            )
            parsed = ds.DeepSpeedConfig(cfg)
            assert parsed.world_size == 1
            assert (
                parsed.train_batch_size,
                parsed.train_micro_batch_size_per_gpu,
                parsed.gradient_accumulation_steps,
            ) == (8, 4, 2)
            assert parsed.zero_optimization_stage == stage
            assert parsed.bfloat16_config.enabled is (precision == "bf16")
            assert parsed.float16_config.enabled is (precision == "fp16")
            assert parsed.gradient_clipping == 1.0
            assert parsed.zero_force_ds_cpu_optimizer is (opt != "cpu")
            if stage == 3:
                assert parsed.zero_config.gather_16bit_weights_on_model_save is True

    @pytest.mark.parametrize("micro, ga, world", [(16, 1, 16), (2, 8, 8), (1, 3, 24)])
    def test_multi_node_world(self, ds, fake_world, micro, ga, world):
        fake_world(world)
        cfg = build_ds_config(
            zero_stage=3,
            micro_batch_per_gpu=micro,
            gradient_accumulation_steps=ga,
            world_size=world,
            precision="bf16",
            gradient_clipping=1.0,
        )
        parsed = ds.DeepSpeedConfig(cfg)
        assert parsed.world_size == world
        assert parsed.train_batch_size == micro * ga * world
        # and the mock is real: DeepSpeed rejects what hpcjobs rejects
        with pytest.raises(AssertionError, match="train_batch_size is not equal"):
            ds.DeepSpeedConfig({**cfg, "train_batch_size": micro * ga * world + 1})

    def test_batch_derivation_matches_deepspeed(self, ds):
        """resolve_batch_numbers against DeepSpeed's _configure_train_batch_size, every key subset."""
        values = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
        checked = agreed_fail = 0
        for world in (1, 2, 3, 4, 8):
            for t, m, g in itertools.product((None,) + values, (None,) + values[:6], (None,) + values[:5]):
                cfg = {
                    k: v
                    for k, v in (
                        ("train_batch_size", t),
                        ("train_micro_batch_size_per_gpu", m),
                        ("gradient_accumulation_steps", g),
                    )
                    if v is not None
                }
                obj = ds.DeepSpeedConfig.__new__(ds.DeepSpeedConfig)
                obj.world_size = world
                obj.train_batch_size, obj.train_micro_batch_size_per_gpu, obj.gradient_accumulation_steps = t, m, g
                try:
                    obj._configure_train_batch_size()
                    expected = (
                        obj.train_batch_size,
                        obj.train_micro_batch_size_per_gpu,
                        obj.gradient_accumulation_steps,
                    )
                except AssertionError:
                    expected = None
                try:
                    got = tuple(resolve_batch_numbers(cfg, world_size=world))[:3]
                except ConfigError:
                    got = None
                assert got == expected, (cfg, world)
                checked += 1
                agreed_fail += expected is None
        assert checked == 2520 and 0 < agreed_fail < checked

    def test_check_batch_numbers_accepts_only_what_deepspeed_accepts(self, ds):
        """A config that passes check_batch_numbers (all keys concrete) passes DeepSpeed at that world size."""
        for world, micro, ga in itertools.product((1, 2, 4, 16), (1, 2, 16), (1, 3)):
            for t in (micro * ga * world, micro * ga * world * 2, micro * world):
                cfg = {"train_batch_size": t, "train_micro_batch_size_per_gpu": micro}
                try:
                    numbers = check(cfg, micro=micro, ga=None, world=world)
                except ConfigError:
                    numbers = None
                obj = ds.DeepSpeedConfig.__new__(ds.DeepSpeedConfig)
                obj.world_size = world
                obj.train_batch_size, obj.train_micro_batch_size_per_gpu, obj.gradient_accumulation_steps = (
                    t,
                    micro,
                    None,
                )
                obj._configure_train_batch_size()
                assert numbers == BatchNumbers(obj.train_batch_size, micro, obj.gradient_accumulation_steps, world)
