"""Training progress of a finetune stage, read from its ``progress.jsonl``.

The finetune job's rank 0 appends one JSON object per trainer log
(``{"time", "step", "max_steps", "loss", "learning_rate", ...}``) and event lines
(``{"event": "start" | "checkpoint" | "preempted" | "end", ...}``). Reading it
needs no Slurm call and no training library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional


@dataclass
class Progress:
    step: int
    max_steps: Optional[int]
    loss: Optional[float]
    learning_rate: Optional[float]
    steps_per_second: Optional[float]
    samples_per_second: Optional[float]
    eta_seconds: Optional[float]
    event: Optional[str]          # the latest event line
    resumed_from: Optional[int]   # the global step this run started from

    def line(self) -> str:
        parts = [f"step {self.step}" + (f"/{self.max_steps}" if self.max_steps else "")]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:.2e}")
        if self.samples_per_second:
            parts.append(f"{self.samples_per_second:.1f} samples/s")
        elif self.steps_per_second:
            parts.append(f"{self.steps_per_second:.2f} steps/s")
        if self.eta_seconds is not None:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        if self.resumed_from:
            parts.append(f"resumed at step {self.resumed_from}")
        if self.event in ("preempted", "end"):
            parts.append(self.event)
        return ", ".join(parts)


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _records(path: Path) -> List[dict]:
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read(path: Path) -> Optional[Progress]:
    recs = _records(Path(path))
    if not recs:
        return None
    # The current run is everything after the last start event (a requeue appends a new run).
    starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
    run = recs[starts[-1]:] if starts else recs
    steps = [r for r in run if "loss" in r and "event" not in r]  # eval lines carry eval_loss only
    event = next((r["event"] for r in reversed(run) if "event" in r), None)
    start = run[0] if starts else None
    resumed = start.get("step") if start else None
    if not steps:
        return Progress(int(resumed or 0), start.get("max_steps") if start else None, None, None, None,
                        None, None, event, resumed or None)
    last = steps[-1]
    rate = None
    if len(steps) >= 2 and steps[-1].get("time") and steps[0].get("time"):
        dt = steps[-1]["time"] - steps[0]["time"]
        if dt > 0:
            rate = (steps[-1]["step"] - steps[0]["step"]) / dt
    max_steps = last.get("max_steps")
    eta = (max_steps - last["step"]) / rate if rate and max_steps else None
    return Progress(int(last["step"]), max_steps, last.get("loss"), last.get("learning_rate"), rate,
                    last.get("samples_per_second"), eta, event, resumed or None)
