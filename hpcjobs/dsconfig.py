"""The DeepSpeed config of a fine-tuning job, and its batch-size arithmetic.

DeepSpeed refuses to start when ``train_batch_size`` is not
``train_micro_batch_size_per_gpu × gradient_accumulation_steps × world_size``
(``AssertionError: Check batch related parameters. train_batch_size is not equal to
micro_batch_per_gpu * gradient_acc_step * world_size``), and it finds out only on the
allocated nodes, after the job has waited in the queue. hpcjobs therefore computes
``train_batch_size`` itself from the numbers it also hands to the HF Trainer, and
checks a user-supplied config against them on the login node.

Like :mod:`hpcjobs.hostspec` this module uses only the standard library: it runs on
the login node, where importing deepspeed (and with it torch) is not possible or not
wanted. ``tests/test_dsconfig.py`` feeds generated configs to DeepSpeed's own
``DeepSpeedConfig`` (marked ``train``) to prove DeepSpeed accepts them.

``world_size`` throughout means the data-parallel world size DeepSpeed divides the
batch over: the number of GPU processes, divided by the sequence-parallel degree
when a config sets ``sequence_parallel_size``.

How DeepSpeed resolves the three batch keys (``DeepSpeedConfig._configure_train_batch_size``)
----------------------------------------------------------------------------------------------
With T = train_batch_size, M = train_micro_batch_size_per_gpu, G =
gradient_accumulation_steps and W the world size, DeepSpeed fills what is missing
with floor divisions and then asserts ``T == M × G × W``:

* T, M, G given: nothing derived;
* T, M: ``G = T // M // W``, so T must be a multiple of M × W;
* T, G: ``M = T // W // G``, so T must be a multiple of G × W;
* M, G: ``T = M × G × W``;
* only T: ``G = 1``, ``M = T // W``; only M: ``G = 1``, ``T = M × W``;
* neither T nor M: error.

All three must come out positive. :func:`resolve_batch_numbers` reproduces this.

``"auto"`` (the HF Trainer convention) stands for "filled in by the HF integration from
``TrainingArguments``"; an ``"auto"`` value is never checked here. The HF integration
also checks every *concrete* value against its own arguments and aborts on a mismatch,
and leaves an absent key absent, which is why :func:`check_batch_numbers` compares
concrete values with the job's numbers rather than only with each other.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from hpcjobs.errors import ConfigError
from hpcjobs.userfiles import read_text

AUTO = "auto"
PRECISIONS = ("bf16", "fp16", "fp32")
OFFLOAD_DEVICES = ("none", "cpu")
ZERO_STAGES = (0, 1, 2, 3)

TRAIN_BATCH = "train_batch_size"
MICRO_BATCH = "train_micro_batch_size_per_gpu"
GRAD_ACC = "gradient_accumulation_steps"

# DeepSpeed prints a progress line every steps_per_print steps; the HF Trainer logs
# progress itself, so keep DeepSpeed quiet.
STEPS_PER_PRINT = 1_000_000_000
# Gradient reduction bucket (elements). DeepSpeed's default is 5e8; with
# overlap_comm, ZeRO-2 keeps several buckets alive, and DeepSpeed's own ZeRO-2
# examples use 2e8. Override through ``extra`` for very large models.
REDUCE_BUCKET_SIZE = 200_000_000
ALLGATHER_BUCKET_SIZE = 200_000_000


class BatchNumbers(NamedTuple):
    """The batch numbers a DeepSpeed run will use."""

    train_batch_size: int
    micro_batch_per_gpu: int
    gradient_accumulation_steps: int
    world_size: int


# --------------------------------------------------------------------------- validation helpers


def _positive_int(value: Any, name: str, source: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"must be a positive integer, got {value!r}", key=name, source=source)
    return value


def _choice(value: Any, name: str, choices: tuple, source: str | None = None) -> Any:
    if not any(type(value) is type(c) and value == c for c in choices):  # 2.0 and True are not 2 and 1
        shown = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"must be one of {shown}, got {value!r}", key=name, source=source)
    return value


def _config_number(cfg: Mapping[str, Any], key: str, source: str) -> int | str | None:
    """A batch key of a user config: None (absent or null), "auto", or a positive int."""
    value = cfg.get(key)
    if value is None or value == AUTO:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 1:
        raise ConfigError(
            f'must be a whole number, got {value!r}: write {int(value)} (or "auto")', key=key, source=source
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f'must be a positive integer or "auto", got {value!r}', key=key, source=source)
    return value


# --------------------------------------------------------------------------- batch arithmetic


def resolve_batch_numbers(cfg: Mapping[str, Any], *, world_size: int, source: str = "DeepSpeed config") -> BatchNumbers:
    """Resolve a config's batch keys the way DeepSpeed does, for a given world size.

    Mirrors ``DeepSpeedConfig._set_batch_related_parameters`` and ``_batch_assertion``
    (see the module docstring), with the reason spelled out when DeepSpeed would fail.
    ``"auto"`` values cannot be resolved without the HF integration: they are an error
    here; use :func:`check_batch_numbers` for configs that may contain them.
    """
    world = _positive_int(world_size, "world_size")
    t, m, g = (_config_number(cfg, k, source) for k in (TRAIN_BATCH, MICRO_BATCH, GRAD_ACC))
    autos = [k for k, v in ((TRAIN_BATCH, t), (MICRO_BATCH, m), (GRAD_ACC, g)) if v == AUTO]
    if autos:
        raise ConfigError(
            f'{", ".join(autos)} is "auto": only the HF Trainer integration can fill it in', source=source
        )

    def multiple_of(total: int, factor_desc: str, factor: int) -> None:
        if total % factor or total < factor:
            raise ConfigError(
                f"{TRAIN_BATCH} is {total} but it must be a multiple of {factor_desc} = {factor} "
                f"so that DeepSpeed can split it evenly ({total} / {factor} = {total / factor:g})",
                source=source,
            )

    if t is not None and m is not None and g is not None:
        pass
    elif t is not None and m is not None:
        multiple_of(t, f"{MICRO_BATCH} ({m}) × world size ({world})", m * world)
        g = t // m // world
    elif t is not None and g is not None:
        multiple_of(t, f"{GRAD_ACC} ({g}) × world size ({world})", g * world)
        m = t // world // g
    elif m is not None and g is not None:
        t = m * g * world
    elif t is not None:
        multiple_of(t, f"world size ({world})", world)
        g, m = 1, t // world
    elif m is not None:
        g, t = 1, m * world
    else:
        raise ConfigError(
            f"neither {TRAIN_BATCH} nor {MICRO_BATCH} is set; DeepSpeed needs at least one of them",
            source=source,
        )
    if t != m * g * world:
        raise ConfigError(
            f"{TRAIN_BATCH} is {t} but {MICRO_BATCH} ({m}) × {GRAD_ACC} ({g}) × world size ({world}) = {m * g * world}",
            source=source,
        )
    return BatchNumbers(t, m, g, world)


def check_batch_numbers(
    cfg: Mapping[str, Any],
    *,
    micro_batch_per_gpu: int,
    gradient_accumulation_steps: int | None,
    world_size: int,
    source: str,
) -> BatchNumbers:
    """Check a (user) DeepSpeed config's batch keys against the job's numbers.

    Each of the three keys may be absent, ``"auto"`` (left for the HF integration to
    fill), or a concrete positive integer. Concrete values must agree with the job:
    ``train_micro_batch_size_per_gpu == micro_batch_per_gpu``,
    ``gradient_accumulation_steps == gradient_accumulation_steps`` and
    ``train_batch_size == micro × GA × world``. Raises :class:`ConfigError` showing
    the numbers and their product otherwise, e.g. ``ds_config.json: train_batch_size
    is 64 but train_micro_batch_size_per_gpu (16) × gradient_accumulation_steps (1) ×
    world size (16) = 256``.

    ``gradient_accumulation_steps=None`` means the job leaves it to the config: it is
    taken from a concrete ``gradient_accumulation_steps``, else derived from a concrete
    ``train_batch_size`` as DeepSpeed derives it from T and M (T must be a multiple of
    micro × world), else 1. Returns the numbers the run will use.
    """
    micro = _positive_int(micro_batch_per_gpu, "micro_batch_per_gpu")
    world = _positive_int(world_size, "world_size")
    t, m, g = (_config_number(cfg, k, source) for k in (TRAIN_BATCH, MICRO_BATCH, GRAD_ACC))

    if isinstance(m, int) and m != micro:
        raise ConfigError(
            f"{MICRO_BATCH} is {m} but the job's micro batch per GPU is {micro}; "
            f'set them to the same value, or write "auto" in the config',
            source=source,
        )
    if gradient_accumulation_steps is None:
        if isinstance(g, int):
            ga = g
        elif isinstance(t, int):
            if t % (micro * world) or t < micro * world:
                raise ConfigError(
                    f"{TRAIN_BATCH} is {t} but it must be a multiple of {MICRO_BATCH} ({micro}) × "
                    f"world size ({world}) = {micro * world}, so that {GRAD_ACC} = {TRAIN_BATCH} / "
                    f"{micro * world} is a whole number (here {t / (micro * world):g})",
                    source=source,
                )
            ga = t // (micro * world)
        else:
            ga = 1
    else:
        ga = _positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        if isinstance(g, int) and g != ga:
            raise ConfigError(
                f"{GRAD_ACC} is {g} but the job's gradient accumulation is {ga}; "
                f'set them to the same value, or write "auto" in the config',
                source=source,
            )
    product = micro * ga * world
    if isinstance(t, int) and t != product:
        raise ConfigError(
            f"{TRAIN_BATCH} is {t} but {MICRO_BATCH} ({micro}) × {GRAD_ACC} ({ga}) × world size ({world}) = {product}",
            source=source,
            hint=_batch_hint(t, micro, ga, world),
        )
    return BatchNumbers(product, micro, ga, world)


def _batch_hint(t: int, micro: int, ga: int, world: int) -> str | None:
    if t % (micro * world) == 0:
        return (
            f"to keep train_batch_size {t} at world size {world}, use gradient_accumulation_steps "
            f"{t // (micro * world)}; or remove train_batch_size and let hpcjobs compute it"
        )
    return 'remove train_batch_size (or set it to "auto") and let hpcjobs compute it'


# --------------------------------------------------------------------------- building a config


def build_ds_config(
    *,
    zero_stage: int,
    micro_batch_per_gpu: int,
    gradient_accumulation_steps: int,
    world_size: int,
    precision: str,
    gradient_clipping: float | str | None = None,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    overlap_comm: bool = True,
    extra: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Build the DeepSpeed config dict for an HF Trainer job.

    * ``train_batch_size`` = micro × GA × world, with the two factors written too.
    * No ``optimizer``/``scheduler`` block: the HF Trainer supplies its torch optimizer
      and scheduler (DeepSpeed's own optimizers need compiled C++/CUDA ops).
    * ``zero_optimization``: ``stage``; for stages 1-3 ``contiguous_gradients``,
      ``overlap_comm``, ``reduce_scatter`` and bucket sizes; for stage 3
      ``stage3_gather_16bit_weights_on_model_save: true`` so ``save_model`` writes a
      usable consolidated checkpoint.
    * ``offload_optimizer="cpu"`` (stage ≥ 1) → ``{"device": "cpu", "pin_memory": true}``
      and ``zero_force_ds_cpu_optimizer: false``: DeepSpeed otherwise refuses a client
      (torch) optimizer with ZeRO-Offload, and the HF Trainer's optimizer is one.
      ``offload_param="cpu"`` needs stage 3.
    * ``bf16.enabled`` / ``fp16.enabled`` per ``precision`` (both false for fp32);
      the HF Trainer aborts if its ``bf16``/``fp16`` arguments disagree.
    * ``gradient_clipping``: a number ≥ 0 (0 = no clipping), or None for ``"auto"``,
      which the HF integration fills from ``TrainingArguments.max_grad_norm``. (An
      absent key would silently disable clipping under the HF Trainer, which leaves
      clipping to DeepSpeed.)
    * ``steps_per_print`` huge, ``wall_clock_breakdown`` false.
    * ``extra`` is merged in last, recursively for nested objects. It may add keys
      but not contradict the arguments above (stage, precision, offload devices,
      gradient clipping, batch numbers): that is a ConfigError naming both values.

    ``source`` (e.g. the recipe file) prefixes error messages.
    """
    stage = _choice(zero_stage, "zero_stage", ZERO_STAGES, source)
    micro = _positive_int(micro_batch_per_gpu, "micro_batch_per_gpu", source)
    ga = _positive_int(gradient_accumulation_steps, "gradient_accumulation_steps", source)
    world = _positive_int(world_size, "world_size", source)
    precision = _choice(precision, "precision", PRECISIONS, source)
    offload_optimizer = _choice(offload_optimizer, "offload_optimizer", OFFLOAD_DEVICES, source)
    offload_param = _choice(offload_param, "offload_param", OFFLOAD_DEVICES, source)
    if not isinstance(overlap_comm, bool):
        raise ConfigError(f"must be true or false, got {overlap_comm!r}", key="overlap_comm", source=source)
    if offload_param != "none" and stage != 3:
        raise ConfigError(
            f"parameter offload needs ZeRO stage 3 (zero_stage is {stage}): only stage 3 partitions "
            "the parameters themselves",
            key="offload_param",
            source=source,
            hint="set zero_stage: 3, or offload_optimizer only (stage 1 or 2)",
        )
    if offload_optimizer != "none" and stage == 0:
        raise ConfigError(
            "optimizer offload needs ZeRO stage 1, 2 or 3 (zero_stage is 0)",
            key="offload_optimizer",
            source=source,
        )
    if gradient_clipping is None or gradient_clipping == AUTO:
        clip: float | str = AUTO
    elif (
        isinstance(gradient_clipping, bool)
        or not isinstance(gradient_clipping, (int, float))
        or not math.isfinite(gradient_clipping)
        or gradient_clipping < 0
    ):
        raise ConfigError(
            f"must be a number >= 0 (0 turns clipping off), got {gradient_clipping!r}",
            key="gradient_clipping",
            source=source,
        )
    else:
        clip = float(gradient_clipping)

    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=overlap_comm,
            reduce_scatter=True,
            reduce_bucket_size=REDUCE_BUCKET_SIZE,
        )
    if stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=ALLGATHER_BUCKET_SIZE)
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    cfg: dict[str, Any] = {
        TRAIN_BATCH: micro * ga * world,
        MICRO_BATCH: micro,
        GRAD_ACC: ga,
        "gradient_clipping": clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        # Dynamic loss scaling, DeepSpeed's documented defaults written out.
        cfg["fp16"].update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1)
    if offload_optimizer == "cpu":
        cfg["zero_force_ds_cpu_optimizer"] = False

    if extra:
        if not isinstance(extra, Mapping):
            raise ConfigError(f"must be a mapping, got {type(extra).__name__}", key="extra", source=source)
        owned = copy.deepcopy(cfg)
        cfg = _merge(cfg, extra)
        _check_not_overridden(owned, cfg, source)
        check_batch_numbers(
            cfg,
            micro_batch_per_gpu=micro,
            gradient_accumulation_steps=ga,
            world_size=world,
            source=f"{source}: extra" if source else "extra",
        )
    return cfg


# Paths in the built config that come from build_ds_config's arguments; ``extra`` may
# repeat them but not change them.
_OWNED_PATHS = (
    (TRAIN_BATCH,),
    (MICRO_BATCH,),
    (GRAD_ACC,),
    ("gradient_clipping",),
    ("bf16", "enabled"),
    ("fp16", "enabled"),
    ("zero_optimization", "stage"),
    ("zero_optimization", "offload_optimizer", "device"),
    ("zero_optimization", "offload_param", "device"),
)
_ARGUMENT_FOR = {
    ("gradient_clipping",): "gradient_clipping",
    ("bf16", "enabled"): "precision",
    ("fp16", "enabled"): "precision",
    ("zero_optimization", "stage"): "zero_stage",
    ("zero_optimization", "offload_optimizer", "device"): "offload_optimizer",
    ("zero_optimization", "offload_param", "device"): "offload_param",
}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _lookup(cfg: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = cfg
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return "none" if path[-1] == "device" else None
        node = node[part]
    return node


def _check_not_overridden(built: Mapping[str, Any], merged: Mapping[str, Any], source: str | None) -> None:
    for path in _OWNED_PATHS:
        if path in ((TRAIN_BATCH,), (MICRO_BATCH,), (GRAD_ACC,)):
            continue  # checked by check_batch_numbers, which shows the arithmetic
        before, after = _lookup(built, path), _lookup(merged, path)
        if type(before) is type(after) and before == after:
            continue
        if path == ("gradient_clipping",) and _is_number(after) and after >= 0:
            if before == AUTO or after == before:
                continue  # a concrete value where "auto" was left open, or 1 for 1.0
        raise ConfigError(
            f"extra sets {'.'.join(path)} to {after!r} but {_ARGUMENT_FOR[path]} makes it {before!r}; "
            "set it in one place",
            source=source,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- user config files


class _DuplicateKey(Exception):
    def __init__(self, key: str, keys: list[str]):
        super().__init__(key)
        self.key = key
        self.keys = keys


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, [k for k, _ in pairs])
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_user_ds_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a user's DeepSpeed config (strict JSON, as the HF Trainer reads it).

    Errors are :class:`ConfigError` naming the file, and for syntax errors the line and
    column with the offending line shown. Duplicate keys (DeepSpeed rejects them when
    it reads the file, the HF Trainer silently keeps the last), ``NaN``/``Infinity``
    and a top level that is not an object are errors too. ``"auto"`` values are kept.
    The nested keys DeepSpeed and the HF integration read must have their JSON types
    (:func:`check_user_ds_types`).
    """
    return parse_user_ds_config(read_text(path, "DeepSpeed config"), source=os.fspath(path))


def parse_user_ds_config(text: str, source: str = "<ds_config>") -> dict[str, Any]:
    """Parse DeepSpeed config JSON text; see :func:`load_user_ds_config`."""
    if text.startswith("\ufeff"):
        raise ConfigError(
            "the file starts with a UTF-8 byte-order mark, which JSON readers (the HF Trainer's "
            "included) reject; save it as UTF-8 without BOM",
            source=source,
            line=1,
        )
    if not text.strip():
        raise ConfigError(
            'the file is empty; a DeepSpeed config is a JSON object like {"zero_optimization": {"stage": 2}}',
            source=source,
        )
    try:
        cfg = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"invalid JSON at column {exc.colno}: {exc.msg}\n{_excerpt(text, exc.lineno, exc.colno)}",
            source=source,
            line=exc.lineno,
            hint=_json_hint(text, exc.pos, exc.msg),
        ) from None
    except _DuplicateKey as exc:
        lines = _lines_naming(text, exc.key)
        where = f" (lines with that key: {', '.join(map(str, lines))})" if lines else ""
        raise ConfigError(
            f"key {exc.key!r} appears twice in one object{where}; DeepSpeed rejects duplicate keys",
            source=source,
            line=lines[1] if len(lines) == 2 else None,
        ) from None
    except ValueError as exc:  # NaN / Infinity
        raise ConfigError(f"invalid JSON: {exc}", source=source) from None
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"a DeepSpeed config is a JSON object ({{...}}), this file holds a {type(cfg).__name__}",
            source=source,
        )
    check_user_ds_types(cfg, source=source, text=text)
    return cfg


# --------------------------------------------------------------------------- user config types
#
# DeepSpeed's pydantic models coerce what they read ("2" -> 2, "yes" -> True, 2.0 -> 2), but
# the HF integration reads the same keys raw: ``is_zero3()`` is ``stage == 3``, ``is_true``
# is Python truthiness ("no" is true), and ``fill_match`` stops the job when a concrete
# value ``!=`` the Trainer's. A value that is not of its JSON type therefore means one thing
# to DeepSpeed and another to the Trainer, inside the job; hpcjobs asks for the JSON type.

OFFLOAD_DEVICES_DS = ("none", "cpu", "nvme")  # DeepSpeed's OffloadDeviceEnum
_PRECISION_SECTIONS = ("bf16", "bfloat16", "fp16")  # "bfloat16": DeepSpeed's old name for "bf16"


def _json_repr(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _line_of(text: str | None, path: tuple[str, ...]) -> int | None:
    """The line of ``"a": ... "b":`` for path (a, b), found in order; None if not found."""
    if not text:
        return None
    pos = 0
    for part in path:
        m = re.compile(re.escape(json.dumps(part)) + r"\s*:").search(text, pos)
        if not m:
            return None
        pos = m.start() + 1
    return text.count("\n", 0, pos) + 1


def check_user_ds_types(cfg: Mapping[str, Any], *, source: str = "<ds_config>", text: str | None = None) -> None:
    """Type-check the keys of a user DeepSpeed config that DeepSpeed and the HF Trainer read.

    ``train_batch_size``/``train_micro_batch_size_per_gpu``/``gradient_accumulation_steps``:
    a positive integer or ``"auto"``; ``gradient_clipping``: a number >= 0 or ``"auto"``;
    ``zero_optimization``: an object with ``stage`` 0-3 (an integer) and ``offload_optimizer``/
    ``offload_param`` objects whose ``device`` is none, cpu or nvme; ``bf16``/``fp16``: objects
    whose ``enabled`` is true, false or ``"auto"``. Errors name the JSON key path (and its
    line when ``text`` is given).
    """

    def fail(path: tuple[str, ...], message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, key=".".join(path), source=source, line=_line_of(text, path), hint=hint)

    for key in (TRAIN_BATCH, MICRO_BATCH, GRAD_ACC):
        try:
            _config_number(cfg, key, source)
        except ConfigError as e:
            raise fail((key,), e.message.removeprefix(f"{source}: {key}: "), e.hint) from None
    clip = cfg.get("gradient_clipping")
    if clip is not None and clip != AUTO and not (_is_number(clip) and clip >= 0):
        raise fail(("gradient_clipping",), f'must be a number >= 0 or "auto", got {_json_repr(clip)}')

    def section(path: tuple[str, ...], value: Any, example: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise fail(path, f"must be a JSON object like {example}, got {_json_repr(value)}")
        return value

    zero = section(("zero_optimization",), cfg.get("zero_optimization"), '{"stage": 2}')
    if "stage" in zero and not any(type(zero["stage"]) is int and zero["stage"] == s for s in ZERO_STAGES):
        raise fail(("zero_optimization", "stage"),
                   f"must be 0, 1, 2 or 3 (a JSON integer), got {_json_repr(zero['stage'])}")
    for part in ("offload_optimizer", "offload_param"):
        off = section(("zero_optimization", part), zero.get(part), '{"device": "cpu"}')
        if "device" in off and off["device"] not in OFFLOAD_DEVICES_DS:
            raise fail(("zero_optimization", part, "device"),
                       f"must be none, cpu or nvme, got {_json_repr(off['device'])}")
    for key in _PRECISION_SECTIONS:
        sec = section((key,), cfg.get(key), '{"enabled": true}')
        if "enabled" in sec and not (isinstance(sec["enabled"], bool) or sec["enabled"] == AUTO):
            raise fail((key, "enabled"), f'must be true, false or "auto", got {_json_repr(sec["enabled"])}')


def check_against_job(
    cfg: Mapping[str, Any],
    *,
    precision: str,
    max_grad_norm: float | None = None,
    precision_from: str = "precision",
    max_grad_norm_from: str = "max_grad_norm",
    source: str = "<ds_config>",
) -> None:
    """A user DeepSpeed config must not contradict the stage it runs in.

    The HF Trainer compares every concrete ``bf16.enabled``, ``fp16.enabled`` and
    ``gradient_clipping`` with its own arguments (the stage's ``precision`` and
    ``max_grad_norm``) and stops the job on a mismatch; ``"auto"`` or an absent key is
    filled in from them. ``*_from`` name the settings in messages.
    """
    precision = _choice(precision, "precision", PRECISIONS, source)
    for key in _PRECISION_SECTIONS:
        sec = cfg.get(key)
        value = sec.get("enabled") if isinstance(sec, Mapping) else None
        want = precision == ("fp16" if key == "fp16" else "bf16")
        if isinstance(value, bool) and value != want:
            raise ConfigError(
                f"{key}.enabled is {_json_repr(value)} but {precision_from} is {precision}; "
                "the HF Trainer stops on the mismatch",
                source=source,
                hint=f'set {key}.enabled to "auto" (hpcjobs fills in the stage\'s precision), '
                f"or change {precision_from.split(' ')[0]}",
            )
    clip = cfg.get("gradient_clipping")
    if max_grad_norm is not None and _is_number(clip) and clip != max_grad_norm:
        raise ConfigError(
            f"gradient_clipping is {_json_repr(clip)} but {max_grad_norm_from} is {max_grad_norm:g}; "
            "the HF Trainer stops on the mismatch",
            source=source,
            hint=f'set gradient_clipping to "auto", or {max_grad_norm_from}={clip:g}',
        )


def _excerpt(text: str, lineno: int, colno: int) -> str:
    lines = text.splitlines() or [""]
    line = lines[lineno - 1] if lineno - 1 < len(lines) else ""
    return f"    {line}\n    {' ' * (colno - 1)}^"


def _json_hint(text: str, pos: int, msg: str) -> str | None:
    char = text[pos] if pos < len(text) else ""
    before = text[:pos].rstrip()
    if char in "/#":
        return "JSON has no comments; remove them"
    if char == "'":
        return "JSON strings and keys use double quotes"
    if before.endswith(",") and char in "}]":
        return "JSON allows no comma after the last item of an object or list"
    if msg.startswith("Expecting ',' delimiter"):
        return "a comma is probably missing at the end of the previous item"
    if msg.startswith("Expecting value") and text[pos : pos + 4] in ("True", "Fals", "None"):
        return "JSON writes true, false and null in lower case"
    return None


def _lines_naming(text: str, key: str) -> list[int]:
    needle = json.dumps(key)
    return [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]


__all__ = [
    "AUTO",
    "BatchNumbers",
    "build_ds_config",
    "check_against_job",
    "check_batch_numbers",
    "check_user_ds_types",
    "load_user_ds_config",
    "parse_user_ds_config",
    "resolve_batch_numbers",
]
