"""The chain record: ``<run dir>/chain.json``, the source of truth for a chain.

It lives in the run directory on the shared filesystem, next to the scripts,
logs and markers it describes. It is rewritten atomically (write a temporary
file, fsync, rename), so a reader sees either the old or the new record even if
the writer is killed mid-write, and it is written *before* each ``sbatch`` and
again after, so a job never runs without a record of its chain.

The local index (``<state dir>/chains/<chain id>`` symlinks to run directories)
is only a shortcut for ``hpcjobs status CHAIN``; ``hpcjobs list --scan ROOT``
rebuilds it from the run directories. No SQLite: its locking breaks on the
network filesystems run directories live on.

Reading is forgiving where it can be and precise where it cannot: fields this
version does not know (a newer hpcjobs, a hand edit) are kept and written back
unchanged; a missing optional field gets its default; a missing required field
or a value of the wrong type makes the record *damaged* (:class:`DamagedRecord`,
naming the file and the field), which ``list`` reports and skips. A run directory
that was moved as a whole is found at its new place: the directory a record is
loaded from wins over the ``run_dir`` stored in it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import paths
from .errors import HpcjobsError

RECORD = "chain.json"
VERSION = 1


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class DamagedRecord(HpcjobsError):
    """A ``chain.json`` that cannot be used: unreadable, not JSON, a required field missing or
    of the wrong type, or a record version this hpcjobs does not read."""

    def __init__(self, path: Path, problem: str, *, label: str = "damaged chain record"):
        super().__init__(f"{path}: {label}: {problem}")
        self.path = Path(path)
        self.problem = problem


class _Bad(Exception):
    """A field-level problem found while reading a record (becomes a DamagedRecord)."""


@dataclass
class Attempt:
    n: int
    job_id: Optional[str] = None
    submitted: Optional[str] = None
    overrides: List[str] = field(default_factory=list)
    note: str = ""
    forced: Optional[str] = None
    """Set when the attempt was submitted with ``--force`` over a refusal: what was overridden
    (e.g. the memory planner's "does not fit")."""
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # unknown fields, kept


@dataclass
class StageRecord:
    name: str
    kind: str
    after: List[str]
    attempts: List[Attempt] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # unknown fields, kept

    @property
    def current(self) -> Attempt:
        return self.attempts[-1]


@dataclass
class ChainRecord:
    chain_id: str
    name: str
    recipe: str
    recipe_path: str
    profile: str
    slurm_conf: Optional[str]
    run_dir: str
    created: str
    overrides: List[str]
    stages: List[StageRecord]
    submission: str = "submitting"   # submitting | submitted | failed | cancelled
    error: Optional[str] = None
    version: int = VERSION
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # unknown fields, kept

    # ---- access

    def stage(self, name: str) -> StageRecord:
        for s in self.stages:
            if s.name == name:
                return s
        raise HpcjobsError(f"chain {self.chain_id} has no stage {name!r} "
                           f"(stages: {', '.join(s.name for s in self.stages)})")

    def job_ids(self, *, current_only: bool = False) -> List[str]:
        ids = []
        for s in self.stages:
            for a in ([s.current] if current_only else s.attempts):
                if a.job_id:
                    ids.append(a.job_id)
        return ids

    def attempt_dir(self, stage: str, n: int) -> Path:
        return Path(self.run_dir) / "stages" / stage / f"attempt-{n}"

    # ---- persistence

    def save(self) -> None:
        write_atomic(Path(self.run_dir) / RECORD, json.dumps(self.to_dict(), indent=2) + "\n")

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form: known fields, then the unknown ones this record was read with."""
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: Any, *, run_dir: Optional[str] = None) -> "ChainRecord":
        """A record from its JSON form. ``run_dir``: the directory it was read from, which wins
        over the stored one. Raises ``ValueError`` naming the field that is missing or wrong."""
        try:
            return _chain_from(data, run_dir)
        except _Bad as e:
            raise ValueError(str(e)) from None

    @classmethod
    def load(cls, run_dir: Path) -> "ChainRecord":
        path = Path(run_dir) / RECORD
        if not path.exists() and not path.is_symlink():
            raise HpcjobsError(f"{run_dir} is not a chain run directory (no {RECORD})")
        if path.is_dir():
            raise DamagedRecord(path, "it is a directory, not a file")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DamagedRecord(path, f"cannot be read ({e.strerror or e})") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DamagedRecord(path, f"not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DamagedRecord(path, "empty file" if not raw.strip() else f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DamagedRecord(path, f"expected a JSON object, got {_kind(data)}")
        version = data.get("version", VERSION)
        if not _is_int(version):
            raise DamagedRecord(path, f"version: expected an integer, got {_kind(version)} {version!r}")
        if version != VERSION:
            raise DamagedRecord(path, f"version {version}; this hpcjobs reads version {VERSION}",
                                label="unsupported chain record")
        try:
            return _chain_from(data, str(Path(run_dir).absolute()))
        except _Bad as e:
            raise DamagedRecord(path, str(e)) from None


# ---------------------------------------------------------------- reading and writing the JSON form

_CREATED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(where: str, v: Any, *, optional: bool = False) -> Optional[str]:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise _Bad(f"{where}: expected a string{' or null' if optional else ''}, got {_kind(v)}")
    return v


def _str_list(where: str, v: Any) -> List[str]:
    if not isinstance(v, list):
        raise _Bad(f"{where}: expected a list, got {_kind(v)}")
    for i, x in enumerate(v):
        _str(f"{where}[{i}]", x)
    return list(v)


def _obj(where: str, v: Any) -> Dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad(f"{where}: expected an object, got {_kind(v)}")
    return v


def _required(where: str, data: Dict[str, Any], key: str) -> Any:
    if key not in data:
        raise _Bad(f"{where + '.' if where else ''}{key}: required field is missing")
    return data[key]


def _known(cls) -> List[str]:
    return [f.name for f in fields(cls) if f.name != "extra"]


def _extra(cls, data: Dict[str, Any]) -> Dict[str, Any]:
    known = set(_known(cls))
    return {k: v for k, v in data.items() if k not in known}


def _attempt_from(where: str, data: Any) -> Attempt:
    d = _obj(where, data)
    n = _required(where, d, "n")
    if not _is_int(n):
        raise _Bad(f"{where}.n: expected an integer, got {_kind(n)} {n!r}")
    job_id = _str(f"{where}.job_id", d.get("job_id"), optional=True)
    if job_id is not None and not job_id.isdigit():
        raise _Bad(f"{where}.job_id: {job_id!r} is not a Slurm job id")
    return Attempt(n=n, job_id=job_id, submitted=_str(f"{where}.submitted", d.get("submitted"), optional=True),
                   overrides=_str_list(f"{where}.overrides", d.get("overrides", [])),
                   note=_str(f"{where}.note", d.get("note", "")),
                   forced=_str(f"{where}.forced", d.get("forced"), optional=True), extra=_extra(Attempt, d))


def _stage_from(where: str, data: Any, earlier: List[str]) -> StageRecord:
    d = _obj(where, data)
    name = _str(f"{where}.name", _required(where, d, "name"))
    if name in earlier:
        raise _Bad(f"{where}.name: stage {name!r} appears twice")
    kind = _str(f"{where}.kind", _required(where, d, "kind"))
    after = _str_list(f"{where}.after", d.get("after", []))
    for up in after:
        if up not in earlier:
            raise _Bad(f"{where}.after: {up!r} is not an earlier stage of this chain")
    attempts = _required(where, d, "attempts")
    if not isinstance(attempts, list):
        raise _Bad(f"{where}.attempts: expected a list, got {_kind(attempts)}")
    if not attempts:
        raise _Bad(f"{where}.attempts: the list is empty (every stage has at least one attempt)")
    return StageRecord(name=name, kind=kind, after=after,
                       attempts=[_attempt_from(f"{where}.attempts[{i}]", a) for i, a in enumerate(attempts)],
                       extra=_extra(StageRecord, d))


def _chain_from(data: Any, run_dir: Optional[str]) -> ChainRecord:
    d = _obj("record", data)
    chain_id = _str("chain_id", _required("", d, "chain_id"))
    created = _str("created", _required("", d, "created"))
    if not _CREATED.match(created):
        raise _Bad(f"created: {created!r} is not a UTC time like 2026-12-02T09:41:00Z")
    raw_stages = _required("", d, "stages")
    if not isinstance(raw_stages, list):
        raise _Bad(f"stages: expected a list, got {_kind(raw_stages)}")
    stages: List[StageRecord] = []
    for i, s in enumerate(raw_stages):
        stages.append(_stage_from(f"stages[{i}]", s, [x.name for x in stages]))
    stored_dir = _str("run_dir", d.get("run_dir"), optional=True)
    if run_dir is None and stored_dir is None:
        raise _Bad("run_dir: required field is missing")
    version = d.get("version", VERSION)
    if not _is_int(version):
        raise _Bad(f"version: expected an integer, got {_kind(version)} {version!r}")
    return ChainRecord(
        chain_id=chain_id, name=_str("name", d.get("name", chain_id)),
        recipe=_str("recipe", d.get("recipe", "")), recipe_path=_str("recipe_path", d.get("recipe_path", "")),
        profile=_str("profile", d.get("profile", "")),
        slurm_conf=_str("slurm_conf", d.get("slurm_conf"), optional=True),
        run_dir=run_dir if run_dir is not None else stored_dir, created=created,
        overrides=_str_list("overrides", d.get("overrides", [])), stages=stages,
        submission=_str("submission", d.get("submission", "submitting")),
        error=_str("error", d.get("error"), optional=True), version=version,
        extra=_extra(ChainRecord, d))


def _to_dict(obj: Any) -> Any:
    if isinstance(obj, (ChainRecord, StageRecord, Attempt)):
        out = {name: _to_dict(getattr(obj, name)) for name in _known(type(obj))}
        out.update((k, v) for k, v in obj.extra.items() if k not in out)
        return out
    if isinstance(obj, list):
        return [_to_dict(x) for x in obj]
    return obj


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------- the local index

def index_dir() -> Path:
    return paths.state_dir() / "chains"


def index_add(record: ChainRecord) -> None:
    d = index_dir()
    d.mkdir(parents=True, exist_ok=True)
    link = d / record.chain_id
    tmp = d / f".{record.chain_id}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(str(Path(record.run_dir).absolute()), tmp)
    os.replace(tmp, link)


def indexed() -> Dict[str, Path]:
    """chain id -> run dir, for every index entry whose run directory still holds a record.

    Entries whose run directory is gone (deleted, or moved: ``list --scan`` finds it again)
    are left out; so are stray files. A ``chain.json`` that is there but unusable is kept,
    so that loading it reports what is wrong with it.
    """
    d = index_dir()
    out = {}
    try:
        entries = sorted(d.iterdir()) if d.is_dir() else []
    except OSError:
        return {}
    for link in entries:
        if link.name.startswith(".") or not link.is_symlink():
            continue
        try:
            target = d / os.readlink(link)     # an absolute target replaces d
        except OSError:
            continue
        rec = target / RECORD
        if rec.exists() or rec.is_symlink():
            out[link.name] = target
    return out


def scan(root: Path, damaged: Optional[List[DamagedRecord]] = None) -> List[ChainRecord]:
    """Records of every run directory under ``root``; re-adds them to the index (with the
    directory where each was found, so a moved run directory is indexed at its new place).
    Records that cannot be used are skipped, and appended to ``damaged`` when given."""
    records = []
    for rec in sorted(Path(root).expanduser().absolute().glob(f"*/{RECORD}")):
        try:
            r = ChainRecord.load(rec.parent)
        except DamagedRecord as e:
            if damaged is not None:
                damaged.append(e)
            continue
        except HpcjobsError:
            continue
        index_add(r)
        records.append(r)
    return records


def _reindex(record: ChainRecord) -> None:
    """Point the index at where ``record`` was loaded from, if it points elsewhere (best effort)."""
    try:
        if indexed().get(record.chain_id) != Path(record.run_dir):
            index_add(record)
    except OSError:
        pass


def find(ref: str) -> ChainRecord:
    """A chain by id, run directory path, name (the latest chain of that name), or unique id prefix."""
    try:
        p = Path(ref).expanduser()
        is_dir_ref = (p / RECORD).exists() or (p / RECORD).is_symlink()
    except (RuntimeError, ValueError, OSError):   # ~unknownuser, a NUL byte, ...: not a path
        is_dir_ref = False
    if is_dir_ref:
        rec = ChainRecord.load(p)
        _reindex(rec)
        return rec
    known = indexed()
    if ref in known:
        return ChainRecord.load(known[ref])
    named = [r for r in all_records() if r.name == ref]
    if named:
        return named[-1]
    matches = [c for c in known if c.startswith(ref)]
    if len(matches) == 1:
        return ChainRecord.load(known[matches[0]])
    if len(matches) > 1:
        raise HpcjobsError(f"{ref!r} matches several chains: {', '.join(sorted(matches))}")
    raise HpcjobsError(f"no chain {ref!r}", hint="`hpcjobs list` shows known chains; a run directory "
                       "path works too, and `hpcjobs list --scan ROOT` re-indexes a runs root")


def load_all() -> Tuple[List[ChainRecord], List[DamagedRecord]]:
    """Every indexed chain, oldest first, and the records that could not be used."""
    out: List[ChainRecord] = []
    damaged: List[DamagedRecord] = []
    for run_dir in indexed().values():
        try:
            out.append(ChainRecord.load(run_dir))
        except DamagedRecord as e:
            damaged.append(e)
        except HpcjobsError:
            continue
    return sorted(out, key=lambda r: r.created), damaged


def all_records() -> List[ChainRecord]:
    """Every indexed chain whose record can be used, oldest first."""
    return load_all()[0]


# ---------------------------------------------------------------- the history cache
#
# A chain whose stages all reached a final state does not change until its record does
# (a rerun or a cancel rewrites chain.json). `list` keeps what it found about such a chain
# in ``<state dir>/final/<chain id>.json``: derived, rebuildable from the run directory
# (delete the folder and the next `list` asks Slurm again), never the source of truth. An
# entry counts only while chain.json's mtime and size are the ones it was made from.

def final_dir() -> Path:
    return paths.state_dir() / "final"


def _stamp(run_dir: "Path | str") -> Optional[List[int]]:
    try:
        st = (Path(run_dir) / RECORD).stat()
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def final_get(chain_id: str, run_dir: "Path | str") -> Optional[Dict[str, Any]]:
    """The cached entry of a final chain, or None when there is none or it is stale."""
    try:
        data = json.loads((final_dir() / f"{chain_id}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or data.get("version") != 1
            or data.get("run_dir") != str(Path(run_dir).absolute())
            or data.get("stamp") != _stamp(run_dir) or not isinstance(data.get("record"), dict)):
        return None
    return data


def final_put(record: ChainRecord, payload: Dict[str, Any], stamp: Optional[List[int]] = None) -> None:
    """Cache what was found about a final chain (best effort: a failure only costs speed).
    ``stamp``: chain.json's stamp when the record was read (so a record rewritten since is not
    cached under the new stamp)."""
    stamp = stamp or _stamp(record.run_dir)
    if stamp is None:
        return
    data = {"version": 1, "run_dir": str(record.run_dir), "stamp": stamp, "record": record.to_dict(), **payload}
    d = final_dir()
    tmp = d / f".{record.chain_id}.{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
        os.replace(tmp, d / f"{record.chain_id}.json")
    except OSError:
        tmp.unlink(missing_ok=True)


def load_stamped(run_dir: "Path | str") -> Tuple[ChainRecord, Optional[List[int]]]:
    """The record and chain.json's stamp taken before reading it."""
    stamp = _stamp(run_dir)
    return ChainRecord.load(Path(run_dir)), stamp


def index_entries() -> Dict[str, str]:
    """chain id -> run dir of every index link, without checking the run directories (fast:
    for `list`, which checks what it reads)."""
    d = str(index_dir())
    out: Dict[str, str] = {}
    try:
        entries = list(os.scandir(d))
    except OSError:
        return out
    for e in entries:
        if e.name.startswith(".") or not e.is_symlink():
            continue
        try:
            out[e.name] = os.path.join(d, os.readlink(e.path))    # an absolute target replaces d
        except OSError:
            continue
    return dict(sorted(out.items()))


def stamp_of(run_dir: str) -> Optional[List[int]]:
    try:
        st = os.stat(os.path.join(run_dir, RECORD))
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def final_summary() -> Dict[str, Any]:
    """``final/summary.json``: chain id -> [run dir, stamp, created] of every cached final chain,
    so `list` can skip the old ones with one stat each (derived like the entries it sums up)."""
    try:
        data = json.loads((final_dir() / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def final_summary_write(summary: Dict[str, Any]) -> None:
    d = final_dir()
    tmp = d / f".summary.{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(summary) + "\n", encoding="utf-8")
        os.replace(tmp, d / "summary.json")
    except OSError:
        tmp.unlink(missing_ok=True)
