"""The report's data: a plain model of a chain gathered from its run directory and Slurm.

Everything here is standard library plus hpcjobs' own login-node modules (no torch, no
plotting). :func:`collect` asks Slurm (one squeue and one sacct call through
:mod:`hpcjobs.status`, and one more sacct call for the accounting fields a report needs:
submit time, CPU time, peak memory, allocated GPUs); :func:`build` is pure and takes
that accounting as an argument, so it is tested on a synthetic run directory.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import progress as progress_mod
from ..records import ChainRecord
from ..status import ChainStatus

#: the curves drawn per training stage: (key in progress.jsonl, title, unit)
METRICS: List[Tuple[str, str, str]] = [
    ("loss", "Loss", ""),
    ("eval_loss", "Eval loss", ""),
    ("learning_rate", "Learning rate", ""),
    ("grad_norm", "Grad norm", ""),
    ("samples_per_second", "Throughput", "samples/s"),
    ("tokens_per_second", "Throughput", "tokens/s"),
    ("reward", "Reward", ""),
]
#: other spellings trainers log the same quantity under
_LIVE = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "SUSPENDED", "RESIZING"}
_ALIASES = {"tokens_per_second": ("train_tokens_per_second", "tokens_per_sec"),
            "reward": ("rewards/mean", "reward_mean")}


# ---------------------------------------------------------------- the model

@dataclass
class Run:
    """One run of an attempt's job (a requeued job has several, one sacct record each)."""

    state: str
    start: Optional[float]     # epoch seconds
    end: Optional[float]
    nodes: str = ""


@dataclass
class AttemptInfo:
    stage: str
    kind: str
    n: int
    job_id: Optional[str]
    state: str
    current: bool
    note: str = ""
    overrides: List[str] = field(default_factory=list)
    submitted: Optional[float] = None
    start: Optional[float] = None
    end: Optional[float] = None
    runs: List[Run] = field(default_factory=list)
    queue_wait: Optional[float] = None        # seconds from submission to the first start
    elapsed: Optional[float] = None           # seconds, all runs
    nodes: str = ""
    n_nodes: Optional[int] = None
    gpus: Optional[int] = None                # GPUs of the allocation, all nodes
    gpu_hours: Optional[float] = None
    cpu_seconds: Optional[float] = None       # sacct TotalCPU
    max_rss: Optional[int] = None             # bytes, the largest sacct MaxRSS of its steps
    max_rss_node: str = ""
    gpu_mem_predicted: Optional[int] = None   # bytes per GPU, memory_plan.json gpu.peak
    gpu_mem_measured: Optional[int] = None    # bytes, the largest max_allocated of memory_measured.json
    host_mem_measured: Optional[int] = None   # bytes, the largest peak_rss of memory_measured.json
    log: Optional[str] = None                 # paths relative to the run directory
    files: List[str] = field(default_factory=list)
    changes: List[Tuple[str, Any, Any]] = field(default_factory=list)   # vs the previous attempt
    changes_from: str = ""                    # what the changes were read from

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.n}"


@dataclass
class Series:
    attempt: int
    points: List[Tuple[int, float]]           # (global step, value), one per logged step


@dataclass
class Curve:
    metric: str
    title: str
    unit: str
    series: List[Series]

    @property
    def points(self) -> int:
        return sum(len(s.points) for s in self.series)


@dataclass
class Marker:
    step: int
    label: str


@dataclass
class Training:
    stage: str
    curves: List[Curve]
    markers: List[Marker]                     # resume points and fresh starts


@dataclass
class Result:
    stage: str
    path: str                                 # the report.json, relative to the run directory
    data: Dict[str, Any]
    markdown: Optional[str] = None            # its report.md, relative


@dataclass
class Report:
    chain_id: str
    name: str
    recipe: str
    profile: str
    run_dir: str
    created: str
    state: str
    generated: str
    stages: List[str]
    attempts: List[AttemptInfo]
    training: List[Training]
    results: List[Result]
    config: str                               # the resolved config.yaml of the latest attempts
    warnings: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- accounting

@dataclass
class AcctRun:
    """One allocation record of ``sacct`` (with ``--duplicates``: one per run of a requeued job)."""

    job_id: str
    name: str
    state: str
    elapsed: Optional[int]
    nodes: str
    n_nodes: Optional[int]
    submit: Optional[float]
    start: Optional[float]
    end: Optional[float]
    gpus: Optional[int]
    cpu_seconds: Optional[float]
    max_rss: Optional[int] = None
    max_rss_node: str = ""


SACCT_FORMAT = "JobID,JobName,State,ElapsedRaw,NodeList,NNodes,Submit,Start,End,AllocTRES,TotalCPU,MaxRSS,MaxRSSNode"


def sacct_args(job_ids: List[str], starttime: str) -> List[str]:
    # Steps are asked for too (no --allocations): MaxRSS is only recorded per step.
    return ["sacct", "--parsable2", "--noheader", "--duplicates", f"--jobs={','.join(job_ids)}",
            f"--starttime={starttime}", f"--format={SACCT_FORMAT}"]


def _local_epoch(text: str) -> Optional[float]:
    """sacct's times are the cluster's local time without a zone."""
    try:
        return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None     # Unknown, None, empty


def _utc_epoch(text: Optional[str]) -> Optional[float]:
    try:
        return _dt.datetime.strptime(text or "", "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=_dt.timezone.utc).timestamp()
    except ValueError:
        return None


_SIZE = re.compile(r"^([\d.]+)([KMGTP]?)$")


def parse_size(text: str) -> Optional[int]:
    """sacct's MaxRSS (``503396K``, ``1.5G``, ``0``) in bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** " KMGTP".index(m.group(2) or " "))


def parse_cpu_time(text: str) -> Optional[float]:
    """sacct's TotalCPU (``[D-][HH:]MM:SS[.mmm]``) in seconds."""
    text = text.strip()
    if not text:
        return None
    days, _, rest = text.rpartition("-")
    try:
        parts = [float(p) for p in rest.split(":")]
    except ValueError:
        return None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds + (int(days) * 86400 if days.isdigit() else 0)


def _tres_gpus(tres: str) -> Optional[int]:
    for part in tres.split(","):
        k, _, v = part.partition("=")
        if k == "gres/gpu" and v.isdigit():
            return int(v)
    return None


def parse_sacct(text: str) -> Dict[str, List[AcctRun]]:
    """``sacct`` output (:data:`SACCT_FORMAT`, ``--parsable2``) -> job id -> runs, oldest first,
    each with the largest MaxRSS of its steps (steps follow the allocation record they belong to)."""
    out: Dict[str, List[AcctRun]] = {}
    last: Optional[AcctRun] = None
    for line in text.splitlines():
        p = line.split("|")
        if len(p) < 13:
            continue
        jid = p[0]
        if jid.isdigit():
            elapsed = int(p[3]) if p[3].isdigit() else None
            last = AcctRun(jid, p[1], (p[2] or "UNKNOWN").split()[0], elapsed, p[4],
                           int(p[5]) if p[5].isdigit() else None, _local_epoch(p[6]), _local_epoch(p[7]),
                           _local_epoch(p[8]), _tres_gpus(p[9]), parse_cpu_time(p[10]))
            out.setdefault(jid, []).append(last)
        elif last is not None and jid.split(".")[0] == last.job_id:
            rss = parse_size(p[11]) if p[11] else None
            if rss is not None and (last.max_rss is None or rss > last.max_rss):
                last.max_rss, last.max_rss_node = rss, p[12]
    return out


def query_accounting(record: ChainRecord) -> Tuple[Dict[str, List[AcctRun]], Optional[str]]:
    """The accounting of every attempt's job in one sacct call; (data, warning)."""
    from ..slurm import AccountingUnavailable, Slurm
    from ..status import _local_time

    ids = sorted({j for j in record.job_ids()}, key=int)
    if not ids:
        return {}, None
    slurm = Slurm(record.slurm_conf)
    try:
        proc = slurm.run(sacct_args(ids, _local_time(record.created)), check=False,
                         error_cls=AccountingUnavailable)
    except Exception as e:     # sacct missing, timed out: the report is still useful without it
        return {}, f"accounting unavailable ({e}); resources come from the stages' markers"
    if proc.returncode != 0:
        return {}, f"accounting unavailable ({(proc.stderr or proc.stdout).strip()})"
    return parse_sacct(proc.stdout), None


# ---------------------------------------------------------------- files of an attempt

def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _value(rec: dict, metric: str) -> Optional[float]:
    for key in (metric,) + _ALIASES.get(metric, ()):
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            return float(v)
    return None


def _tokens_rate(prev: Optional[dict], rec: dict) -> Optional[float]:
    """tokens/s between two training logs carrying the Trainer's cumulative ``num_input_tokens_seen``."""
    if prev is None:
        return None
    a, b = prev.get("num_input_tokens_seen"), rec.get("num_input_tokens_seen")
    ta, tb = prev.get("time"), rec.get("time")
    if not all(isinstance(x, (int, float)) for x in (a, b, ta, tb)) or tb <= ta or b < a:
        return None
    return (b - a) / (tb - ta)


def training(stage: str, attempts: List[Tuple[int, List[dict]]]) -> Optional[Training]:
    """Curves of one stage from its attempts' progress.jsonl records; None when nothing was logged.

    A resumed run (a requeue, or a rerun continuing from a checkpoint) logs some steps again
    after its checkpoint: within an attempt the latest value of a step wins.
    """
    curves: List[Curve] = []
    for metric, title, unit in METRICS:
        series = []
        for n, recs in attempts:
            by_step: Dict[int, float] = {}
            prev: Optional[dict] = None
            for r in recs:
                if r.get("event") == "start":
                    prev = None          # a new run: its token count starts again from its checkpoint
                if "event" in r or not isinstance(r.get("step"), int):
                    continue
                v = _value(r, metric)
                if v is None and metric == "tokens_per_second":
                    v = _tokens_rate(prev, r)
                    prev = r if isinstance(r.get("num_input_tokens_seen"), (int, float)) else prev
                if v is not None:
                    by_step[r["step"]] = v
            if by_step:
                series.append(Series(n, sorted(by_step.items())))
        if series:
            curves.append(Curve(metric, title, unit, series))
    if not curves:
        return None
    markers: List[Marker] = []
    for i, (n, recs) in enumerate(attempts):
        starts = [r for r in recs if r.get("event") == "start"]
        for j, s in enumerate(starts):
            step = s.get("step") if isinstance(s.get("step"), int) else 0
            if step:
                how = "requeued" if j else "resumed"
                markers.append(Marker(step, f"attempt {n} {how} at step {step}"))
            elif i and j == 0:
                markers.append(Marker(0, f"attempt {n} started over"))
    return Training(stage, curves, markers)


# ---------------------------------------------------------------- what changed between attempts

def _rendered_config(adir: Path) -> Dict[str, Any]:
    """The JSON files rendered beside an attempt's script (train.json, ds_config.json, ...)."""
    from ..rerun import _flat   # the same flattening as rerun's config diff

    skip = {"marker.json", "started.json", "memory_plan.json", "memory_measured.json"}
    out: Dict[str, Any] = {}
    for p in sorted(adir.glob("*.json")):
        if p.name not in skip:
            data = _read_json(p)
            if isinstance(data, dict):
                out.update(_flat(data, f"{p.name}:"))
    return out


def changes(prev_dir: Path, cur_dir: Path, prev_n: int, cur_n: int) -> Tuple[List[Tuple[str, Any, Any]], str]:
    """Keys whose value differs between two attempts of a stage, and what they were read from:
    each attempt's config.yaml when both have one (a rerun writes it), else the files rendered
    beside the scripts. Paths that differ only by the attempt directory are not changes."""
    old_cfg, new_cfg = prev_dir / "config.yaml", cur_dir / "config.yaml"
    if old_cfg.is_file() and new_cfg.is_file():
        from ..rerun import config_changes

        try:
            return config_changes(old_cfg.read_text(), new_cfg.read_text()), "config.yaml"
        except (OSError, ValueError):
            pass
    old, new = _rendered_config(prev_dir), _rendered_config(cur_dir)
    if not old or not new:
        return [], ""
    mine, theirs = f"/attempt-{cur_n}", f"/attempt-{prev_n}"

    def same_place(v: Any) -> Any:
        return v.replace(mine, theirs) if isinstance(v, str) else v

    diff = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != same_place(new.get(k))]
    return diff, "rendered files"


# ---------------------------------------------------------------- putting it together

def _rel(path: Path, run_dir: Path) -> str:
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def _memory(adir: Path, att: AttemptInfo) -> None:
    plan = _read_json(adir / "memory_plan.json")
    if isinstance(plan, dict) and isinstance(plan.get("gpu"), dict):
        peak = plan["gpu"].get("peak")
        att.gpu_mem_predicted = int(peak) if isinstance(peak, (int, float)) else None
    measured = _read_json(adir / "memory_measured.json")
    ranks = measured.get("ranks") if isinstance(measured, dict) else None
    if isinstance(ranks, list):
        gpu = [r.get("max_allocated") for r in ranks if isinstance(r, dict)]
        host = [r.get("peak_rss") for r in ranks if isinstance(r, dict)]
        gpu = [int(x) for x in gpu if isinstance(x, (int, float))]
        host = [int(x) for x in host if isinstance(x, (int, float))]
        att.gpu_mem_measured = max(gpu) if gpu else None
        att.host_mem_measured = max(host) if host else None


_GPUS_PER_NODE = re.compile(r"^#SBATCH\s+--gpus-per-node=(?:[\w-]+:)?(\d+)\s*$", re.M)
_GRES_GPU = re.compile(r"^#SBATCH\s+--gres=gpu(?::[\w-]+)?:(\d+)\s*$", re.M)


def _script_gpus_per_node(script: Path) -> Optional[int]:
    """GPUs per node the script asked for (when accounting does not track gres/gpu); 0: none asked."""
    try:
        text = script.read_text()
    except OSError:
        return None
    m = _GPUS_PER_NODE.search(text) or _GRES_GPU.search(text)
    return int(m.group(1)) if m else 0


def _attempt(record: ChainRecord, stage, a, current_state: Optional[str],
             acct: Dict[str, List[AcctRun]], now: float) -> AttemptInfo:
    from ..render import SCRIPT

    run_dir = Path(record.run_dir)
    adir = record.attempt_dir(stage.name, a.n)
    att = AttemptInfo(stage.name, stage.kind, a.n, a.job_id, "NOT_SUBMITTED", a is stage.current,
                      note=a.note, overrides=list(a.overrides), submitted=_utc_epoch(a.submitted))
    started = _read_json(adir / "started.json") or {}
    marker = _read_json(adir / "marker.json") or {}
    if a.job_id and str(marker.get("job_id")) != a.job_id:
        marker = {}
    if a.job_id and str(started.get("job_id")) != a.job_id:
        started = {}
    # sacct runs of this job id that belong to this chain (a devcluster re-created from
    # scratch reuses job ids; the job name says whose a record is)
    runs = [r for r in acct.get(a.job_id or "", []) if r.name in ("", f"{record.chain_id}.{stage.name}")]
    if runs:
        att.runs = [Run(r.state, r.start, r.end, r.nodes) for r in runs if r.start]
        att.submitted = runs[0].submit or att.submitted
        att.state = runs[-1].state
        ran = [r for r in runs if r.elapsed is not None and r.start]
        if ran:      # a pending job has "None assigned" nodes and nothing used
            att.nodes, att.n_nodes = ran[-1].nodes, ran[-1].n_nodes
        att.elapsed = float(sum(r.elapsed for r in ran)) if ran else None
        # sacct adds a step's CPU time when the step ends: a live job's TotalCPU is not known yet
        cpu = [r.cpu_seconds for r in ran if r.cpu_seconds is not None]
        att.cpu_seconds = sum(cpu) if cpu and att.state not in _LIVE else None
        rss = [r for r in runs if r.max_rss is not None]
        if rss:
            top = max(rss, key=lambda r: r.max_rss or 0)
            att.max_rss, att.max_rss_node = top.max_rss, top.max_rss_node
        gpus = runs[-1].gpus
        if gpus is None and att.n_nodes:
            per_node = _script_gpus_per_node(adir / SCRIPT)
            gpus = per_node * att.n_nodes if per_node is not None else None
        att.gpus = gpus
        if gpus is not None and ran:
            att.gpu_hours = sum((r.elapsed or 0) * gpus for r in ran) / 3600.0
    elif a.job_id:
        # No accounting: the job's own markers say when it ran and how it ended.
        start, end = _utc_epoch(started.get("time")), _utc_epoch(marker.get("time"))
        if marker:
            att.state = "COMPLETED" if marker.get("exit_code") == 0 else "FAILED"
        elif started:
            att.state = "RUNNING"
        else:
            att.state = "PENDING"
        if start:
            att.runs = [Run(att.state, start, end, started.get("host", ""))]
            att.elapsed = ((end or now) - start)
        att.nodes = str(started.get("host", ""))
    if att.current and current_state:
        att.state = current_state          # hpcjobs status' word for the current attempt
        if att.runs and att.state not in _LIVE:
            att.runs[-1].state = att.state
    if att.runs:
        att.start = att.runs[0].start
        ends = [r.end for r in att.runs if r.end]
        att.end = max(ends) if ends and att.runs[-1].end else None
    if att.submitted and att.start:
        att.queue_wait = max(0.0, att.start - att.submitted)
    _memory(adir, att)
    if a.job_id and (adir / f"slurm-{a.job_id}.out").exists():
        att.log = _rel(adir / f"slurm-{a.job_id}.out", run_dir)
    if adir.is_dir():
        att.files = [_rel(p, run_dir) for p in sorted(adir.iterdir())
                     if p.is_file() and not p.name.startswith(".") and p.name != f"slurm-{a.job_id}.out"]
    return att


def _results(record: ChainRecord, config: Dict[str, Any]) -> List[Result]:
    """Each stage whose output directory holds a ``report.json`` (what an evaluation writes)."""
    run_dir = Path(record.run_dir)
    run = config.get("run")
    was = run.get("dir") if isinstance(run, dict) else None
    out = []
    for st in record.stages:
        section = config.get(st.name)
        output = section.get("output") if isinstance(section, dict) else None
        if not isinstance(output, str) or not output:
            continue
        if isinstance(was, str) and was and (output == was or output.startswith(was.rstrip("/") + "/")):
            output = str(run_dir) + output[len(was.rstrip("/")):]   # the run directory was moved
        path = Path(output) if Path(output).is_absolute() else run_dir / output
        data = _read_json(path / "report.json")
        if isinstance(data, dict):
            md = path / "report.md"
            out.append(Result(st.name, _rel(path / "report.json", run_dir), data,
                              _rel(md, run_dir) if md.is_file() else None))
    return out


def build(cs: ChainStatus, acct: Dict[str, List[AcctRun]], *, warnings: Optional[List[str]] = None,
          now: Optional[float] = None) -> Report:
    """The report of a chain from its status and accounting (no Slurm call here)."""
    import yaml

    record = cs.record
    now = time.time() if now is None else now
    run_dir = Path(record.run_dir)
    state_of = {s.name: s.state for s in cs.stages}
    attempts: List[AttemptInfo] = []
    trainings: List[Training] = []
    for st in record.stages:
        mine = [_attempt(record, st, a, state_of.get(st.name) if a is st.current else None, acct, now)
                for a in st.attempts]
        for prev, cur in zip(mine, mine[1:]):
            cur.changes, cur.changes_from = changes(record.attempt_dir(st.name, prev.n),
                                                    record.attempt_dir(st.name, cur.n), prev.n, cur.n)
        attempts += mine
        progress = [(a.n, progress_mod.records(record.attempt_dir(st.name, a.n) / "progress.jsonl"))
                    for a in st.attempts]
        t = training(st.name, [(n, recs) for n, recs in progress if recs])
        if t is not None:
            trainings.append(t)
    try:
        config_text = (run_dir / "config.yaml").read_text()
    except OSError:
        config_text = ""
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        config = {}
    return Report(
        chain_id=record.chain_id, name=record.name, recipe=record.recipe, profile=record.profile,
        run_dir=str(run_dir), created=record.created, state=cs.state,
        generated=_dt.datetime.fromtimestamp(now, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        stages=[st.name for st in record.stages], attempts=attempts, training=trainings,
        results=_results(record, config if isinstance(config, dict) else {}), config=config_text,
        warnings=list(cs.warnings) + list(warnings or []))


def collect(record: ChainRecord) -> Report:
    """The report of a chain: its status (one squeue, one sacct call) and its accounting (one sacct call)."""
    from ..status import collect as status_collect

    cs = status_collect([record])[0]
    acct, warning = query_accounting(record)
    return build(cs, acct, warnings=[warning] if warning and cs.accounting else [])   # status said it already
