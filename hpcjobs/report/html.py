"""The report as one self-contained HTML file (no network access when opened).

Plots: uPlot (https://github.com/leeoniya/uPlot, MIT), vendored in ``vendor/`` and inlined.
It is interactive (hover values, drag to zoom a step range, toggle a series) at ~50 KB,
where plotly.js is ~3.5 MB (over the 2 MB cap) and Vega + Vega-Lite ~1 MB; a static
matplotlib SVG would need matplotlib and numpy on every login node and shows no values
on hover. uPlot draws XY series, which is all the training curves are. The timeline is
positioned boxes, plain HTML/CSS: one element per attempt that a test can count, and
nothing a plotting library would add.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import quote

from .collect import AttemptInfo, Report

VENDOR = Path(__file__).parent / "vendor"
TEMPLATE = "report.html.j2"

#: metrics drawn together in one chart (the first names the chart)
CHARTS = [("loss", "eval_loss"), ("learning_rate",), ("grad_norm",), ("samples_per_second",),
          ("tokens_per_second",), ("reward",)]

#: final states by colour class
_STATE_CLASS = {
    "COMPLETED": "ok", "RUNNING": "run", "COMPLETING": "run", "CONFIGURING": "run",
    "PENDING": "wait", "REQUEUED": "requeue", "PREEMPTED": "requeue", "SUSPENDED": "requeue",
    "CANCELLED": "cancel", "NOT_SUBMITTED": "cancel", "UNKNOWN": "cancel",
}


def state_class(state: str) -> str:
    return _STATE_CLASS.get(state, "fail")    # FAILED, NODE_FAIL, TIMEOUT, OUT_OF_MEMORY, ...


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    from ..progress import format_duration

    return format_duration(seconds)


def size(n: Optional[float]) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "—"  # pragma: no cover


def clock(epoch: Optional[float]) -> str:
    import datetime as dt

    if epoch is None:
        return "—"
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def timeline(report: Report, now: float) -> Dict[str, Any]:
    """Rows of the timeline: per attempt, segments in percent of the chain's time span."""
    times = [t for a in report.attempts for t in [a.submitted, a.start, a.end] + [r.end for r in a.runs] if t]
    if not times:
        return {"rows": [], "ticks": []}
    t0 = min(times)
    running = any(r.end is None for a in report.attempts for r in a.runs)
    t1 = max(times + ([now] if running else []))
    span = max(t1 - t0, 1.0)

    def pct(t: float) -> float:
        return round(100.0 * (t - t0) / span, 3)

    rows = []
    for a in report.attempts:
        segs = []
        cursor = a.submitted
        for i, r in enumerate(a.runs):
            if r.start is None:
                continue
            if cursor is not None and r.start > cursor:
                segs.append({"left": pct(cursor), "width": max(pct(r.start) - pct(cursor), 0.15),
                             "cls": "queue", "title": f"waiting {duration(r.start - cursor)}"
                             + (" (requeued)" if i else " in the queue")})
            end = r.end if r.end is not None else now
            segs.append({"left": pct(r.start), "width": max(pct(end) - pct(r.start), 0.3),
                         "cls": state_class(r.state),
                         "title": f"run {i + 1}: {r.state}, {duration(end - r.start)} on {r.nodes or '?'}"})
            cursor = end
        if not a.runs and a.submitted is not None and a.state in ("PENDING", "UNKNOWN"):
            segs.append({"left": pct(a.submitted), "width": max(pct(t1) - pct(a.submitted), 0.3),
                         "cls": "queue", "title": "waiting in the queue"})
        rows.append({"a": a, "segs": segs, "cls": state_class(a.state)})
    ticks = [{"left": round(100.0 * i / 4, 1), "label": "+" + duration(span * i / 4)} for i in range(5)]
    return {"rows": rows, "ticks": ticks, "start": clock(t0), "end": clock(t1)}


def charts(report: Report) -> List[Dict[str, Any]]:
    """The chart specs the page's script draws with uPlot (one list of series per chart)."""
    out = []
    for t in report.training:
        by_metric = {c.metric: c for c in t.curves}
        for group in CHARTS:
            curves = [by_metric[m] for m in group if m in by_metric]
            if not curves:
                continue
            first = curves[0]
            unit = f" ({first.unit})" if first.unit else ""
            out.append({
                "id": f"chart-{t.stage}-{first.metric}", "stage": t.stage, "metric": first.metric,
                "title": f"{t.stage}: {first.title}{unit}" + (" and eval loss" if len(curves) > 1 else ""),
                "series": [{"metric": c.metric, "attempt": s.attempt,
                            "label": f"{'eval ' if c.metric == 'eval_loss' else ''}attempt {s.attempt}",
                            "steps": [p[0] for p in s.points],
                            "values": [float(f"{p[1]:.6g}") for p in s.points]}   # 6 digits: half the bytes
                           for c in curves for s in c.series],
                "markers": [{"step": m.step, "label": m.label} for m in t.markers],
            })
    return out


def _href(rel: str, run_dir: str, out_dir: Path) -> str:
    target = Path(rel) if Path(rel).is_absolute() else Path(run_dir) / rel
    return quote(os.path.relpath(target, out_dir))


def _metrics_rows(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Numbers of a report.json: ``{"eval_loss": {"base": 6.7, "merged": 6.2}}`` -> a row per key,
    a column per inner key; plain numbers get one column."""
    rows = []
    for k, v in data.items():
        if isinstance(v, dict) and v and all(isinstance(x, (int, float, type(None))) for x in v.values()):
            rows.append({"key": k, "values": v})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append({"key": k, "values": {"": v}})
    return rows


def _number(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def render(report: Report, out_dir: Path, *, now: Optional[float] = None) -> str:
    import time

    import jinja2

    now = time.time() if now is None else now
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(duration=duration, size=size, clock=clock, number=_number,
                       href=lambda rel: _href(rel, report.run_dir, out_dir))
    spec = charts(report)
    # JSON inside <script>: no "</script>" or "<!--" can end it early
    data = json.dumps({"charts": spec}, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    results = [{"r": r, "metrics": _metrics_rows(r.data),
                "samples": [s for s in r.data.get("samples", []) if isinstance(s, dict)]
                if isinstance(r.data.get("samples"), list) else []}
               for r in report.results]
    changed = [a for a in report.attempts if a.n > 1]
    return env.get_template(TEMPLATE).render(
        r=report, timeline=timeline(report, now), charts=spec, data=data, results=results,
        changed=changed, state_class=state_class,
        uplot_js=(VENDOR / "uPlot.iife.min.js").read_text(), uplot_css=(VENDOR / "uPlot.min.css").read_text(),
        attempt_title=_attempt_title)


def _attempt_title(a: AttemptInfo) -> str:
    return f"{a.stage} #{a.n}" + (f" (job {a.job_id})" if a.job_id else "")

