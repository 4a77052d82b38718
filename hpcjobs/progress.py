"""Training progress of a finetune stage, read from its ``progress.jsonl``, or of a script
stage, from its ``progress.jsonl`` (written by hpcjobs.train.callbacks.HpcjobsCallback) or
else from an HF Trainer's own output in the Slurm log (:func:`from_trainer_log`).

The finetune job's rank 0 appends one JSON object per trainer log
(``{"time", "step", "max_steps", "loss", "learning_rate", ...}``) and event lines
(``{"event": "start" | "checkpoint" | "preempted" | "end", ...}``). Reading it
needs no Slurm call and no training library (standard library only: this runs on the
login node).
"""

from __future__ import annotations

import json
import math
import re
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
    # GRPO (the grpo stage's lines): mean reward, its std, KL (beta > 0), mean completion length
    reward: Optional[float] = None
    reward_std: Optional[float] = None
    kl: Optional[float] = None
    completion_length: Optional[float] = None
    # packed fixed-length samples (pretrain): throughput is shown in tokens/s
    tokens_per_sample: Optional[int] = None

    def line(self) -> str:
        parts = [f"step {self.step}" + (f"/{self.max_steps}" if self.max_steps else "")]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:.2e}")
        if self.reward is not None:
            parts.append(f"reward {self.reward:.3f}" + (f" ± {self.reward_std:.3f}" if self.reward_std is not None
                                                        else ""))
        if self.kl is not None:
            parts.append(f"KL {self.kl:.4f}")
        if self.completion_length is not None:
            parts.append(f"completion {self.completion_length:.1f} tokens")
        if self.samples_per_second and self.tokens_per_sample:
            parts.append(f"{self.samples_per_second * self.tokens_per_sample:,.0f} tokens/s")
        elif self.samples_per_second:
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


def records(path: Path) -> List[dict]:
    """Every JSON object line of a progress.jsonl (a half-written last line is skipped)."""
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
    recs = records(Path(path))
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
                    last.get("samples_per_second"), eta, event, resumed or None,
                    **{k: last.get(k) for k in ("reward", "reward_std", "kl", "completion_length")})


# ---------------------------------------------------------------------------- an unmodified HF Trainer's log
#
# A ``script`` stage runs the user's own program; unless it uses
# hpcjobs.train.callbacks.HpcjobsCallback there is no progress.jsonl, only the Slurm log.
# An HF Trainer prints each training log as a dict (``{'loss': 2.31, 'grad_norm': 0.9,
# 'learning_rate': 4e-05, 'epoch': 0.5}``; transformers 5 prints the numbers as strings,
# ``{'loss': '2.31', ...}``) and draws a tqdm bar on stderr (``12/40 [00:05<00:12, 2.30it/s]``,
# redrawn after ``\r`` within one line). Slurm's log holds both, possibly prefixed by a
# rank label (``0: `` from ``srun --label``, ``[rank0]:``/``[default0]:`` from torchrun,
# ``node1: `` from pdsh) and interleaved with anything else the ranks print.

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_SEGMENT = re.compile(r"[\r\n]+")
_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf)"
_LOG_DICT = re.compile(r"\{[^{}]*'(?:loss|train_runtime)'\s*:[^{}]*\}")
_LOG_ITEM = re.compile(r"'(\w+)'\s*:\s*(?:'(" + _NUMBER + r")'|(" + _NUMBER + r"))(?=\s*[,}])")
# tqdm's right part: "| n/total [elapsed<remaining, rate]" (rate "2.30it/s", "1.52s/it" or "?it/s")
_BAR = re.compile(
    r"(\d+)/(\d+)\s*\[(\d+(?::\d\d)+)<(\d+(?::\d\d)+|\?),\s*(?:(\d+(?:\.\d+)?)\s*(it/s|s/it)|\?\s*it/s)"
)
_BAR_PERCENT = re.compile(r"\d{1,3}%\|[^|]*\|\s*$")
# Rank labels in front of a line: "0: ", " 3: ", "[rank0]: ", "[default1]:", "node1: " (a
# hostname with a digit; a tqdm description such as "Map: " has none, or has spaces).
_RANK_LABEL = re.compile(r"^\s*(?:(?:\[[^\]]*\]|[\w.-]*\d[\w.-]*)\s*:\s*)+")


def _seconds(hms: str) -> Optional[float]:
    if hms == "?":
        return None
    total = 0
    for part in hms.split(":"):
        total = total * 60 + int(part)
    return float(total)


def _log_values(text: str) -> dict:
    values = {}
    for m in _LOG_ITEM.finditer(text):
        try:
            values[m.group(1)] = float(m.group(2) if m.group(2) is not None else m.group(3))
        except ValueError:  # pragma: no cover - the pattern only admits numbers
            continue
    return values


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None


def from_trainer_log(text: str) -> Optional[Progress]:
    """Progress read from what an unmodified HF Trainer prints (a Slurm log's text), or None.

    Step, total, steps/s and ETA come from the training bar (tqdm), loss and learning rate
    from the latest training log dict. The training bar is the first bar without a
    description (``Map: 45%|...`` and ``Writing model shards: ...`` are not it); later
    bars with another total (evaluation) are ignored, and a bar with the same total never
    moves the step backwards. Without a bar (``disable_tqdm``) the step is 0 and the total
    unknown; ``event`` is ``"end"`` once the Trainer's final summary (``train_runtime``)
    follows the last training log.
    """
    text = _ANSI.sub("", text)
    total = None
    step = None
    rate = None
    eta = None
    loss = lr = None
    seen_log = False
    event = None
    for segment in _SEGMENT.split(text):
        if not segment:
            continue
        if "'" in segment and "{" in segment:
            for m in _LOG_DICT.finditer(segment):
                values = _log_values(m.group(0))
                if "loss" in values:
                    seen_log = True
                    loss = _finite_or_none(values["loss"])
                    lr = _finite_or_none(values.get("learning_rate"))
                    event = None
                elif "train_runtime" in values:
                    event = "end"
        if "/" not in segment or "[" not in segment:
            continue
        for m in _BAR.finditer(segment):
            prefix = _BAR_PERCENT.sub("", segment[:m.start()])
            if _RANK_LABEL.sub("", prefix, count=1).strip():
                continue  # a described bar: datasets' "Map", checkpoint loading, saving...
            n, t = int(m.group(1)), int(m.group(2))
            if total is None:
                total = t
            if t != total or (step is not None and n < step):
                continue
            step = n
            eta = _seconds(m.group(4))
            if m.group(5) is None:
                rate = None
            else:
                r = float(m.group(5))
                rate = r if m.group(6) == "it/s" else (1.0 / r if r > 0 else None)
    if step is None and not seen_log and event is None:
        return None
    return Progress(step or 0, total, loss, lr, rate, None, eta, event, None)


def for_attempt(attempt_dir: Path, log_path: Optional[Path]) -> Optional[Progress]:
    """The progress of one attempt: its ``progress.jsonl`` when present and not empty (the
    finetune stage, or a script using HpcjobsCallback), else ``log_path`` read as an
    unmodified HF Trainer's output (:func:`from_trainer_log`); None when neither says anything."""
    jsonl = Path(attempt_dir) / "progress.jsonl"
    try:
        has_records = jsonl.stat().st_size > 0
    except OSError:
        has_records = False
    if has_records:
        found = read(jsonl)
        if found is not None:
            return found
    if log_path is None:
        return None
    text = _read_log(Path(log_path))
    return from_trainer_log(text) if text else None


#: a log larger than this is read as its head (where the training bar starts) and its tail
_LOG_WHOLE = 16 << 20
_LOG_HEAD = 2 << 20
_LOG_TAIL = 8 << 20


def _read_log(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size <= _LOG_WHOLE:
                data = f.read()
            else:
                head = f.read(_LOG_HEAD)
                f.seek(size - _LOG_TAIL)
                data = head + b"\n" + f.read(_LOG_TAIL)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")
