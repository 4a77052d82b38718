"""Where chains stand: one ``squeue`` and one ``sacct`` call per refresh (per cluster).

A stage's state comes, in order, from:

1. ``squeue`` while slurmctld still has the job (live jobs, and finished ones
   until MinJobAge passes);
2. ``sacct`` for finished jobs (exit code, signal, end time);
3. the stage's own markers (``started.json``/``marker.json``, written by the job)
   when Slurm has forgotten the job, accounting is down, or accounting lags
   behind a slurmctld that stopped before reporting the job's start.

A job found nowhere is ``UNKNOWN`` (asked again next refresh), never ``FAILED``
by guess. States are Slurm's own words; a pending stage whose upstream failed
is reported as blocked by that stage (Slurm's ``DependencyNeverSatisfied``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .errors import HpcjobsError, SlurmError
from .records import ChainRecord
from .slurm import DONE_STATES, FAILED_STATES, LIVE_STATES, AccountingUnavailable, AcctInfo, QueueInfo, Slurm


@dataclass
class StageStatus:
    name: str
    kind: str
    attempt: int
    job_id: Optional[str]
    state: str
    reason: str = ""
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    elapsed: str = ""
    nodes: str = ""
    start: str = ""
    end: str = ""
    source: str = ""            # squeue | sacct | marker | record
    blocked_by: Optional[str] = None
    log: Optional[str] = None
    restarts: int = 0           # runs of this job before the current one (requeues)
    history: List[dict] = field(default_factory=list)   # earlier runs: state, nodes, start, end
    failed_nodes: List[str] = field(default_factory=list)  # nodes srun reported a task failure on
    orphans: List[str] = field(default_factory=list)     # jobs of this stage never recorded
    error_line: Optional[str] = None       # the failing rank's exception line, from the log
    rank_exit_code: Optional[int] = None   # the failing rank's exit code, from the log (128+N: signal N)
    rank_signal: Optional[int] = None      # the signal that killed the failing rank, if one did
    memory: Optional[dict] = None          # predicted vs measured memory (memory_summary), training stages

    @property
    def failed(self) -> bool:
        return self.state in FAILED_STATES


@dataclass
class ChainStatus:
    record: ChainRecord
    stages: List[StageStatus]
    accounting: bool = True
    warnings: List[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        states = [s.state for s in self.stages]
        if self.record.submission == "failed":
            return "SUBMIT_FAILED"
        if self.record.submission == "cancelled" and not any(s in LIVE_STATES for s in states):
            return "CANCELLED"
        if any(s in FAILED_STATES for s in states):
            return "FAILED"
        if states and all(s in DONE_STATES for s in states):
            return "COMPLETED"
        if any(s in ("RUNNING", "COMPLETING", "CONFIGURING") for s in states):
            return "RUNNING"
        if self.record.submission == "submitting":
            return "SUBMITTING"
        if any(s == "UNKNOWN" for s in states):
            return "UNKNOWN"
        return "PENDING"

    def to_json(self) -> dict:
        r = self.record
        return {
            "chain": r.chain_id, "name": r.name, "recipe": r.recipe, "profile": r.profile,
            "run_dir": r.run_dir, "created": r.created, "state": self.state,
            "submission": r.submission, "error": r.error, "accounting": self.accounting,
            "warnings": self.warnings,
            "forced": {st.name: st.current.forced for st in r.stages if st.current.forced},
            "stages": [asdict(s) for s in self.stages],
        }


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _local_time(iso_utc: str) -> str:
    t = _dt.datetime.strptime(iso_utc, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)
    return (t.astimezone() - _dt.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S")


_SRUN_NODE_FAILURE = re.compile(r"^srun: error: Node failure on (\S+)", re.M)
_SRUN_TASK_ERROR = re.compile(r"^srun: error: (\S+): tasks? [0-9,-]+: (.*)$", re.M)
_EXIT_CODE = re.compile(r"exit code (\d+)")


def failed_nodes(log: Optional[str]) -> List[str]:
    """The nodes a multi-node stage failed on, read from srun's messages in its log.

    A node that died, or whose task was killed by a signal (exit code above 128,
    "Killed", ...), is the cause; the other nodes' tasks then fail too (a peer
    vanished from the collective) or are terminated by ``--kill-on-bad-exit``.
    Those are named only when no cause is visible.
    """
    text = "\n".join(tail(log, 300))
    causes: List[str] = list(dict.fromkeys(_SRUN_NODE_FAILURE.findall(text)))
    others: List[str] = []
    for node, what in _SRUN_TASK_ERROR.findall(text):
        if "Terminated" in what:
            continue
        code = _EXIT_CODE.search(what)
        killed = (code and int(code.group(1)) > 128) or not code
        bucket = causes if killed else others
        if node not in bucket:
            bucket.append(node)
    return causes or others


# ---- the failing rank: its exception line and exit code, read from the stage's log

# base.sbatch.j2 prints this line when a run of the job starts; a requeued job appends to its log.
_RUN_START = re.compile(r"^hpcjobs: chain \S+ stage \S+ attempt \d+ job .* restart \d+\s*$")
# DeepSpeed's launcher (one per node), when one of its ranks exits non-zero (negative: a signal).
_DS_RETURN_CODE = re.compile(r"exits with return code = (-?\d+)")
# torch elastic's failure summary ("Root Cause (first observed failure):" ... "exitcode  : 1 (pid: 7)").
_ELASTIC_ROOT = re.compile(r"Root Cause \(first observed failure\)")
_ELASTIC_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)", re.M)
_EXC_NAME = r"(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)"
_EXC_LINE = re.compile(rf"^{_EXC_NAME}(?::\s.*)?$")
# A label some launchers put before each line of a rank's output: "1: ", "node2: ", "[rank1]: ".
_LABEL = re.compile(r"^(?:\[[\w.:-]+\]|[\w.-]+):\s+")
_HPCJOBS_ERROR = re.compile(r"^(?:\[hpcjobs\.\w+\]|hpcjobs(?:\.\w+)?:) error: \S")
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
# What launchers raise about a child that failed: never the cause itself.
_LAUNCHER_EXC = re.compile(r"^(?:\S+\.)?(?:ChildFailedError|CalledProcessError)\b")
# What the surviving ranks see when a peer dies: the cause is elsewhere, if it is in the log.
_COLLATERAL = re.compile(r"closed by peer|reset by peer|Broken pipe|communicator was aborted|SignalException|"
                         r"got signal:? \d+|remote process exited|Socket Timeout|DistBackendError", re.I)


def _current_run(text: str) -> List[str]:
    """The log lines of the job's latest run (a requeued job appends each run to the same log)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _RUN_START.match(line)]
    return lines[starts[-1]:] if starts else lines


def _unlabel(line: str) -> str:
    """The line without a launcher's per-rank label ("1: ", "[rank1]: "); an exception line as is."""
    line = line.rstrip()
    m = _LABEL.match(line)
    if m and not re.match(_EXC_NAME + r":", line) and not _HPCJOBS_ERROR.match(line):
        return line[m.end():]
    return line


def _exception_in(line: str) -> Optional[str]:
    line = _unlabel(line)
    return line if _EXC_LINE.match(line) or _HPCJOBS_ERROR.match(line) else None


def error_line(lines: List[str]) -> Optional[str]:
    """The exception line of the rank that failed first: the last line of the first traceback
    in the log (through chained exceptions), passing over what launchers raise about a failed
    child and what peers see when a rank dies (a closed connection, SIGTERM) if the cause is there too."""
    groups: List[str] = []
    chained = False
    for line in lines:
        if _unlabel(line).lstrip().startswith(_CHAINED):
            chained = True
            continue
        exc = _exception_in(line)
        if exc is None:
            continue
        if chained and groups:
            groups[-1] = exc          # the exception raised while handling the previous one
        else:
            groups.append(exc)
        chained = False
    groups = [g for g in groups if not _LAUNCHER_EXC.match(g)]
    causes = [g for g in groups if not _COLLATERAL.search(g)]
    return (causes or groups or [None])[0]


def rank_exit(lines: List[str], cause_nodes: List[str]) -> Tuple[Optional[int], Optional[int]]:
    """The exit code (and signal) of the rank that failed first, as launchers print it:
    DeepSpeed's ``exits with return code = N`` (negative: killed by signal -N), torch
    elastic's root-cause ``exitcode : N``, else srun's ``task N: Exited with exit code N`` for
    the node that caused the failure. ``(None, None)`` when the log does not say."""
    text = "\n".join(lines)
    code: Optional[int] = None
    for m in _DS_RETURN_CODE.finditer(text):
        if int(m.group(1)) != 0:
            code = int(m.group(1))
            break
    if code is None:
        root = _ELASTIC_ROOT.search(text)
        m = _ELASTIC_EXIT.search(text, root.end() if root else 0)
        if m and int(m.group(1)) != 0:
            code = int(m.group(1))
    if code is None:
        exited = [(node, int(c.group(1))) for node, what in _SRUN_TASK_ERROR.findall(text)
                  if (c := _EXIT_CODE.search(what))]
        picked = [c for node, c in exited if node in cause_nodes] or [c for _, c in exited]
        code = picked[0] if picked else None
    if code is None:
        return None, None
    if code < 0:
        return 128 - code, -code
    return code, None


def diagnose(log: Optional[str], cause_nodes: List[str]) -> Tuple[Optional[str], Optional[int], Optional[int]]:
    """(error line, exit code, signal) of the failing rank, from the latest run in ``log``."""
    lines = _current_run("\n".join(tail(log, 5000)))
    code, sig = rank_exit(lines, cause_nodes)
    return error_line(lines), code, sig


def memory_summary(attempt_dir: Path) -> Optional[dict]:
    """A training attempt's predicted memory (``memory_plan.json``, written at render time, one
    stage of ``hpcjobs plan --json``) and measured memory (``memory_measured.json``, written by
    the job at the end of training; :mod:`hpcjobs.train.memory`), in bytes; per rank, the
    largest over the ranks. None when the attempt has neither file."""
    plan = _read_json(attempt_dir / "memory_plan.json")
    measured = _read_json(attempt_dir / "memory_measured.json")
    out: dict = {"predicted": None, "measured": None}
    if isinstance(plan, dict) and isinstance(plan.get("gpu"), dict):
        gpu, host = plan["gpu"], plan.get("host_per_node") or {}
        comps = gpu.get("components") if isinstance(gpu.get("components"), dict) else {}
        states = [comps.get(k) for k in ("weights", "gradients", "optimizer states")]
        out["predicted"] = {
            "peak_per_rank": gpu.get("peak"), "phase": gpu.get("phase"),
            "model_states": sum(states) if all(isinstance(v, int) for v in states) else None,
            "host_per_node": host.get("peak") if isinstance(host, dict) else None}
    if isinstance(measured, dict) and isinstance(measured.get("ranks"), list):
        ranks = [r for r in measured["ranks"] if isinstance(r, dict)]

        def most(key: str) -> Optional[int]:
            vals = [r[key] for r in ranks if isinstance(r.get(key), int) and not isinstance(r.get(key), bool)]
            return max(vals) if vals else None

        devices = sorted({str(r.get("device")) for r in ranks})
        out["measured"] = {"ranks": len(ranks), "device": ",".join(devices),
                           **{k: most(k) for k in ("max_allocated", "max_reserved", "model_state_bytes",
                                                   "peak_rss")}}
    return out if out["predicted"] or out["measured"] else None


def _stage_status(record: ChainRecord, name: str, queue: Dict[str, QueueInfo],
                  acct: Dict[str, List[AcctInfo]]) -> StageStatus:
    st = record.stage(name)
    att = st.current
    adir = record.attempt_dir(name, att.n)
    s = StageStatus(name, st.kind, att.n, att.job_id, "UNKNOWN")
    if not att.job_id:
        s.state, s.source = "NOT_SUBMITTED", "record"
        s.reason = {"submitting": "submission in progress or interrupted",
                    "failed": "submission failed"}.get(record.submission, "")
        s.orphans = [q.job_id for q in queue.values()
                     if q.name == f"{record.chain_id}.{name}" and q.state in LIVE_STATES]
        if s.orphans:
            s.reason = (f"submission was interrupted after sbatch: job {', '.join(s.orphans)} exists "
                        "but was never recorded")
        return s
    s.log = str(adir / f"slurm-{att.job_id}.out")
    s.memory = memory_summary(adir)
    q = queue.get(att.job_id)
    runs = acct.get(att.job_id, [])
    a = runs[-1] if runs else None
    s.history = [{"state": r.state, "nodes": r.nodes, "start": r.start, "end": r.end,
                  "exit_code": r.exit_code} for r in runs[:-1]]
    s.restarts = len(s.history)
    marker = _read_json(adir / "marker.json")
    if marker and str(marker.get("job_id")) != att.job_id:
        marker = None
    # The job's own word that its current run (restart count = earlier runs) began.
    started = _read_json(adir / "started.json")
    if started and (str(started.get("job_id")) != att.job_id or started.get("restarts") != s.restarts):
        started = None
    if q and q.state in LIVE_STATES:
        s.state, s.reason, s.elapsed, s.nodes, s.source = q.state, q.reason, q.elapsed, q.nodes, "squeue"
        if q.reason in ("None", "(null)"):
            s.reason = ""
        s.start = q.start if q.start not in ("N/A", "Unknown") else ""
    elif a and a.state not in LIVE_STATES:
        s.state, s.exit_code, s.signal, s.source = a.state, a.exit_code, a.signal, "sacct"
        s.elapsed, s.nodes, s.start, s.end = a.elapsed, a.nodes, a.start, a.end
        if q and q.state not in LIVE_STATES and q.nodes:
            # accounting can lag behind the end of a multi-node job with a partial node list
            # (COMPLETED|node1 for a node[1-2] job, seen on the devcluster); slurmctld, while it
            # still remembers the job, has the whole allocation
            s.nodes = q.nodes
    elif q:  # finished, still in slurmctld's memory, accounting not (yet) there
        s.state, s.nodes, s.elapsed, s.source = q.state, q.nodes, q.elapsed, "squeue"
    elif a:  # accounting says live but slurmctld has forgotten the job or is down: markers first
        s.state, s.nodes, s.source = a.state, a.nodes, "sacct"
        s.start = a.start if a.start not in ("None", "Unknown") else ""
        if marker:
            s.state = "COMPLETED" if marker.get("exit_code") == 0 else "FAILED"
            s.exit_code, s.source = marker.get("exit_code"), "marker"
        elif started and a.state == "PENDING":
            # slurmctld sends job starts to slurmdbd asynchronously; if it went down before the
            # message went out, accounting still says PENDING for a job that is running.
            s.state, s.source, s.start = "RUNNING", "marker", started.get("time", "")
            s.nodes = started.get("host", "")     # accounting has "None assigned" for a pending job
    elif marker:
        code = marker.get("exit_code")
        s.state = "COMPLETED" if code == 0 else "FAILED"
        s.exit_code, s.nodes, s.end, s.source = code, marker.get("host", ""), marker.get("time", ""), "marker"
    if s.exit_code is None and marker and s.state not in LIVE_STATES:
        s.exit_code = marker.get("exit_code")
    if s.state in FAILED_STATES or any(h["state"] in FAILED_STATES for h in s.history):
        s.failed_nodes = failed_nodes(s.log)
    if s.state in FAILED_STATES:
        s.error_line, s.rank_exit_code, s.rank_signal = diagnose(s.log, s.failed_nodes)
    return s


def _blocked(stages: Dict[str, StageStatus], record: ChainRecord) -> None:
    """Name the failed upstream stage of a stage that can no longer start."""
    for st in record.stages:
        s = stages[st.name]
        if s.state != "PENDING":
            continue
        failed_up = [u for u in st.after if stages[u].failed or stages[u].blocked_by]
        if failed_up or s.reason == "DependencyNeverSatisfied":
            root = failed_up[0] if failed_up else None
            while root and stages[root].blocked_by:
                root = stages[root].blocked_by
            s.blocked_by = root or "an upstream stage"


def collect(recs: List[ChainRecord], slurm_for: Callable[[Optional[str]], Slurm] = Slurm) -> List[ChainStatus]:
    """Status of every chain in ``recs``: one squeue and one sacct call per Slurm cluster."""
    by_conf: Dict[Optional[str], List[ChainRecord]] = defaultdict(list)
    for r in recs:
        by_conf[r.slurm_conf].append(r)
    out: Dict[str, ChainStatus] = {}
    for conf, group in by_conf.items():
        slurm = slurm_for(conf)
        ids = sorted({j for r in group for j in r.job_ids(current_only=True)}, key=int)
        warnings: List[str] = []
        try:
            # A chain still being (or never fully) submitted may own jobs whose ids were not
            # recorded: list all of the user's jobs then, still in one call.
            if any(r.submission in ("submitting", "failed") for r in group):
                queue = slurm.squeue_mine()
            else:
                queue = slurm.squeue(ids)
        except SlurmError as e:
            queue = {}
            warnings.append(f"squeue unavailable ({e}); states come from accounting and markers")
        accounting = True
        try:
            acct = slurm.sacct(ids, starttime=min(_local_time(r.created) for r in group)) if ids else {}
        except AccountingUnavailable as e:
            acct, accounting = {}, False
            warnings.append(f"accounting is unavailable ({e}); finished states come from the stages' markers")
        for r in group:
            stages = {st.name: _stage_status(r, st.name, queue, acct) for st in r.stages}
            _blocked(stages, r)
            out[r.chain_id] = ChainStatus(r, [stages[st.name] for st in r.stages], accounting, list(warnings))
    return [out[r.chain_id] for r in recs]


def tail(path: Optional[str], lines: int = 10) -> List[str]:
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return data.splitlines()[-lines:]


# ---------------------------------------------------------------- history (`hpcjobs list`)

#: chains `list` shows by default: created within this many days, or not final
RECENT_DAYS = 7


def is_final(cs: ChainStatus) -> bool:
    """Every stage reached a final state that Slurm's accounting or the job's own marker
    vouches for (a chain that can still change is never final; a rerun or cancel rewrites
    its record, which invalidates the cache)."""
    if not cs.accounting or cs.record.submission == "submitting" or not cs.stages:
        return False
    for s in cs.stages:
        if s.orphans:
            return False
        if s.state == "NOT_SUBMITTED":
            if cs.record.submission not in ("failed", "cancelled"):
                return False
        elif not (s.state in DONE_STATES | FAILED_STATES and s.source in ("sacct", "marker")):
            return False
    return True


@dataclass
class History:
    statuses: List[ChainStatus]      # shown, oldest first
    damaged: list                    # records.DamagedRecord of unusable records
    hidden: int = 0                  # final chains older than the window
    collected: List[str] = field(default_factory=list)   # chain ids asked of Slurm this time
    cached: int = 0                  # chains answered from the cache


def _from_cache(data: dict, run_dir: Path) -> ChainStatus:
    rec = ChainRecord.from_dict(data["record"], run_dir=str(Path(run_dir).absolute()))
    stages = [StageStatus(**s) for s in data["stages"]]
    if [s.name for s in stages] != [st.name for st in rec.stages]:
        raise ValueError("stages differ")
    return ChainStatus(rec, stages, True, [])


def history(*, since: Optional[str] = None, show_all: bool = False,
            slurm_for: Callable[[Optional[str]], Slurm] = Slurm) -> History:
    """The chains `list` shows. Final chains come from the cache (no Slurm call, no log read);
    the others are asked of Slurm with one squeue and one sacct call, whose window starts at
    the oldest of them. ``since``: a UTC time like ``2026-12-01T00:00:00Z`` (default: the
    last :data:`RECENT_DAYS` days); unfinished chains are shown whatever their age."""
    from . import records

    if not show_all and since is None:
        cutoff = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(days=RECENT_DAYS)
        since = cutoff.strftime("%Y-%m-%dT%H:%M:%SZ")
    run_dirs: Dict[str, str] = {}
    cached: List[ChainStatus] = []
    recs: List[ChainRecord] = []
    stamps: Dict[str, Optional[list]] = {}
    damaged: list = []
    old = 0      # final chains outside the window: counted with one stat each, not read
    summary = records.final_summary()
    new_summary: Dict[str, list] = {}
    for chain_id, run_dir in records.index_entries().items():
        stamp = records.stamp_of(run_dir)
        if stamp is None and not os.path.lexists(os.path.join(run_dir, records.RECORD)):
            continue                 # run directory gone or moved (`list --scan` finds it again)
        known = summary.get(chain_id)
        if (stamp is not None and isinstance(known, list) and len(known) == 3
                and known[0] == run_dir and known[1] == stamp and isinstance(known[2], str)):
            if not show_all and known[2] < since:
                old += 1
                new_summary[chain_id] = known
                continue
        data = records.final_get(chain_id, run_dir) if stamp is not None else None
        if data is not None:
            created = data["record"].get("created")
            if isinstance(created, str):
                new_summary[chain_id] = [run_dir, data["stamp"], created]
                if not show_all and created < since:
                    old += 1
                    continue
            try:
                cached.append(_from_cache(data, run_dir))
                continue
            except (KeyError, TypeError, ValueError):
                new_summary.pop(chain_id, None)
        try:
            rec, stamp = records.load_stamped(run_dir)
        except records.DamagedRecord as e:
            damaged.append(e)
            continue
        except HpcjobsError:   # not a run directory any more
            continue
        recs.append(rec)
        stamps[rec.chain_id] = stamp
        run_dirs[rec.chain_id] = run_dir
    fresh = collect(recs, slurm_for) if recs else []
    final_ids = {cs.record.chain_id for cs in cached}
    for cs in fresh:
        if is_final(cs):
            final_ids.add(cs.record.chain_id)
            stamp = stamps.get(cs.record.chain_id)
            records.final_put(cs.record, {"stages": [asdict(s) for s in cs.stages]}, stamp=stamp)
            if stamp is not None:
                new_summary[cs.record.chain_id] = [run_dirs[cs.record.chain_id], stamp, cs.record.created]
    if new_summary != summary:
        records.final_summary_write(new_summary)
    everything = sorted(cached + fresh, key=lambda cs: cs.record.created)
    if show_all:
        shown = everything
    else:
        shown = [cs for cs in everything if cs.record.created >= since or cs.record.chain_id not in final_ids]
    return History(shown, damaged, old + len(everything) - len(shown), [r.chain_id for r in recs], len(cached))
