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
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import paths
from .errors import HpcjobsError

RECORD = "chain.json"
VERSION = 1


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Attempt:
    n: int
    job_id: Optional[str] = None
    submitted: Optional[str] = None
    overrides: List[str] = field(default_factory=list)
    note: str = ""


@dataclass
class StageRecord:
    name: str
    kind: str
    after: List[str]
    attempts: List[Attempt] = field(default_factory=list)

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
        write_atomic(Path(self.run_dir) / RECORD, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ChainRecord":
        stages = [StageRecord(s["name"], s["kind"], list(s["after"]),
                              [Attempt(**a) for a in s["attempts"]]) for s in data["stages"]]
        fields = {k: v for k, v in data.items() if k != "stages"}
        return cls(stages=stages, **fields)

    @classmethod
    def load(cls, run_dir: Path) -> "ChainRecord":
        path = Path(run_dir) / RECORD
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise HpcjobsError(f"{run_dir} is not a chain run directory (no {RECORD})") from None
        except (OSError, json.JSONDecodeError) as e:
            raise HpcjobsError(f"cannot read {path}: {e}") from None
        if data.get("version") != VERSION:
            raise HpcjobsError(f"{path}: record version {data.get('version')} is not supported "
                               f"by this hpcjobs (expects {VERSION})")
        return cls.from_dict(data)


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
    os.symlink(record.run_dir, tmp)
    os.replace(tmp, link)


def indexed() -> Dict[str, Path]:
    """chain id -> run dir, for every index entry whose run directory still exists."""
    d = index_dir()
    if not d.is_dir():
        return {}
    out = {}
    for link in d.iterdir():
        if link.name.startswith("."):
            continue
        target = Path(os.readlink(link)) if link.is_symlink() else None
        if target is not None and (target / RECORD).is_file():
            out[link.name] = target
    return out


def scan(root: Path) -> List[ChainRecord]:
    """Records of every run directory under ``root``; re-adds them to the index."""
    records = []
    for rec in sorted(Path(root).expanduser().glob(f"*/{RECORD}")):
        try:
            r = ChainRecord.load(rec.parent)
        except HpcjobsError:
            continue
        index_add(r)
        records.append(r)
    return records


def find(ref: str) -> ChainRecord:
    """A chain by id, run directory path, name (the latest chain of that name), or unique id prefix."""
    p = Path(ref).expanduser()
    if (p / RECORD).is_file():
        return ChainRecord.load(p)
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


def all_records() -> List[ChainRecord]:
    out = []
    for run_dir in indexed().values():
        try:
            out.append(ChainRecord.load(run_dir))
        except HpcjobsError:
            continue
    return sorted(out, key=lambda r: r.created)
