"""Terminal output for status and list (rich tables; plain text when not a terminal)."""

from __future__ import annotations

from typing import List

from rich.console import Console
from rich.table import Table

from .status import ChainStatus, StageStatus, tail

_STYLE = {
    "COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red",
    "CANCELLED": "magenta", "TIMEOUT": "red", "NODE_FAIL": "red", "OUT_OF_MEMORY": "red",
    "UNKNOWN": "dim", "SUBMIT_FAILED": "red",
}


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _state(state: str) -> str:
    style = _STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def _exit(s: StageStatus) -> str:
    if s.exit_code is None:
        return ""
    return f"{s.exit_code}" + (f" (signal {s.signal})" if s.signal else "")


def _why(s: StageStatus) -> str:
    if s.blocked_by:
        return f"blocked: upstream {s.blocked_by} failed (DependencyNeverSatisfied)"
    if s.reason == "Dependency":
        return "waiting for upstream stages"
    if s.reason == "JobHeldUser":
        return "held (submission not finished)"
    return s.reason


def chain_status(cs: ChainStatus) -> None:
    con = _console()
    r = cs.record
    con.print(f"chain [bold]{r.chain_id}[/bold]  {_state(cs.state)}   recipe {r.recipe}, profile {r.profile}")
    con.print(f"run directory {r.run_dir}")
    if r.error:
        con.print(f"[red]{r.error}[/red]")
    for w in cs.warnings:
        con.print(f"[yellow]warning:[/yellow] {w}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("stage", "job", "try", "state", "elapsed", "nodes", "exit", "reason"):
        table.add_column(col)
    for s in cs.stages:
        table.add_row(s.name, s.job_id or "-", str(s.attempt), _state(s.state), s.elapsed,
                      s.nodes, _exit(s), _why(s))
    con.print(table)
    for s in cs.stages:
        if s.failed:
            con.print(f"\n[red]{s.name} {s.state}[/red]" + (f" on {s.nodes}" if s.nodes else "")
                      + (f", exit code {_exit(s)}" if s.exit_code is not None else "")
                      + f"; log {s.log}")
            for line in tail(s.log, 10):
                con.print(f"  | {line}", markup=False)


def chain_list(statuses: List[ChainStatus]) -> None:
    con = _console()
    if not statuses:
        con.print("no chains yet (hpcjobs submit RECIPE ...)")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("chain", "state", "recipe", "profile", "created", "stages"):
        table.add_column(col)
    for cs in statuses:
        done = sum(1 for s in cs.stages if s.state == "COMPLETED")
        table.add_row(cs.record.chain_id, _state(cs.state), cs.record.recipe, cs.record.profile,
                      cs.record.created, f"{done}/{len(cs.stages)} done")
    con.print(table)
    warned = {w for cs in statuses for w in cs.warnings}
    for w in sorted(warned):
        con.print(f"[yellow]warning:[/yellow] {w}")
