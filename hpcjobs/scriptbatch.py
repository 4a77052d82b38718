"""Batch arithmetic of a ``script`` stage, settled on the login node before submission.

A user's training script gets its batch numbers from up to four places that must agree:
its own flags (``--per_device_train_batch_size 4 --gradient_accumulation_steps 2``, or
a TRL ``--config FILE.yaml``), the DeepSpeed JSON (``train_batch_size``,
``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``), the accelerate
YAML (``deepspeed_config.gradient_accumulation_steps``, moved into the JSON by
:func:`hpcjobs.launchers.accelerate_yaml`) and the stage's ``batch:`` block
(``micro_batch_size``, ``grad_accum``, ``global_batch_size``). When they disagree,
DeepSpeed or the HF Trainer stops the job on the allocated nodes, after the queue
wait; hpcjobs checks here instead and writes a DeepSpeed JSON whose three batch keys
are concrete and consistent with the world size.

With T = global batch, M = micro batch per GPU, G = gradient accumulation steps and W
the (data-parallel) world size, ``T == M × G × W`` must hold; two of the three plus W
give the third (DeepSpeed's own rules, :func:`hpcjobs.dsconfig.resolve_batch_numbers`).

Standard library plus PyYAML (a core dependency): this runs on the login node.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from . import dsconfig
from .errors import ConfigError

AUTO = "auto"

TRAIN_BATCH = dsconfig.TRAIN_BATCH
MICRO_BATCH = dsconfig.MICRO_BATCH
GRAD_ACC = dsconfig.GRAD_ACC

#: HF ``TrainingArguments`` defaults (TRL's configs keep these two)
HF_DEFAULT_MICRO_BATCH = 8
HF_DEFAULT_GRAD_ACC = 1


class Found(NamedTuple):
    """A value and where it came from, e.g. ``Found(4, "args --per_device_train_batch_size")``."""

    value: Any
    source: str


# --------------------------------------------------------------------------- the script's flags

# canonical name -> kind
_FLAGS = {
    "per_device_train_batch_size": "int",
    "gradient_accumulation_steps": "int",
    "deepspeed": "str",
    "max_grad_norm": "float",
    "bf16": "bool",
    "fp16": "bool",
}
_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")


def _to_bool(text: str) -> Optional[bool]:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    return None


def _convert(name: str, kind: str, value: Any, source: str) -> Any:
    """A flag's value as the HF argument parser would read it (from text or from YAML)."""
    if kind == "int":
        if isinstance(value, bool):
            raise ConfigError(f"expected a whole number, got {value!r}", source=source)
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"expected a whole number, got {value!r}", source=source) from None
    if kind == "float":
        if isinstance(value, bool):
            raise ConfigError(f"expected a number, got {value!r}", source=source)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected a number, got {value!r}", source=source) from None
        if not math.isfinite(number):
            raise ConfigError(f"expected a finite number, got {value!r}", source=source)
        return number
    if kind == "bool":
        if isinstance(value, bool):
            return value
        parsed = _to_bool(str(value))
        if parsed is None:
            raise ConfigError(f"expected true or false (yes/no, 1/0), got {value!r}", source=source)
        return parsed
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a file name, got {value!r}", source=source)
    return value


def _flag_name(token: str) -> Optional[Tuple[str, Optional[str]]]:
    """``--per-device-train-batch-size=4`` -> (canonical name, "4"); None if not one of ours."""
    if not token.startswith("--"):
        return None
    body, eq, value = token[2:].partition("=")
    name = body.replace("-", "_")
    if name in _FLAGS or name == "config":
        return name, (value if eq else None)
    return None


def read_script_args(args: Sequence[str], *, cwd: "str | os.PathLike[str] | None" = None) -> Dict[str, Found]:
    """The well-known HF/TRL flags among a script's arguments, with where each came from.

    Reads ``--per_device_train_batch_size``, ``--gradient_accumulation_steps``,
    ``--deepspeed FILE``, ``--max_grad_norm``, ``--bf16``/``--fp16`` (alone, or with
    true/false/yes/no/1/0), each as ``--flag value`` or ``--flag=value`` and in the
    dashed spelling the HF parser also accepts (``--per-device-train-batch-size``); the
    last occurrence wins, as with argparse. TRL's ``--config FILE.yaml`` supplies the
    same keys from the YAML (relative to ``cwd``, where the job starts the script), and
    command-line flags win over it, as in ``TrlParser``. ``--deepspeed`` and ``--config``
    paths are returned as written.

    Returns ``{name: Found(value, source)}`` for the flags present, ``name`` being the
    underscore spelling (plus ``"config"`` for the TRL YAML). Sources read
    ``"args --per_device_train_batch_size"`` or ``"train.yaml:3 per_device_train_batch_size"``.
    """
    found: Dict[str, Found] = {}
    i = 0
    args = list(args)
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            break
        parsed = _flag_name(token)
        if parsed is None:
            continue
        name, inline = parsed
        source = f"args --{name}"
        kind = _FLAGS.get(name, "str")
        if inline is not None:
            raw: Any = inline
        elif kind == "bool":
            # nargs="?": takes the next token unless it looks like an option
            if i < len(args) and not args[i].startswith("-"):
                raw = args[i]
                i += 1
            else:
                raw = True
        else:
            if i >= len(args):
                raise ConfigError(f"--{name} needs a value", source="args")
            raw = args[i]
            i += 1
        try:
            found[name] = Found(_convert(name, kind, raw, source), source)
        except ConfigError as e:
            raise ConfigError(f"--{name}: {e.message.split(': ', 1)[-1]}", source="args") from None
    config = found.get("config")
    if config is not None:
        from . import yamlfile

        path = Path(config.value)
        if cwd is not None and not path.is_absolute():
            path = Path(cwd) / path
        data, lines = yamlfile.read(path, what="TRL config")
        for name, kind in _FLAGS.items():
            if name in found or name not in data or data[name] is None:
                continue
            line = lines.get(name)
            source = f"{config.value}:{line} {name}" if line else f"{config.value} {name}"
            try:
                found[name] = Found(_convert(name, kind, data[name], source), source)
            except ConfigError as e:
                raise ConfigError(e.message.split(": ", 1)[-1], key=name, source=str(config.value),
                                  line=line) from None
    return found


# --------------------------------------------------------------------------- resolving the batch


class BatchResolution(NamedTuple):
    """What :func:`resolve_batch` settled.

    ``ds_json``: the DeepSpeed JSON the job uses (None without one), batch keys concrete.
    ``numbers``: :class:`hpcjobs.dsconfig.BatchNumbers` (T, M, G, W), or None when
    nothing fixes the batch (a plain script, no JSON, nothing declared).
    ``provenance``: ``{"train_batch_size"|"micro_batch_per_gpu"|
    "gradient_accumulation_steps": where the number came from}``.
    ``script_args``: flags to append to an HF/TRL script's arguments so that the Trainer
    uses these numbers (``--per_device_train_batch_size``/``--gradient_accumulation_steps``
    when the script's arguments do not set them); empty otherwise.
    """

    ds_json: Optional[Dict[str, Any]]
    numbers: Optional[dsconfig.BatchNumbers]
    provenance: Dict[str, str]
    script_args: List[str]


_NAMES = {"T": TRAIN_BATCH, "M": "micro_batch_per_gpu", "G": GRAD_ACC}
_WHAT = {"T": "the global batch", "M": "the micro batch per GPU", "G": "gradient accumulation"}


def _auto_paths(node: Any, path: Tuple[str, ...] = ()) -> List[str]:
    out: List[str] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            out += _auto_paths(value, path + (str(key),))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _auto_paths(value, path + (str(i),))
    elif node == AUTO:
        out.append(".".join(path))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dp_world(ds_json: Optional[Mapping[str, Any]], world_size: int, ds_source: str) -> int:
    sp = ds_json.get("sequence_parallel_size") if ds_json else None
    if sp is None or sp == 1:
        return world_size
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1 or world_size % sp:
        raise ConfigError(f"sequence_parallel_size {sp!r} does not divide the world size {world_size}",
                          source=ds_source)
    return world_size // sp


def resolve_batch(
    *,
    declared: Optional[Mapping[str, Optional[int]]],
    from_args: Mapping[str, Found],
    ds_json: Optional[Mapping[str, Any]],
    world_size: int,
    hf_script: bool,
    declared_source: str = "batch",
    ds_source: str = "ds.json",
) -> BatchResolution:
    """Settle T, M and G for a script stage and write them into its DeepSpeed JSON.

    Sources, each giving some of the numbers (all concrete values must agree):

    * ``declared``: the stage's ``batch:`` block, ``{micro_batch_size, grad_accum,
      global_batch_size}`` (any may be None), named ``declared_source`` in messages;
    * ``from_args``: :func:`read_script_args` (``per_device_train_batch_size`` → M,
      ``gradient_accumulation_steps`` → G, ``max_grad_norm``, ``bf16``, ``fp16``);
    * ``ds_json``: a user DeepSpeed JSON (``"auto"`` values are open), named ``ds_source``.

    The missing numbers are derived as DeepSpeed derives them (``G = T / (M × W)``,
    ``M = T / (G × W)``, ``T = M × G × W``; with only T, G = 1). For an HF/TRL script
    (``hf_script``) M and G not given anywhere are the Trainer's defaults (8 and 1), and
    the flags for M and G are returned in ``script_args`` when its arguments do not set
    them, so the Trainer, the JSON and the plan agree whatever the script's dataclass
    defaults are. W is the world size divided by the JSON's ``sequence_parallel_size``.

    The returned JSON is a copy of ``ds_json`` with ``train_batch_size``,
    ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps`` concrete.
    Other ``"auto"`` values stay for the HF Trainer to fill when ``hf_script``; for any
    other script they are refused, naming the key path (nothing would fill them in).

    Refused with the numbers in the message (:class:`ConfigError`): ``T != M × G × W``;
    T not divisible as needed; two sources giving different values for one number; a
    concrete ``gradient_clipping``, ``bf16.enabled`` or ``fp16.enabled`` in the JSON that
    disagrees with the script's ``--max_grad_norm``/``--bf16``/``--fp16``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"must be a positive integer, got {world_size!r}", key="world_size")
    declared = dict(declared or {})
    unknown = sorted(set(declared) - {"micro_batch_size", "grad_accum", "global_batch_size"})
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}", source=declared_source)
    if ds_json is not None:
        if not isinstance(ds_json, Mapping):
            raise ConfigError("a DeepSpeed config is a JSON object", source=ds_source)
        dsconfig.check_user_ds_types(ds_json, source=ds_source)
    world = _dp_world(ds_json, world_size, ds_source)

    # ---- collect every concrete value with its source
    candidates: Dict[str, List[Found]] = {"T": [], "M": [], "G": []}
    for letter, key in (("M", "micro_batch_size"), ("G", "grad_accum"), ("T", "global_batch_size")):
        value = declared.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"must be a positive integer, got {value!r}", key=key, source=declared_source)
        candidates[letter].append(Found(value, f"{declared_source}.{key}"))
    for letter, key in (("M", "per_device_train_batch_size"), ("G", "gradient_accumulation_steps")):
        if key in from_args:
            value, source = from_args[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"must be a positive integer, got {value!r}", source=source)
            candidates[letter].append(Found(value, source))
    if ds_json is not None:
        for letter, key in (("T", TRAIN_BATCH), ("M", MICRO_BATCH), ("G", GRAD_ACC)):
            value = ds_json.get(key)
            if value is not None and value != AUTO:
                candidates[letter].append(Found(value, f"{ds_source} {key}"))

    chosen: Dict[str, Found] = {}
    for letter, items in candidates.items():
        if not items:
            continue
        first = items[0]
        for other in items[1:]:
            if other.value != first.value:
                raise ConfigError(
                    f"{_WHAT[letter]} is {first.value} ({first.source}) but {other.value} ({other.source})",
                    hint="set it in one place, or make them equal",
                )
        chosen[letter] = first

    # ---- derive the missing numbers
    t, m, g = (chosen[k].value if k in chosen else None for k in "TMG")
    prov = {k: chosen[k].source for k in chosen}

    def show(letter: str) -> str:
        value = {"T": t, "M": m, "G": g}[letter]
        return f"{_NAMES[letter]} {value} ({prov[letter]})"

    if hf_script and t is None:
        # The Trainer uses its defaults for what nothing sets; hpcjobs pins them (script_args).
        if m is None:
            m, prov["M"] = HF_DEFAULT_MICRO_BATCH, "HF default (TrainingArguments.per_device_train_batch_size)"
        if g is None:
            g, prov["G"] = HF_DEFAULT_GRAD_ACC, "HF default (TrainingArguments.gradient_accumulation_steps)"

    def divide(total: int, by: int, what: str, result: str) -> int:
        if total % by or total < by:
            raise ConfigError(
                f"{show('T')} is not a multiple of {what} = {by}, so {result} = {total} / {by} = "
                f"{total / by:g} is not a whole number"
            )
        return total // by

    if t is not None and m is not None and g is not None:
        if t != m * g * world:
            hint = None
            if t % (m * world) == 0:
                hint = f"with {_NAMES['M']} {m} on world size {world}, {_NAMES['T']} {t} needs {GRAD_ACC} {t // (m * world)}"
            raise ConfigError(
                f"{_NAMES['T']} is {t} ({prov['T']}) but {show('M')} × {show('G')} × world size {world} = {m * g * world}", hint=hint)
    elif t is not None and m is not None:
        g = divide(t, m * world, f"{_NAMES['M']} ({m}) × world size ({world})", GRAD_ACC)
        prov["G"] = "derived: T / (M × W)"
    elif t is not None and g is not None:
        m = divide(t, g * world, f"{GRAD_ACC} ({g}) × world size ({world})", _NAMES["M"])
        prov["M"] = "derived: T / (G × W)"
    elif m is not None and g is not None:
        t = m * g * world
        prov["T"] = "derived: M × G × W"
    elif t is not None:
        g, prov["G"] = 1, "derived: 1 (only the global batch is given; as DeepSpeed does)"
        m = divide(t, world, f"world size ({world})", _NAMES["M"])
        prov["M"] = "derived: T / W"
    elif m is not None:
        g, prov["G"] = 1, "derived: 1 (as DeepSpeed does)"
        t, prov["T"] = m * world, "derived: M × G × W"

    numbers = None
    if t is not None:
        numbers = dsconfig.BatchNumbers(t, m, g, world)
    provenance = {_NAMES[k]: prov[k] for k in "TMG" if k in prov}

    # ---- the other settings the Trainer compares with the JSON
    if ds_json is not None:
        _check_against_flags(ds_json, from_args, ds_source)

    # ---- the JSON the job uses
    resolved = None
    if ds_json is not None:
        if numbers is None:
            raise ConfigError(
                f"nothing sets the batch size: {TRAIN_BATCH} and {MICRO_BATCH} are absent or \"auto\" and "
                f"neither {declared_source} nor the script's arguments give them",
                source=ds_source, hint=f"set {declared_source}.micro_batch_size (or {declared_source}.global_batch_size)",
            )
        resolved = copy.deepcopy(dict(ds_json))
        resolved[TRAIN_BATCH], resolved[MICRO_BATCH], resolved[GRAD_ACC] = t, m, g
        if not hf_script:
            autos = _auto_paths(resolved)
            if autos:
                raise ConfigError(
                    f"{autos[0]} is \"auto\", which only the HF Trainer fills in; this script is not an HF/TRL "
                    "one, so nothing would"
                    + (f" (also: {', '.join(autos[1:5])}{', ...' if len(autos) > 5 else ''})" if autos[1:] else ""),
                    source=ds_source, hint="write the value, or mark the stage's script as an HF/TRL one",
                )
        # DeepSpeed's own check, on what will be written
        dsconfig.resolve_batch_numbers(resolved, world_size=world, source=ds_source)

    script_args: List[str] = []
    if hf_script and numbers is not None:
        if "per_device_train_batch_size" not in from_args:
            script_args += ["--per_device_train_batch_size", str(m)]
        if "gradient_accumulation_steps" not in from_args:
            script_args += ["--gradient_accumulation_steps", str(g)]
    return BatchResolution(resolved, numbers, provenance, script_args)


def _check_against_flags(ds_json: Mapping[str, Any], from_args: Mapping[str, Found], ds_source: str) -> None:
    clip = ds_json.get("gradient_clipping")
    norm = from_args.get("max_grad_norm")
    if norm is not None and _is_number(clip) and float(clip) != float(norm.value):
        raise ConfigError(
            f"gradient_clipping is {clip:g} but the script's max_grad_norm is {norm.value:g} ({norm.source}); "
            "the HF Trainer stops on the mismatch",
            source=ds_source, hint='set gradient_clipping to "auto", or make them equal',
        )
    for key in ("bf16", "fp16"):
        flag = from_args.get(key)
        section = ds_json.get(key)
        enabled = section.get("enabled") if isinstance(section, Mapping) else None
        if flag is not None and isinstance(enabled, bool) and enabled != flag.value:
            raise ConfigError(
                f"{key}.enabled is {json.dumps(enabled)} but the script's --{key} is "
                f"{json.dumps(flag.value)} ({flag.source}); the HF Trainer stops on the mismatch",
                source=ds_source, hint=f'set {key}.enabled to "auto", or make them equal',
            )


# --------------------------------------------------------------------------- accelerate's moved settings


def merge_ds_updates(ds_json: Optional[Mapping[str, Any]], updates: Mapping[str, Any], *,
                     updates_source: str = "accelerate config", ds_source: str = "ds.json") -> Dict[str, Any]:
    """Merge the settings :func:`hpcjobs.launchers.accelerate_yaml` moved out of the
    accelerate YAML (``notes.ds_updates``) into the DeepSpeed JSON.

    A JSON value that is absent or ``"auto"`` takes the YAML's; a concrete one must
    equal it (:class:`ConfigError` naming the key path and both files otherwise).
    """
    out = copy.deepcopy(dict(ds_json or {}))

    def merge(node: Dict[str, Any], upd: Mapping[str, Any], path: Tuple[str, ...]) -> None:
        for key, value in upd.items():
            here = path + (key,)
            if isinstance(value, Mapping):
                current = node.get(key)
                if current is None:
                    node[key] = current = {}
                if not isinstance(current, dict):
                    raise ConfigError(f"{'.'.join(here)} is {current!r}, not an object", source=ds_source)
                merge(current, value, here)
                continue
            current = node.get(key)
            if current is None or current == AUTO:
                node[key] = value
            elif not (type(current) is type(value) and current == value) and not (
                    _is_number(current) and _is_number(value) and float(current) == float(value)):
                raise ConfigError(
                    f"{'.'.join(here)} is {json.dumps(current)} in {ds_source} but {updates_source} makes it "
                    f"{json.dumps(value)}", hint="set it in one place")

    merge(out, updates, ())
    return out


__all__ = ["BatchResolution", "Found", "merge_ds_updates", "read_script_args", "resolve_batch"]
