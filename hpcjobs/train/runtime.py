"""What every training job module shares at run time (finetune, grpo, pretrain, and
:mod:`hpcjobs.train.callbacks` in your own script): ranks and environment, the time-limit
flag, progress.jsonl, checkpoints to resume from, the tokenizer's padding.

Importing it loads no torch; the functions that need torch or transformers import them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hpcjobs.errors import HpcjobsError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" -> requeue / resubmit with resume=auto


# ----------------------------------------------------------------------------
# environment and ranks
# ----------------------------------------------------------------------------


def rank_info() -> dict[str, int]:
    env = os.environ
    return {
        "rank": int(env.get("RANK", "0")),
        "world_size": int(env.get("WORLD_SIZE", "1")),
        "local_rank": int(env.get("LOCAL_RANK", "0")),
        "local_size": int(env.get("LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", "1"))),
        "node_rank": int(env.get("CROSS_RANK", env.get("GROUP_RANK", "0"))),
    }


def resolve_device(requested: str | None) -> str:
    if requested:
        return requested
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover
        return "cpu"


def setup_environment(device: str, local_size: int = 1) -> None:
    """Environment that must be in place before torch/deepspeed initialise.

    Values already set by the job script win (setdefault).
    """
    env = os.environ
    if device == "cpu":
        # DeepSpeed otherwise probes CUDA and warns; with this set it uses its
        # CPU accelerator (gloo / shm comm) straight away.
        env.setdefault("DS_ACCELERATOR", "cpu")
        if "OMP_NUM_THREADS" not in env:
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - non-Linux
                cores = os.cpu_count() or 1
            env["OMP_NUM_THREADS"] = str(max(1, cores // max(1, local_size)))
            if "torch" in sys.modules:  # already imported: its pool may be sized
                sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
    # DeepSpeed JIT-compiles small C++ ops on first use (~25 s each on CPU);
    # keep the build cache in a persistent place so later runs reuse it.
    # keyed by environment, as hpcjobs.paths.python_env_id explains.
    from hpcjobs.paths import python_env_id

    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / python_env_id()))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


# What each integration reads to decide where its curves go (shown in the first log lines;
# secrets such as WANDB_API_KEY are never printed).
_WHERE_ENV = {"wandb": ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"),
              "mlflow": ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}


def curves_lines(report_to: list[str], tensorboard_dir: str | None) -> list[str]:
    """"curves: ..." lines naming where each reporting integration writes."""
    import re
    import shlex

    if not report_to:
        return ["curves: report_to is empty: none besides progress.jsonl"]
    lines = []
    for name in report_to:
        if name == "tensorboard" and tensorboard_dir:
            tb = Path(tensorboard_dir)
            if tb.name.startswith("attempt-") and tb.parent.parent.name == "tensorboard":  # hpcjobs' layout
                lines.append(f"curves: tensorboard --logdir {shlex.quote(str(tb.parent.parent))} "
                             f"(this run: {tb.parent.name}/{tb.name})")
            else:
                lines.append(f"curves: tensorboard --logdir {shlex.quote(str(tb))}")
            continue
        env = [f"{k}={re.sub(r'//[^/@]*@', '//', os.environ[k])}" for k in _WHERE_ENV.get(name, ())
               if os.environ.get(k)]
        lines.append(f"curves: {name}" + (f" ({' '.join(env)})" if env else ""))
    return lines


_prefix = ["[hpcjobs]"]


def set_log_prefix(prefix: str) -> None:
    """The prefix of this process's lines (one job module runs per process: its main sets it)."""
    _prefix[0] = prefix


def log(msg: str) -> None:
    # One write per line: several ranks share the job's log, and print() under
    # PYTHONUNBUFFERED writes the text and the newline separately, so lines interleave.
    sys.stdout.write(f"{_prefix[0]} {msg}\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------
# preemption
# ----------------------------------------------------------------------------


class PreemptFlag:
    """Set by SIGUSR2 (Slurm's warning before the time limit)."""

    def __init__(self) -> None:
        self.signalled = False
        self.signal_time: float | None = None
        # The batch script also touches this file when it gets the warning: a signal that
        # arrives before this rank has started (during imports or model loading) still counts.
        self.file: str | None = None

    def requested(self) -> bool:
        if not self.signalled and self.file and os.path.exists(self.file):
            self.signalled = True
            self.signal_time = time.time()
            log(f"found {self.file}: will checkpoint and stop after the current step")
        return self.signalled

    def install(self, signum: int = signal.SIGUSR2) -> "PreemptFlag":
        def handler(sig, frame):  # noqa: ARG001
            if not self.signalled:
                self.signalled = True
                self.signal_time = time.time()
                log(f"received signal {sig}: will checkpoint and stop after the current step")

        signal.signal(signum, handler)
        # restart interrupted system calls (e.g. inside a gloo/NCCL collective)
        signal.siginterrupt(signum, False)
        return self


def any_rank(flag: bool, device: Any) -> bool:
    """True if ``flag`` is true on any rank (collective when distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------
# progress file
# ----------------------------------------------------------------------------


class ProgressWriter:
    """Appends JSON lines to the progress file (rank 0 only); flushed per line."""

    def __init__(self, path: str | None, enabled: bool) -> None:
        self.path = path if enabled else None
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.path:
            return
        record = {"time": round(time.time(), 3), **record}
        line = json.dumps(record, default=_json_default)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def event(self, name: str, **fields: Any) -> None:
        self.write({"event": name, **fields})


def _json_default(o: Any) -> Any:
    try:
        return float(o)
    except Exception:
        return str(o)


def finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def save_and_stop(control) -> None:
    """The time-limit warning: checkpoint at this step, skip evaluation, stop training."""
    control.should_save = True
    control.should_log = True
    control.should_evaluate = False
    control.should_training_stop = True


def log_record(state, logs: dict, global_batch: int, last_step: int, last_time: float, now: float) -> dict:
    """One progress.jsonl line for a Trainer log with a loss (shared with hpcjobs.train.callbacks)."""
    rec: dict[str, Any] = {
        "step": state.global_step,
        "max_steps": state.max_steps,
        "epoch": finite(state.epoch),
        "loss": finite(logs.get("loss")),
        "learning_rate": finite(logs.get("learning_rate")),
    }
    if logs.get("grad_norm") is not None:
        rec["grad_norm"] = finite(logs["grad_norm"])
    steps = state.global_step - last_step
    if steps > 0 and now > last_time:
        rec["samples_per_second"] = round(steps * global_batch / (now - last_time), 3)
    return rec


# ----------------------------------------------------------------------------
# checkpoints and model loading
# ----------------------------------------------------------------------------


def find_resume_checkpoint(checkpoint_dir: str, resume: str, *, deepspeed: bool) -> str | None:
    """Latest complete ``checkpoint-N`` (has trainer_state.json; with DeepSpeed
    also its engine state) or None. ``resume`` may also name a checkpoint."""
    if resume == "never":
        return None
    if resume != "auto":
        if not Path(resume, "trainer_state.json").is_file():
            raise HpcjobsError(f"{resume}: not a complete Trainer checkpoint (no trainer_state.json)")
        return resume
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = []
    for c in d.iterdir():
        if c.is_dir() and c.name.startswith("checkpoint-") and c.name[len("checkpoint-"):].isdigit():
            found.append((int(c.name[len("checkpoint-"):]), c))
    for step, c in sorted(found, reverse=True):
        complete = (c / "trainer_state.json").is_file()
        if complete and deepspeed:
            complete = (c / "latest").is_file() or any(c.glob("global_step*"))
        if complete:
            return str(c)
        log(f"warning: skipping incomplete checkpoint {c}")
    return None


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = "right"
    return tok


def checkpointing_field(args_cls) -> str:
    """transformers 5.2x renamed gradient_checkpointing -> activation_checkpointing."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
