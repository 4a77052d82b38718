"""hpcjobs support for your own HF ``Trainer`` / TRL script (a ``script`` stage): one line.

::

    from hpcjobs.train.callbacks import HpcjobsCallback, resume_checkpoint

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[HpcjobsCallback()])
    trainer.train(resume_from_checkpoint=resume_checkpoint(args.output_dir))
    trainer.save_model()          # not reached when the job was preempted (the process exited 75)

What :class:`HpcjobsCallback` does, on every rank:

* **Progress** (world rank 0): appends to ``$HPCJOBS_PROGRESS_FILE`` what ``hpcjobs
  watch`` reads (:mod:`hpcjobs.progress`), in the finetune stage's format: one
  ``{"time", "step", "max_steps", "epoch", "loss", "learning_rate", "grad_norm",
  "samples_per_second"}`` line per training log, ``{"step", "max_steps", "epoch",
  "eval_loss"}`` per evaluation, and event lines ``{"event": "start", "step",
  "max_steps", "world_size", "global_batch_size", "resumed_from", "hostname"}``,
  ``{"event": "checkpoint", "step", "path"}``, ``{"event": "preempted", "step",
  "max_steps", "checkpoint"}`` and ``{"event": "end", "step", "max_steps", ...the
  Trainer's train_* metrics}``.
* **Preemption**: Slurm's time-limit warning reaches the ranks as SIGUSR2, and the job
  script touches ``$HPCJOBS_PREEMPT_FILE`` (for ranks that were not listening yet). The
  callback catches SIGUSR2 (installed when this module is imported inside an hpcjobs
  job, so as early as your imports) and looks for the file (at most once a second). At
  each optimizer step end the flag is all-reduced (MAX) across ranks, so a warning seen
  by any rank stops every rank at the same step: ``control.should_save`` and
  ``control.should_training_stop`` are set, the Trainer writes ``checkpoint-<step>``
  (model, optimizer, scheduler, RNG, DeepSpeed engine state, ``trainer_state.json``) and
  calls every callback's ``on_save``, then leaves the step loop and calls
  ``on_epoch_end``. There every rank waits for the others (a barrier: a launcher kills
  the other ranks as soon as one exits non-zero, and they must have finished writing),
  rank 0 writes the ``preempted`` event, the process group is destroyed and the process
  exits with code **75** (``sys.exit``: ``finally`` blocks run, the code after
  ``trainer.train()`` does not). The job is requeued, or you run ``hpcjobs
  rerun``, and :func:`resume_checkpoint` gives the next run that checkpoint.

  With ``HpcjobsCallback(exit_on_preempt=False)`` ``trainer.train()`` returns normally
  after that checkpoint instead; call :func:`exit_if_preempted` right after it (before
  saving the final model or evaluating).
* **Curves**: a ``script`` stage exports ``HPCJOBS_TENSORBOARD_DIR``
  (``<run dir>/tensorboard/<stage>/attempt-<n>``, the finetune stage's layout) and
  ``TENSORBOARD_LOGGING_DIR`` (the same, unless you set it), which the Trainer's TensorBoard
  integration reads: ``report_to="tensorboard"`` in your script is all it takes. At the start
  of training rank 0 prints where the curves go (``curves: tensorboard --logdir ...``).
* **Measured memory**: each rank's peak (``torch.cuda.max_memory_allocated/reserved``, its
  model-state tensor bytes, its peak RSS; :mod:`hpcjobs.train.memory`) is gathered to rank 0,
  which writes ``$HPCJOBS_ATTEMPT_DIR/memory_measured.json`` at the end of training and at a
  time-limit checkpoint (a collective at those two points, on every rank).
* Outside hpcjobs (no ``HPCJOBS_*`` variables) it writes no file, installs no signal
  handler (unless ``handle_signal=True``), never stops training and does no per-step
  collective.

Only the training loop is covered: a warning during evaluation or model saving after
``trainer.train()`` is acted on by nobody, and the job then ends at its time limit.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

# the pieces every job module shares (importing them loads no torch)
from hpcjobs.train import memory
from hpcjobs.train.runtime import (EXIT_PREEMPTED, PreemptFlag, ProgressWriter, any_rank, barrier, curves_lines,
                                   finite, log_record, save_and_stop)

LOG_PREFIX = "[hpcjobs]"
ENV_PROGRESS = "HPCJOBS_PROGRESS_FILE"
ENV_PREEMPT = "HPCJOBS_PREEMPT_FILE"
ENV_ATTEMPT = "HPCJOBS_ATTEMPT_DIR"

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

#: The preemption flag of this process (one per process: a signal handler is process-wide).
_FLAG = PreemptFlag()
_handler_installed = False
_last_resume: Optional[str] = None  # what resume_checkpoint() last returned (for the start event)
_preempted = False


def _log(msg: str) -> None:
    # one write per line (several ranks share the job's log)
    sys.stdout.write(f"{LOG_PREFIX} {msg}\n")
    sys.stdout.flush()


def _in_hpcjobs_job() -> bool:
    return bool(os.environ.get(ENV_PREEMPT) or os.environ.get(ENV_ATTEMPT))


def install_signal_handler(signum: int = signal.SIGUSR2) -> bool:
    """Make ``signum`` (SIGUSR2) request preemption in this process; a handler installed
    before (not SIG_DFL/SIG_IGN) is still called after ours. Idempotent. Returns False
    where handlers cannot be installed (not the main thread)."""
    global _handler_installed
    if _handler_installed:
        return True
    try:
        previous = signal.getsignal(signum)
    except ValueError:  # pragma: no cover - invalid signal on this platform
        return False

    def handler(sig, frame):
        # no I/O here: a write interrupted by the signal would be re-entered
        if not _FLAG.signalled:
            _FLAG.signalled = True
            _FLAG.signal_time = time.time()
        if callable(previous):
            previous(sig, frame)

    try:
        signal.signal(signum, handler)
        # restart interrupted system calls (e.g. inside a gloo/NCCL collective)
        signal.siginterrupt(signum, False)
    except ValueError:  # not the main thread
        return False
    _handler_installed = True
    return True


def preempt_requested() -> bool:
    """True once this process got SIGUSR2 or ``$HPCJOBS_PREEMPT_FILE`` exists (this rank only)."""
    if not _FLAG.signalled and _FLAG.file and os.path.exists(_FLAG.file):
        _FLAG.signalled = True
        _FLAG.signal_time = time.time()
    return _FLAG.signalled


def preempted() -> bool:
    """True once HpcjobsCallback stopped training for a preemption (after its checkpoint)."""
    return _preempted


def exit_if_preempted(code: int = EXIT_PREEMPTED) -> None:
    """Exit with ``code`` (75) if training was stopped for a preemption; call it right after
    ``trainer.train()`` when the callback was built with ``exit_on_preempt=False``."""
    if _preempted:
        _exit(code)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort at exit
        pass
    sys.exit(code)


def resume_checkpoint(output_dir: str | os.PathLike) -> Optional[str]:
    """The latest complete ``output_dir/checkpoint-N`` (one holding trainer_state.json, which
    the Trainer writes last) or None: for ``trainer.train(resume_from_checkpoint=...)``.
    A checkpoint cut short by the time limit (no trainer_state.json) is passed over."""
    global _last_resume
    d = Path(output_dir)
    found = []
    try:
        entries = list(d.iterdir())
    except OSError:
        entries = []
    for c in entries:
        m = _CHECKPOINT.match(c.name)
        if m and c.is_dir():
            found.append((int(m.group(1)), c))
    result = None
    for _, c in sorted(found, reverse=True):
        if (c / "trainer_state.json").is_file():
            result = str(c)
            break
        _log(f"skipping incomplete checkpoint {c} (no trainer_state.json)")
    _last_resume = result
    return result


# Inside an hpcjobs job, listen for SIGUSR2 from the moment this module is imported: before
# transformers (slow to import) and before the model loads. The launchers start the ranks
# with SIGUSR2 ignored, so a warning that arrives earlier does not kill them, and the flag
# file covers it.
if _in_hpcjobs_job():
    _FLAG.file = os.environ.get(ENV_PREEMPT) or None
    install_signal_handler()

from transformers import TrainerCallback  # noqa: E402


class HpcjobsCallback(TrainerCallback):
    """Progress for ``hpcjobs watch`` and checkpoint-and-exit-75 on Slurm's time-limit warning.

    ``progress_file`` / ``preempt_file`` default to ``$HPCJOBS_PROGRESS_FILE`` /
    ``$HPCJOBS_PREEMPT_FILE`` (unset: no progress file / no flag file). ``handle_signal``:
    catch SIGUSR2 (default: inside an hpcjobs job only). ``exit_on_preempt``: exit the
    process with ``exit_code`` once the preemption checkpoint is saved (default), else
    return from ``trainer.train()`` (then call :func:`exit_if_preempted`).
    """

    def __init__(
        self,
        progress_file: Optional[str] = None,
        preempt_file: Optional[str] = None,
        *,
        handle_signal: Optional[bool] = None,
        exit_on_preempt: bool = True,
        exit_code: int = EXIT_PREEMPTED,
        poll_interval: float = 1.0,
    ) -> None:
        env = os.environ
        self.progress_file = progress_file if progress_file is not None else (env.get(ENV_PROGRESS) or None)
        self.preempt_file = preempt_file if preempt_file is not None else (env.get(ENV_PREEMPT) or None)
        if self.preempt_file:
            _FLAG.file = self.preempt_file
        if handle_signal is None:
            handle_signal = _in_hpcjobs_job()
        handled = install_signal_handler() if handle_signal else False
        # nothing can ask this process to stop: no per-step check (the environment, and so
        # this, is the same on every rank)
        self._watching = bool(self.preempt_file) or handled or _handler_installed
        self.exit_on_preempt = exit_on_preempt
        self.exit_code = exit_code
        self.poll_interval = poll_interval
        self.stopped_at: Optional[int] = None  # the step training stopped at for a preemption
        self.checkpoint: Optional[str] = None   # the checkpoint saved for it
        self._stopped = False
        self._progress = ProgressWriter(None, False)
        self._last_poll = 0.0
        self._last_time = time.time()
        self._last_step = 0
        self._global_batch = 0
        self._summary: dict[str, Any] = {}
        self._memory = memory.MemoryProbe()
        self._rank = 0

    # ---- helpers

    def _local_request(self) -> bool:
        if _FLAG.signalled:
            return True
        now = time.monotonic()
        if now - self._last_poll < self.poll_interval:
            return False
        self._last_poll = now
        return preempt_requested()

    # ---- TrainerCallback

    def _write_memory(self) -> None:
        """Every rank's measured memory to rank 0's memory_measured.json (a collective; the
        environment, and so whether it runs, is the same on every rank)."""
        adir = os.environ.get(ENV_ATTEMPT)
        if adir:
            memory.gather_and_write(os.path.join(adir, memory.FILE), self._memory.record(self._rank))

    def on_train_begin(self, args, state, control, **kw):
        self._memory.attach(kw.get("model"), kw.get("optimizer"))
        self._rank = int(getattr(args, "process_index", 0) or 0)
        if state.is_world_process_zero and _in_hpcjobs_job():
            report = [r for r in (getattr(args, "report_to", None) or []) if r != "none"]
            for line in curves_lines(report, os.environ.get("TENSORBOARD_LOGGING_DIR")
                                     or os.path.join(args.output_dir, "runs")):
                _log(line)
        self._progress = ProgressWriter(self.progress_file, bool(self.progress_file) and state.is_world_process_zero)
        self._last_time = time.time()
        self._last_step = state.global_step
        self._summary = {}
        world = max(1, int(getattr(args, "world_size", 1) or 1))
        self._global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        resumed = None
        if state.global_step:
            if _last_resume and _last_resume.endswith(f"checkpoint-{state.global_step}"):
                resumed = os.path.abspath(_last_resume)
            else:
                guess = os.path.abspath(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
                resumed = guess if os.path.isdir(guess) else None
        self._progress.event(
            "start",
            step=state.global_step,
            max_steps=state.max_steps,
            world_size=world,
            global_batch_size=self._global_batch,
            resumed_from=resumed,
            hostname=socket.gethostname(),
        )

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or not state.is_world_process_zero:
            return
        if "loss" in logs:
            now = time.time()
            rec = log_record(state, logs, self._global_batch, self._last_step, self._last_time, now)
            self._last_time, self._last_step = now, state.global_step
            self._progress.write(rec)
        elif "eval_loss" in logs:
            self._progress.write({"step": state.global_step, "max_steps": state.max_steps,
                                  "epoch": finite(state.epoch), "eval_loss": finite(logs["eval_loss"])})
        elif "train_runtime" in logs:
            self._summary = {k: finite(v) for k, v in logs.items() if finite(v) is not None}

    def on_step_end(self, args, state, control, **kw):
        # a collective on every rank at every optimizer step: all ranks stop at the same step
        if self._watching and any_rank(self._local_request(), args.device):
            if self.stopped_at is None and state.is_world_process_zero:
                how = "on this rank" if _FLAG.signalled else "on another rank"
                _log(f"time-limit warning (SIGUSR2 or {_FLAG.file or 'no flag file'}) {how}: saving a checkpoint "
                     f"at step {state.global_step} and stopping")
            self.stopped_at = state.global_step
            save_and_stop(control)
        return control

    def on_save(self, args, state, control, **kw):
        path = os.path.abspath(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        self._progress.event("checkpoint", step=state.global_step, path=path)
        if self.stopped_at is not None and state.global_step == self.stopped_at:
            self.checkpoint = path

    def on_epoch_end(self, args, state, control, **kw):
        # The first event after the stopping step's save: every callback's on_save has run
        # (one that copies checkpoints elsewhere, say), and nothing else has happened yet.
        if self.stopped_at is not None and not self._stopped:
            self._stop_for_preemption(state)

    def on_train_end(self, args, state, control, **kw):
        if self.stopped_at is not None:
            if not self._stopped:  # not reached: the Trainer calls on_epoch_end first
                self._stop_for_preemption(state)
            return
        self._write_memory()
        self._progress.event("end", **{**self._summary, "step": state.global_step, "max_steps": state.max_steps})

    def _stop_for_preemption(self, state) -> None:
        global _preempted
        self._stopped = True
        barrier()  # every rank has written its part of the checkpoint
        self._write_memory()
        path = self.checkpoint  # None: some other callback cancelled the save
        _preempted = True
        self._progress.event("preempted", step=state.global_step, max_steps=state.max_steps, checkpoint=path)
        if state.is_world_process_zero:
            _log((f"preempted: checkpoint {path} saved at step {state.global_step}" if path else
                  f"preempted at step {state.global_step}, but no checkpoint was saved")
                 + (f"; exiting with {self.exit_code}" if self.exit_on_preempt else ""))
        if self.exit_on_preempt:
            _exit(self.exit_code)
