"""Terminal output for status and list (rich tables; plain text when not a terminal).

On a terminal, tables fit the window and a value too long for its column folds onto
the next line. Piped or redirected (``hpcjobs list > file``, CI logs, ``grep``),
nothing is cut or wrapped: every chain id, path and reason is printed whole.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import progress as progress_mod
from . import stages
from .errors import HpcjobsError
from .records import ChainRecord
from .slurm import LIVE_STATES
from .status import ChainStatus, StageStatus, collect, tail

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "SUBMIT_FAILED")

_STYLE = {
    "COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red",
    "CANCELLED": "magenta", "TIMEOUT": "red", "NODE_FAIL": "red", "OUT_OF_MEMORY": "red",
    "UNKNOWN": "dim", "SUBMIT_FAILED": "red",
}


# Wide enough that rich never truncates a column or wraps a line when output is not a terminal
# (rich would otherwise assume 80 columns, or $COLUMNS, and cut values with an ellipsis).
_PIPE_WIDTH = 1 << 20


def _console() -> Console:
    con = Console(highlight=False, soft_wrap=False, emoji=False)
    if not con.is_terminal:
        con.width = _PIPE_WIDTH
    return con


def _table(*columns: str) -> Table:
    """A borderless table whose long values fold (never '…') when they do not fit the terminal."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def _state(state: str) -> str:
    style = _STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def _exit(s: StageStatus) -> str:
    """The exit code: the failing rank's when its log tells it (a multi-node stage's job often
    ends with a peer's SIGTERM instead), else Slurm's."""
    if s.rank_exit_code is not None:
        return f"{s.rank_exit_code}" + (f" (signal {s.rank_signal})" if s.rank_signal else "")
    return _slurm_exit(s)


def _slurm_exit(s: StageStatus) -> str:
    if s.exit_code is None:
        return ""
    return f"{s.exit_code}" + (f" (signal {s.signal})" if s.signal else "")


def _why(s: StageStatus) -> str:
    if s.blocked_by:
        why = f"blocked: upstream {s.blocked_by} failed (DependencyNeverSatisfied)"
    elif s.reason == "Dependency":
        why = "waiting for upstream stages"
    elif s.reason == "JobHeldUser":
        why = "held (submission not finished)"
    else:
        why = s.reason
    if s.history:
        last = s.history[-1]
        where = f"node {', '.join(s.failed_nodes)} failed" if s.failed_nodes else f"on {last['nodes'] or '?'}"
        requeued = f"requeued {len(s.history)}x (last run: {last['state']}, {where})"
        why = f"{why}; {requeued}" if why else requeued
    return why


def stage_progress(cs: ChainStatus, s: StageStatus) -> Optional[progress_mod.Progress]:
    kind = stages.find(s.kind)
    if kind is None:
        return None
    return kind.progress(cs.record.attempt_dir(s.name, s.attempt), Path(s.log) if s.log else None)


def _status_table(cs: ChainStatus) -> Group:
    table = _table("stage", "job", "try", "state", "elapsed", "nodes", "exit", "reason")
    notes = []
    for s in cs.stages:
        table.add_row(Text(s.name), s.job_id or "-", str(s.attempt), _state(s.state), s.elapsed,
                      Text(s.nodes), _exit(s), Text(_why(s)))
        prog = stage_progress(cs, s) if s.state in ("RUNNING", "COMPLETED") or s.failed else None
        if prog is not None:
            notes.append(Text(f"{s.name}: {prog.line()}"))
        if s.memory:
            notes.append(Text(f"{s.name}: {memory_line(s.memory)}"))
    return Group(table, *notes)


def _size(n: Optional[int]) -> str:
    # memplan's fmt_bytes rounds to whole MiB; a tiny model's states are less than one
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.2f} {unit}" if unit == "GiB" or v < 10 else f"{v:.0f} {unit}"
    return f"{n} B"


def memory_line(mem: dict) -> str:
    """"memory: predicted ... measured ..." for a training stage (status.memory_summary)."""
    parts = []
    pred, meas = mem.get("predicted"), mem.get("measured")
    if pred:
        states = f" (model states {_size(pred['model_states'])})" if pred.get("model_states") else ""
        parts.append(f"predicted {_size(pred.get('peak_per_rank'))}/rank{states}")
    if meas:
        states = f"model states {_size(meas.get('model_state_bytes'))}, peak RSS {_size(meas.get('peak_rss'))}"
        n = f"max of {meas['ranks']} ranks" if meas.get("ranks", 0) > 1 else "1 rank"
        if meas.get("max_allocated") is not None:
            parts.append(f"measured {_size(meas['max_allocated'])}/rank allocated ({meas['device']}, {n}; "
                         f"reserved {_size(meas.get('max_reserved'))}, {states})")
        else:
            parts.append(f"measured ({meas['device']}, {n}): {states}")
    return "memory: " + ", ".join(parts)


def _header(cs: ChainStatus) -> List[str]:
    r = cs.record
    lines = [f"chain [bold]{escape(r.chain_id)}[/bold]  {_state(cs.state)}   "
             f"recipe {escape(r.recipe)}, profile {escape(r.profile)}",
             f"run directory {escape(r.run_dir)}"]
    if r.error:
        lines.append(f"[red]{escape(r.error)}[/red]")
    lines += [f"[yellow]warning:[/yellow] {escape(w)}" for w in cs.warnings]
    lines += [f"[yellow]forced:[/yellow] {escape(st.name)} attempt {st.current.n}: {escape(st.current.forced)}"
              for st in r.stages if st.current.forced]
    return lines


def chain_status(cs: ChainStatus) -> None:
    con = _console()
    for line in _header(cs):
        con.print(line)
    con.print(_status_table(cs))
    for s in cs.stages:
        if s.failed:
            code = _exit(s)
            if s.rank_exit_code is not None and s.exit_code is not None and code != _slurm_exit(s):
                code += f" (the failing rank's; the job's: {_slurm_exit(s)})"
            con.print(f"\n[red]{s.name} {s.state}[/red]" + escape((f" on {s.nodes}" if s.nodes else "")
                      + (f", exit code {code}" if code else "")
                      + (f"; a task failed on {', '.join(s.failed_nodes)}" if s.failed_nodes else "")
                      + f"; log {s.log}"))
            if s.error_line:
                con.print(f"  error: {s.error_line}", markup=False)
            for line in tail(s.log, 10):
                con.print(f"  | {line}", markup=False)
            con.print(f"  rerun it: hpcjobs rerun {cs.record.chain_id}", markup=False)


def watch(rec: ChainRecord, interval: float) -> str:
    """Refresh until the chain reaches a final state; returns that state."""
    con = _console()
    if con.is_terminal:
        with Live(console=con, refresh_per_second=4, transient=False) as live:
            while True:
                cs = collect([rec])[0]
                live.update(Group(*[Text.from_markup(x) for x in _header(cs)], _status_table(cs)))
                if cs.state in FINAL:
                    break
                time.sleep(interval)
        if cs.state != "COMPLETED":
            chain_status(cs)
        else:
            con.print(f"run directory: {cs.record.run_dir}", markup=False)
        return cs.state
    # Not a terminal (CI, a log file): one line whenever something changes.
    last = None
    while True:
        cs = collect([rec])[0]
        parts = []
        for s in cs.stages:
            prog = stage_progress(cs, s) if s.state == "RUNNING" else None
            parts.append(f"{s.name}={s.state}" + (f" ({prog.line()})" if prog else ""))
        line = f"{cs.record.chain_id} {cs.state}: " + "  ".join(parts)
        if line != last:
            print(time.strftime("%H:%M:%S"), line, flush=True)
            last = line
        if cs.state in FINAL:
            if cs.state != "COMPLETED":
                chain_status(cs)
            else:
                print(f"run directory: {cs.record.run_dir}", flush=True)
            return cs.state
        time.sleep(interval)


def logs(rec: ChainRecord, stage: str, attempt: Optional[int], *, follow: bool, lines: Optional[int]) -> None:
    st = rec.stage(stage)
    att = st.current if attempt is None else next((a for a in st.attempts if a.n == attempt), None)
    if att is None:
        raise HpcjobsError(f"stage {stage} has attempts {', '.join(str(a.n) for a in st.attempts)}; "
                           f"no attempt {attempt}")
    if not att.job_id:
        raise HpcjobsError(f"stage {stage} attempt {att.n} was never submitted")
    path = rec.attempt_dir(stage, att.n) / f"slurm-{att.job_id}.out"
    out = sys.stdout
    pos = 0
    if lines is not None:
        text = "\n".join(tail(str(path), lines))
        out.write(text + ("\n" if text else ""))
        pos = path.stat().st_size if path.exists() else 0
    next_check = 0.0
    while True:
        if path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            if chunk:
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
                pos += len(chunk)
        elif not follow:
            raise HpcjobsError(f"no log yet at {path} (the job has not started)")
        if not follow:
            return
        if time.monotonic() >= next_check:
            s = next(x for x in collect([rec])[0].stages if x.name == stage)
            if s.job_id != att.job_id or (s.state not in LIVE_STATES and s.state != "UNKNOWN"):
                if path.exists() and path.stat().st_size == pos:
                    return
            next_check = time.monotonic() + 3
        time.sleep(0.5)


def chain_list(statuses: List[ChainStatus]) -> None:
    con = _console()
    if not statuses:
        con.print("no chains yet (hpcjobs submit RECIPE ...)")
        return
    table = _table("chain", "state", "recipe", "profile", "created", "stages")
    for cs in statuses:
        done = sum(1 for s in cs.stages if s.state == "COMPLETED")
        r = cs.record
        table.add_row(Text(r.chain_id), _state(cs.state), Text(r.recipe), Text(r.profile), Text(r.created),
                      f"{done}/{len(cs.stages)} done")
    con.print(table)
    warned = {w for cs in statuses for w in cs.warnings}
    for w in sorted(warned):
        con.print(f"[yellow]warning:[/yellow] {escape(w)}")
