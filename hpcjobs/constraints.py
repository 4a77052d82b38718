"""Closed sets and ranges of configuration values, checked when a chain is composed.

Every choice (``finetune.scheduler``, ``convert.dtype``, ...) is a closed set and
every number has a range. They are declared once, in :mod:`hpcjobs.schema`, next
to the key, with the helpers here (``choice``, ``number``, ``slurm_mem``,
``text_template``), which put a constraint into the dataclass field's
``metadata``. :func:`check` walks the resolved, typed configuration and raises
the first violation as a :class:`~hpcjobs.errors.ConfigError` naming the key and
where its value came from, so a value the job would only trip over on the
cluster (``--signal=B:USR2@-5``, ``NaN`` in ``train.json``, an unknown
scheduler) is refused before anything is rendered or submitted.

Besides the declared constraints, every float anywhere in the tree must be
finite: the rendered JSON files must stay JSON.

Standard library only: this runs on the login node.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import typing
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

META = "hpcjobs.constraint"

_NO_DEFAULT: Any = dataclasses.MISSING


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type: 2.0 is not 2, True is not 1."""
    return type(a) is type(b) and a == b


def _alternatives(values: tuple) -> str:
    shown = [str(v) for v in values]
    if len(shown) == 1:
        return shown[0]
    if len(shown) <= 5:
        return f"{', '.join(shown[:-1])} or {shown[-1]}"
    return f"one of {', '.join(shown)}"


def _num(x: Any) -> str:
    return repr(x) if isinstance(x, float) and not float(x).is_integer() else str(x)


class Constraint:
    """A rule for one key's value. ``problem`` returns what is wrong, or None."""

    def problem(self, value: Any) -> Optional[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Choice(Constraint):
    """One of ``values`` (compared with their type). ``unsupported`` maps members of
    the source set that hpcjobs cannot run to the reason, shown instead."""

    values: tuple
    unsupported: Tuple[Tuple[Any, str], ...] = ()

    def problem(self, value: Any) -> Optional[str]:
        for v, why in self.unsupported:
            if _same(value, v):
                return f"{value!r} {why}; use {_alternatives(self.values).removeprefix('one of ')}"
        if any(_same(value, v) for v in self.values):
            return None
        return f"must be {_alternatives(self.values)}, got {value!r}"

    def describe(self) -> str:
        return _alternatives(self.values)


@dataclass(frozen=True)
class Choices(Choice):
    """A list whose every item is one of ``values`` (e.g. ``finetune.report_to``)."""

    def problem(self, value: Any) -> Optional[str]:
        if not isinstance(value, (list, tuple)):
            return f"must be a list of {_alternatives(self.values).removeprefix('one of ')}, got {value!r}"
        for item in value:
            msg = Choice.problem(self, item)
            if msg is not None:
                return f"each item {msg}" if msg.startswith("must") else msg
        return None

    def describe(self) -> str:
        return f"a list of {_alternatives(self.values).removeprefix('one of ')}"


@dataclass(frozen=True)
class Number(Constraint):
    """A finite number within the bounds given, or one of the special values in ``also``.

    ``message`` replaces the generated "must be ..." part of the error.
    For a list (e.g. ``data.split``) every item must be in range.
    """

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    also: tuple = ()
    message: Optional[str] = None

    def ok(self, value: Any) -> bool:
        if any(_same(value, v) for v in self.also):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def problem(self, value: Any) -> Optional[str]:
        if isinstance(value, (list, tuple)):
            if all(self.ok(v) for v in value):
                return None
            return f"{self.message or 'each item must be ' + self.describe()}, got {list(value)!r}"
        if self.ok(value):
            return None
        finite = isinstance(value, float)
        return f"{self.message or 'must be ' + self.describe(finite)}, got {value!r}"

    def describe(self, finite: bool = False) -> str:
        lo = (">=", self.ge) if self.ge is not None else (">", self.gt) if self.gt is not None else None
        hi = ("<=", self.le) if self.le is not None else ("<", self.lt) if self.lt is not None else None
        if lo and hi and lo[0] == ">=" and hi[0] == "<=":
            text = f"between {_num(lo[1])} and {_num(hi[1])}"
        elif lo and hi:
            text = (f"in {'[' if lo[0] == '>=' else '('}{_num(lo[1])}, "
                    f"{_num(hi[1])}{']' if hi[0] == '<=' else ')'}")
        elif lo:
            text = f"at least {_num(lo[1])}" if lo[0] == ">=" else f"> {_num(lo[1])}"
        elif hi:
            text = f"at most {_num(hi[1])}" if hi[0] == "<=" else f"< {_num(hi[1])}"
        else:
            text = ""
        if self.also:
            text += f" or {_alternatives(self.also).removeprefix('one of ')}"
        if finite:
            return f"a finite number {text}".rstrip()
        return text or "a number"


# Slurm's str_to_mbytes (sbatch --mem): digits, then K, M, G or T, optionally followed
# by B (22.05 ignores what follows the unit letter, 23.02+ accepts only B); no unit is MB.
_MEM_RE = re.compile(r"^([0-9]+)(?:([KkMmGgTt])[Bb]?)?$")
_MEM_FACTOR = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
_MAX_MBYTES = 2 ** 62  # well inside Slurm's signed 64-bit arithmetic


@dataclass(frozen=True)
class SlurmMem(Constraint):
    """A memory size ``sbatch --mem`` parses: ``64G``, ``500M``, ``1T``, ``0`` (all of the node's memory)."""

    def problem(self, value: Any) -> Optional[str]:
        m = _MEM_RE.match(str(value))
        if m and int(m.group(1)) * _MEM_FACTOR[(m.group(2) or "m").lower()] < _MAX_MBYTES:
            return None
        return f"{str(value)!r} is not a Slurm memory size (e.g. 64G, 500M, 0)"

    def describe(self) -> str:
        return "a Slurm memory size (e.g. 64G, 500M, 0)"


@dataclass(frozen=True)
class TextTemplate(Constraint):
    """A ``str.format`` template whose fields are all plain ``{column}`` names.

    The job fills it with ``template.format(**row)`` where every cell is a string, so
    ``{}``/``{0}`` (positional), ``{a.b}``/``{a[0]}`` (attribute/index access),
    ``{a!r}`` (conversion) and ``{a:d}`` (format spec) fail there or turn the text
    into something else; a literal brace is written ``{{`` or ``}}``.
    """

    def problem(self, value: Any) -> Optional[str]:
        try:
            parsed = list(string.Formatter().parse(str(value)))
        except ValueError as e:
            return f"{value!r} is not a valid template: {e} (write {{{{ and }}}} for literal braces)"
        for _, field, spec, conv in parsed:
            if field is None:
                continue
            shown = "{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            if field == "" or field.isdigit():
                return f"{shown} is a positional field; name a column instead, e.g. {{Patient}}"
            if "." in field or "[" in field:
                return f"{shown} uses attribute or index access; only plain {{column}} fields are allowed"
            if conv:
                return f"{shown} has a conversion (!{conv}); only plain {{column}} fields are allowed"
            if spec:
                return f"{shown} has a format spec (:{spec}); only plain {{column}} fields are allowed"
        return None

    def describe(self) -> str:
        return "a text template with plain {column} fields"


AUTO = "auto"
_TRUE, _FALSE = ("true", "yes", "y", "on", "1"), ("false", "no", "n", "off", "0")


@dataclass(frozen=True)
class AutoOr(Constraint):
    """``auto`` (the memory planner chooses the value when the chain is planned) or a value of
    type ``base`` that meets ``inner``.

    OmegaConf's typed configs have no union of int and str, so such a field is typed ``Any`` and a
    command-line value arrives as text; :meth:`convert` turns it into ``base`` with the rules of
    OmegaConf's IntegerNode/BooleanNode, so ``4``, ``true`` or ``1e20`` mean (and fail) as they
    did when the key was typed ``int``/``bool``.
    """

    base: type
    inner: Optional[Constraint] = None

    def convert(self, value: Any) -> Any:
        """``value`` as ``base``; ValueError with the message for a value of the wrong type."""
        if self.base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int):
                return value != 0
            text = str(value).strip().lower()
            if isinstance(value, str) and text in _TRUE + _FALSE:
                return text in _TRUE
            raise ValueError(f"expects true or false, got '{value}'")
        if self.base is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
            raise ValueError(f"expects an integer, got '{value}'")
        return value if isinstance(value, str) else str(value)

    def problem(self, value: Any) -> Optional[str]:
        if value == AUTO:
            return None
        try:
            converted = self.convert(value)
        except ValueError as e:
            return f"{e} (or auto)"
        msg = self.inner.problem(converted) if self.inner is not None else None
        return f"{msg} (or auto)" if msg else None

    def describe(self) -> str:
        inner = self.inner.describe() if self.inner is not None else {bool: "true or false"}.get(self.base, "a value")
        return f"{inner} or auto"


# ---------------------------------------------------------------- field helpers for schema.py

def _field(default: Any, default_factory: Any, constraint: Constraint) -> Any:
    if default_factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=default_factory, metadata={META: constraint})
    return dataclasses.field(default=default, metadata={META: constraint})


def choice(*values: Any, default: Any, unsupported: Optional[Dict[Any, str]] = None) -> Any:
    """A field whose value must be one of ``values``."""
    if default not in values and default is not None:
        raise ValueError(f"default {default!r} is not one of {values!r}")
    return _field(default, _NO_DEFAULT, Choice(tuple(values), tuple((unsupported or {}).items())))


def choices(*values: Any, default_factory: Any, unsupported: Optional[Dict[Any, str]] = None) -> Any:
    """A list field whose items must each be one of ``values``."""
    return _field(_NO_DEFAULT, default_factory, Choices(tuple(values), tuple((unsupported or {}).items())))


def number(default: Any = _NO_DEFAULT, *, default_factory: Any = _NO_DEFAULT, ge: Optional[float] = None,
           gt: Optional[float] = None, le: Optional[float] = None, lt: Optional[float] = None,
           also: tuple = (), message: Optional[str] = None) -> Any:
    """A numeric field (or list of numbers) with a range; floats must also be finite."""
    return _field(default, default_factory, Number(ge, gt, le, lt, tuple(also), message))


def auto_or(default: Any, base: type, inner: Optional[Constraint] = None) -> Any:
    """A field (typed ``Any``) holding ``auto`` or a ``base`` value within ``inner``; see :class:`AutoOr`."""
    return _field(default, _NO_DEFAULT, AutoOr(base, inner))


def slurm_mem(default: Optional[str] = None) -> Any:
    """A memory size for ``sbatch --mem``."""
    return _field(default, _NO_DEFAULT, SlurmMem())


def text_template(default: Any) -> Any:
    """A ``str.format`` text template with plain ``{column}`` fields."""
    return _field(default, _NO_DEFAULT, TextTemplate())


def constraint_of(f: dataclasses.Field) -> Optional[Constraint]:
    return f.metadata.get(META)


# ---------------------------------------------------------------- walking

def declared(cls: type, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field, Any, Optional[Constraint]]]:
    """Every key of a schema dataclass (nested dataclasses included): ``(key, field, type, constraint)``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        yield key, f, tp, constraint_of(f)
        inner = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            yield from declared(inner, f"{key}.")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _walk(obj: Any, prefix: str) -> Iterator[Tuple[str, Any, Optional[Constraint]]]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            key = f"{prefix}{f.name}"
            value = getattr(obj, f.name)
            yield key, value, constraint_of(f)
            yield from _walk(value, f"{key}.")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{prefix}{k}", v, None
            yield from _walk(v, f"{prefix}{k}.")


def _nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_nonfinite(v) for v in value)
    return False


def problems(chain: Any) -> Iterator[Tuple[str, str]]:
    """``(key, message)`` for every value of the resolved tree that breaks its constraint."""
    for key, value, constraint in _walk(chain, ""):
        if value is None:
            continue  # an Optional key left unset: the type allows it
        msg = constraint.problem(value) if constraint is not None else None
        if msg is None and _nonfinite(value):
            msg = f"must be a finite number, got {value!r}"
        if msg is not None:
            yield key, msg


def check(composed: Any, chain: Any) -> None:
    """Raise ``composed.error(key, message)`` for the first value outside its set or range.

    ``chain`` is what :func:`hpcjobs.config.resolve` returns (schema dataclasses).
    """
    for key, msg in problems(chain):
        raise composed.error(key, msg)


__all__ = ["AUTO", "AutoOr", "Choice", "Choices", "Constraint", "Number", "SlurmMem", "TextTemplate", "auto_or", "check",
           "choice", "choices", "constraint_of", "declared", "number", "problems", "slurm_mem", "text_template"]
