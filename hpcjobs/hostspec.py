"""DeepSpeed's hostfile and ``--include``/``--exclude`` grammar, checked before and inside the job.

Users describe the GPUs a DeepSpeed run may use the way the ``deepspeed`` launcher
takes them:

* a **hostfile**, one ``HOST slots=N`` per line, ``#`` comments and blank lines
  allowed (``N`` is the number of GPUs on that host, slots ``0 .. N-1``);
* an **include** or **exclude** spec, ``NODE_SPEC[@NODE_SPEC ...]`` with
  ``NODE_SPEC = HOST[:SLOT[,SLOT ...]]``; a bare ``HOST`` means every slot on it.
  ``node1:0,1@node2`` includes GPUs 0 and 1 of node1 and all of node2.

hpcjobs checks these twice: on the login node before ``sbatch`` (so a typo fails in
a second, not after hours in the queue) and inside the job against the nodes Slurm
actually allocated.

Why this is not imported from DeepSpeed
---------------------------------------
The parsing lives in ``deepspeed.launcher.runner`` (``_parse_hostfile``,
``parse_resource_filter``, ``parse_inclusion_exclusion``), but importing that module
imports ``deepspeed``, which imports torch and probes the accelerator: seconds of
start-up, gigabytes of install, and on a login node often no torch at all. The
login-node install of hpcjobs has no torch or deepspeed (see ``pyproject.toml``), so
this module reimplements the grammar with the standard library only. A differential
test (``tests/test_hostspec.py``, marked ``train``) runs both implementations over
generated inputs and requires the same result, or both to fail.

Semantics kept from DeepSpeed
-----------------------------
* Hostfile lines are stripped; empty lines and lines starting with ``#`` are
  skipped; a line is ``HOST`` (any run of non-blanks), blanks, ``slots=DIGITS``.
  A host listed twice and a file with no hosts are errors.
* ``--include`` and ``--exclude`` are mutually exclusive; with neither, every slot
  of every host is active.
* Every host named must be in the pool, every slot named must exist on its host.
* **Ordering:** the active resources follow the *hostfile* order, not the order of
  the spec (``node2@node1`` still puts rank 0 on node1 when node1 is listed first),
  and the slots of one host are sorted (``node1:3,1`` uses slots ``[1, 3]``).
  DeepSpeed assigns global ranks in exactly this order.
* An exclude that removes every slot of a host removes the host.
* Whitespace around slot numbers is allowed (``node1:0, 1``); in a host name it is
  not (``node1 @node2`` names a host ``"node1 "``, which is not in the hostfile).

Where hpcjobs is stricter (DeepSpeed accepts these and silently does something the
user rarely meant; hpcjobs raises ``ConfigError`` instead):

* a host named twice in one spec: DeepSpeed merges the entries, so
  ``node1@node1:0`` means *only slot 0* of node1, not the whole host;
* a slot named twice (``node1:0,0``; DeepSpeed drops the repeat), and slot numbers
  that are not plain decimal digits (``+1``, ``1_0``, non-ASCII digits: Python's
  ``int()`` accepts them all);
* ``slots=0``, ``slots=4x`` (DeepSpeed reads 4) and other text after ``slots=N``
  other than a ``#`` comment (``node1 slots=4 node2 slots=4`` on one line would make
  DeepSpeed ignore node2);
* host names containing ``@``, ``:`` or ``,``, which the include/exclude grammar
  cannot name;
* an exclude that removes every GPU (DeepSpeed returns an empty pool and fails later
  with an unrelated error).

All errors are :class:`hpcjobs.errors.ConfigError`; hostfile errors carry the file
and line, spec errors quote the spec and the offending entry.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from hpcjobs.errors import ConfigError
from hpcjobs.userfiles import read_text

NODE_SEP = "@"
SLOT_LIST_START = ":"
SLOT_SEP = ","
_RESERVED = (NODE_SEP, SLOT_LIST_START, SLOT_SEP)

# DeepSpeed: r'^(\S+)\s+slots=(\d+)' searched on the stripped line. \d would also
# match non-ASCII digits; hpcjobs takes ASCII digits only and diagnoses the rest.
_HOST_LINE = re.compile(r"(\S+)\s+slots=([0-9]+)")
# Lines split the way Python's text-mode open() splits them (universal newlines),
# which is how DeepSpeed reads the hostfile; str.splitlines() would also split on
# form feeds and other separators that DeepSpeed keeps inside a line.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

_MAX_NAMES_SHOWN = 8


# --------------------------------------------------------------------------- helpers


def _names(hosts: Sequence[str]) -> str:
    hosts = list(hosts)
    if len(hosts) <= _MAX_NAMES_SHOWN:
        return ", ".join(hosts)
    return ", ".join(hosts[:_MAX_NAMES_SHOWN]) + f", ... ({len(hosts)} hosts)"


def _slot_range(n: int) -> str:
    if n == 1:
        return "slot 0"
    return f"slots 0-{n - 1}"


def _check_host_name(host: str, where: str, *, source: str | None = None, line: int | None = None) -> None:
    bad = [c for c in _RESERVED if c in host]
    if bad:
        raise ConfigError(
            f"{where}host name {host!r} contains {' and '.join(repr(c) for c in bad)}, which DeepSpeed's "
            "--include/--exclude syntax uses as a separator, so the host could never be selected",
            source=source,
            line=line,
        )


# --------------------------------------------------------------------------- hostfile


def parse_hostfile(text: str, source: str = "<hostfile>") -> dict[str, int]:
    """Parse DeepSpeed hostfile text into ``{host: slots}``, in file order.

    ``source`` names the file in error messages (``source:LINE: ...``).
    """
    pool: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(_LINE_BREAK.split(text), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _HOST_LINE.match(line)
        if not m:
            raise ConfigError(_diagnose_host_line(line), source=source, line=lineno)
        host, digits = m.group(1), m.group(2)
        rest = line[m.end() :]
        if rest and not (rest[0].isspace() or rest[0] == "#"):
            value = line[m.start(2) :].split()[0]
            raise ConfigError(
                f"bad slot count 'slots={value}' for host {host}: expected a whole number of GPUs, like 'slots=8'",
                source=source,
                line=lineno,
            )
        rest = rest.strip()
        if rest and not rest.startswith("#"):
            raise ConfigError(
                f"unexpected text after '{host} slots={digits}': {rest!r} (one host per line, "
                "'HOST slots=N'; DeepSpeed would silently ignore the rest of the line)",
                source=source,
                line=lineno,
            )
        slots = int(digits)
        if slots == 0:
            raise ConfigError(
                f"host {host} has slots=0: every host in the hostfile needs at least one GPU slot "
                "(remove the line, or use --exclude to leave a host out)",
                source=source,
                line=lineno,
            )
        _check_host_name(host, "", source=source, line=lineno)
        if host in pool:
            raise ConfigError(
                f"host {host} is listed twice (first on line {first_line[host]}); "
                "DeepSpeed refuses hostfiles with multiple entries for one host",
                source=source,
                line=lineno,
            )
        pool[host] = slots
        first_line[host] = lineno
    if not pool:
        raise ConfigError(
            "the hostfile lists no hosts (expected lines like 'node1 slots=8'; "
            "blank lines and '#' comments are ignored)",
            source=source,
        )
    return pool


def _diagnose_host_line(line: str) -> str:
    """Explain why a non-comment hostfile line is not ``HOST slots=N``."""
    fields = line.split()
    if len(fields) == 1:
        if "slots=" in line and not line.startswith("slots="):
            host = line[: line.index("slots=")]
            return f"bad entry {line!r}: put a blank between the host and 'slots=' ('{host} slots=...')"
        return f"{line!r} has no slot count: write '{line} slots=N' with N the number of GPUs on the host"
    host, second = fields[0], fields[1]
    if second.startswith("slots="):
        value = second[len("slots=") :]
        if value == "" and len(fields) > 2:
            return f"bad entry {line!r}: no blanks allowed around '=' (write '{host} slots={fields[2]}')"
        return f"bad slot count {second!r} for host {host}: expected a whole number of GPUs, like 'slots=8'"
    if second == "slots" or (second.startswith("slots") and "=" in line):
        return f"bad entry {line!r}: write '{host} slots=N' with no blanks around '='"
    if second.lower().startswith("slots="):
        return f"bad entry {line!r}: 'slots=' must be lower case"
    return f"bad entry {line!r}: expected 'HOST slots=N' (e.g. 'node1 slots=8')"


def read_hostfile(path: str | os.PathLike[str]) -> dict[str, int]:
    """Read and parse a DeepSpeed hostfile; errors name the path and line.

    Unlike DeepSpeed, which falls back to the local GPUs with only a warning when the
    hostfile does not exist, a missing file is an error: the user named it.
    """
    return parse_hostfile(read_text(path, "hostfile"), source=os.fspath(path))


def format_hostfile(pool: Mapping[str, int]) -> str:
    """Write ``{host: slots}`` as DeepSpeed hostfile text (one ``HOST slots=N`` per line)."""
    lines = []
    for host, slots in pool.items():
        if not host or any(c.isspace() for c in host) or any(c in host for c in _RESERVED):
            raise ValueError(f"cannot write host name {host!r} to a DeepSpeed hostfile")
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"host {host}: slots must be a positive integer, got {slots!r}")
        lines.append(f"{host} slots={slots}\n")
    return "".join(lines)


# --------------------------------------------------------------------------- include / exclude


class _Entry(NamedTuple):
    text: str  # the entry as written, for messages
    host: str
    slots: list[int] | None  # None: the whole host


def _parse_entries(spec: str, label: str) -> list[_Entry]:
    """Split a spec into entries with syntax checked; ``label`` prefixes messages."""
    head = f"{label} {spec!r}: "
    if not spec:
        return []
    entries: list[_Entry] = []
    seen: dict[str, str] = {}
    for part in spec.split(NODE_SEP):
        if part == "":
            raise ConfigError(
                head + "empty entry (a leading or trailing '@', or two in a row); "
                "entries are HOST or HOST:SLOT,SLOT separated by '@'"
            )
        host, colon, slot_text = part.partition(SLOT_LIST_START)
        if SLOT_LIST_START in slot_text:
            raise ConfigError(head + f"entry {part!r} has more than one ':' (write HOST:SLOT,SLOT,...)")
        if host == "":
            raise ConfigError(head + f"entry {part!r} has no host name before ':'")
        if SLOT_SEP in host:
            raise ConfigError(
                head + f"{host!r} is not a host name: separate hosts with '@' "
                f"(e.g. {host.replace(SLOT_SEP, NODE_SEP)!r}); ',' separates slots after ':' "
                "(e.g. 'node1:0,1')"
            )
        if any(c.isspace() for c in host):
            raise ConfigError(head + f"host name {host!r} contains blanks")
        slots: list[int] | None = None
        if colon:
            slots = []
            for item in slot_text.split(SLOT_SEP):
                s = item.strip()
                if s == "":
                    raise ConfigError(head + f"entry {part!r} has an empty slot number")
                if not (s.isascii() and s.isdigit()):
                    raise ConfigError(
                        head + f"entry {part!r}: slot {s!r} is not a GPU index (a whole number like 0 or 3)"
                    )
                n = int(s)
                if n in slots:
                    raise ConfigError(head + f"entry {part!r} names slot {n} twice")
                slots.append(n)
            slots.sort()
        if host in seen:
            raise ConfigError(
                head + f"host {host} appears twice ({seen[host]!r} and {part!r}); list each host once "
                "with all its slots (DeepSpeed would merge them, and a bare host next to HOST:SLOT "
                "would then mean only those slots)"
            )
        seen[host] = part
        entries.append(_Entry(part, host, slots))
    return entries


def parse_spec(spec: str, *, source: str = "--include") -> dict[str, list[int] | None]:
    """Parse an include/exclude spec into ``{host: sorted slots, or None for the whole host}``.

    Only the syntax is checked here (hosts and slots are not known yet). Hosts keep the
    order of the spec; an empty spec gives ``{}``. ``source`` prefixes messages.
    """
    return {e.host: e.slots for e in _parse_entries(spec, source)}


def _check_not_both(include: str, exclude: str, source_include: str, source_exclude: str) -> None:
    if include and exclude:
        raise ConfigError(
            f"{source_include} {include!r} and {source_exclude} {exclude!r} cannot be used together "
            "(DeepSpeed: include and exclude are mutually exclusive); pick one"
        )


def filter_resources(
    pool: Mapping[str, int],
    include: str | None = "",
    exclude: str | None = "",
    *,
    source_include: str = "--include",
    source_exclude: str = "--exclude",
    pool_name: str = "the hostfile",
) -> dict[str, list[int]]:
    """The active resources ``{host: [slot, ...]}`` for a pool and an include or exclude spec.

    Same result as DeepSpeed's ``parse_inclusion_exclusion(pool, include, exclude)``:
    hosts in pool order, slots sorted. ``pool_name`` says what the pool is in messages
    ("the hostfile", "the Slurm allocation").
    """
    include = include or ""
    exclude = exclude or ""
    for host, n in pool.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"host {host} in {pool_name} has {n!r} GPU slots; expected a positive integer")
    _check_not_both(include, exclude, source_include, source_exclude)
    available = {host: list(range(n)) for host, n in pool.items()}
    if not include and not exclude:
        return available

    label, spec = (source_include, include) if include else (source_exclude, exclude)
    entries = _parse_entries(spec, label)
    for e in entries:
        head = f"{label} {e.text!r}: "
        if e.host not in pool:
            hint = None
            if "[" in e.host:
                hint = "DeepSpeed takes plain host names joined by '@', not Slurm hostlist expressions"
            raise ConfigError(head + f"host {e.host} is not in {pool_name} (hosts: {_names(list(pool))})", hint=hint)
        missing = [s for s in (e.slots or []) if s >= pool[e.host]]
        if missing:
            what = "slot" if len(missing) == 1 else "slots"
            raise ConfigError(
                head + f"host {e.host} has no {what} {', '.join(map(str, missing))} "
                f"(it has {_slot_range(pool[e.host])}: slots={pool[e.host]} in {pool_name})"
            )

    if include:
        chosen = {e.host: (e.slots if e.slots is not None else available[e.host]) for e in entries}
        active = {host: list(chosen[host]) for host in pool if host in chosen}
    else:
        removed = {e.host: e.slots for e in entries}
        active = {}
        for host, slots in available.items():
            if host in removed:
                drop = removed[host]
                slots = [] if drop is None else [s for s in slots if s not in drop]
            if slots:
                active[host] = slots
        if not active:
            raise ConfigError(
                f"{label} {spec!r} excludes every GPU in {pool_name} (hosts: {_names(list(pool))}); "
                "nothing would be left to run on"
            )
    return active


def world_size(active: Mapping[str, Sequence[int]]) -> int:
    """Number of processes (one per GPU slot) DeepSpeed launches for these active resources."""
    return sum(len(slots) for slots in active.values())


def format_spec(active: Mapping[str, Sequence[int] | None], pool: Mapping[str, int] | None = None) -> str:
    """Write resources back in DeepSpeed's include syntax, e.g. ``node1:0,1@node2``.

    A host maps to its slots, or to None for the whole host (as :func:`parse_spec`
    returns). With ``pool``, a host whose slots are all of ``range(pool[host])`` is
    written bare. ``filter_resources(pool, format_spec(active))`` gives ``active`` back.
    """
    parts = []
    for host, slots in active.items():
        if not host or any(c.isspace() for c in host) or any(c in host for c in _RESERVED):
            raise ValueError(f"cannot write host name {host!r} in DeepSpeed's include syntax")
        if slots is None:
            parts.append(host)
            continue
        slots = sorted(slots)
        if not slots:
            raise ValueError(f"host {host} has no slots; leave it out instead")
        if pool is not None and host in pool and slots == list(range(pool[host])):
            parts.append(host)
        else:
            parts.append(f"{host}{SLOT_LIST_START}{SLOT_SEP.join(str(s) for s in slots)}")
    return NODE_SEP.join(parts)


# --------------------------------------------------------------------------- Slurm request


class SlurmRequest(NamedTuple):
    """What to ask Slurm for, derived from an include/exclude spec without a hostfile.

    ``nodelist``: hosts the job must run on (``--nodelist``, and ``--nodes`` equal to its
    length), or None when any nodes will do. ``gpus_per_node``: ``--gpus-per-node``.
    ``exclude_nodes``: hosts Slurm must not give the job (``--exclude``).
    """

    nodelist: list[str] | None
    gpus_per_node: int
    exclude_nodes: list[str]


def slurm_request_from_spec(
    include: str | None = "",
    exclude: str | None = "",
    gpus_per_node_default: int = 1,
    *,
    max_gpus_per_node: int | None = None,
    source_include: str = "--include",
    source_exclude: str = "--exclude",
) -> SlurmRequest:
    """Turn an include/exclude spec into a Slurm request when there is no hostfile.

    Without a hostfile the pool is "whatever Slurm allocates", with the same number of
    GPUs on every node (``--gpus-per-node`` is uniform). Rules:

    * Neither spec: ``(None, gpus_per_node_default, [])``.
    * Both: error, as in DeepSpeed.
    * ``--include``: its hosts, in spec order, become the nodelist. GPUs per node is the
      most any host needs: ``max slot + 1`` for a host with slots, the default for a
      bare host, maximised over hosts. (``node1:0,1@node2:0,1`` → 2 GPUs per node;
      ``node1@node2:0`` → the default.) Slots are GPU indices, so ``node1:6,7`` needs
      8 GPUs on the node and leaves 0-5 idle; DeepSpeed then runs on 6 and 7 only.
      Inside the job ranks follow the allocation's (sorted) host order, not the
      spec's.
    * ``--exclude``: bare hosts, and hosts with every one of their default slots
      excluded, become ``exclude_nodes``; nodes keep the default GPU count. A
      slot-only exclude (``node1:0``) changes nothing in the request: DeepSpeed drops
      that GPU inside the job. Such a host must then be in the allocation, or the
      in-job check (``filter_resources`` against the allocation) fails, as DeepSpeed
      would, with "host not in the allocation".
    * A slot at or past ``gpus_per_node_default`` in an exclude, or past
      ``max_gpus_per_node`` (when given: the GPUs a node has) in an include, is an
      error. Slurm hostlist expressions (``node[1-4]``) are rejected: DeepSpeed takes
      plain names.
    """
    include = include or ""
    exclude = exclude or ""
    for name, value in (("gpus_per_node_default", gpus_per_node_default), ("max_gpus_per_node", max_gpus_per_node)):
        if value is None and name == "max_gpus_per_node":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    _check_not_both(include, exclude, source_include, source_exclude)
    if not include and not exclude:
        return SlurmRequest(None, gpus_per_node_default, [])

    label, spec = (source_include, include) if include else (source_exclude, exclude)
    entries = _parse_entries(spec, label)
    for e in entries:
        if "[" in e.host or "]" in e.host:
            raise ConfigError(
                f"{label} {e.text!r}: {e.host!r} looks like a Slurm hostlist expression; DeepSpeed takes "
                "plain host names joined by '@' (e.g. 'node1@node2@node3')"
            )

    if include:
        need = 0
        for e in entries:
            n = gpus_per_node_default if e.slots is None else max(e.slots) + 1
            if max_gpus_per_node is not None and n > max_gpus_per_node:
                raise ConfigError(
                    f"{label} {e.text!r}: slot {n - 1} does not exist on a node with "
                    f"{max_gpus_per_node} GPUs ({_slot_range(max_gpus_per_node)})"
                )
            need = max(need, n)
        return SlurmRequest([e.host for e in entries], need, [])

    excluded: list[str] = []
    for e in entries:
        if e.slots is None:
            excluded.append(e.host)
            continue
        beyond = [s for s in e.slots if s >= gpus_per_node_default]
        if beyond:
            raise ConfigError(
                f"{label} {e.text!r}: nodes get {gpus_per_node_default} GPUs "
                f"({_slot_range(gpus_per_node_default)}), so there is no slot {beyond[0]} to exclude"
            )
        if e.slots == list(range(gpus_per_node_default)):
            excluded.append(e.host)
    return SlurmRequest(None, gpus_per_node_default, excluded)


__all__ = [
    "SlurmRequest",
    "filter_resources",
    "format_hostfile",
    "format_spec",
    "parse_hostfile",
    "parse_spec",
    "read_hostfile",
    "slurm_request_from_spec",
    "world_size",
]
