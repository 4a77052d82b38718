"""LoRA or full finetuning (TRL SFTTrainer for a causal LM; the Trainer or Seq2SeqTrainer for the
classification and seq2seq tasks of :mod:`hpcjobs.train.tasks`; optionally DeepSpeed ZeRO)
inside a Slurm job.

Launched once per rank, normally by DeepSpeed's launcher::

    deepspeed --no_ssh --node_rank=R --hostfile H --master_addr A --master_port P \\
        --module hpcjobs.train.finetune --config train.json

(``python -m hpcjobs.train.finetune --config train.json`` also works for a
single process, and ``torchrun``-style RANK/WORLD_SIZE environments work as
plain DDP when ``deepspeed_config`` is null.)

train.json (written by the render step; relative paths are taken relative to
the directory of train.json)::

    task              "causal-lm" (default) | "classification" | "seq2seq" (needs ``prepared``
                      of the same task)
    model_path        HF model directory (the adapter records its absolute path)
    output_dir        where rank 0 saves the final adapter (+ tokenizer)
    checkpoint_dir    Trainer checkpoints (checkpoint-<global step>/)
    progress_file     JSON lines for `hpcjobs watch` (rank 0 appends); optional
    tensorboard_dir   where TensorBoard event files go (train.report_to has tensorboard); optional
    memory_file       memory_measured.json, the measured memory of every rank
                      (hpcjobs.train.memory); optional
    deepspeed_config  ds_config.json path or null (plain DDP / single process)
    resume            "auto" (latest complete checkpoint-* if any) | "never" | a checkpoint path
    device            "cuda" | "cpu" (default: cuda when available)
    data              {path, columns, template, split, seed}  -- see hpcjobs.train.data
    prepared          a prepare stage's output (hpcjobs.train.prepare), loaded instead of
                      tokenizing ``data`` on every rank; padded by DataCollatorForSeq2Seq
    lora              {r, alpha, dropout, target_modules, bias, enabled (false: full finetune)}
    train             {micro_batch_size, gradient_accumulation_steps, learning_rate,
                       max_steps, num_train_epochs, warmup_steps, lr_scheduler_type,
                       max_seq_length, gradient_checkpointing, precision (bf16|fp16|fp32),
                       max_grad_norm, logging_steps, save_steps, save_total_limit,
                       eval_steps, seed, optim, packing (default false: pack the prepared
                       train examples into rows, hpcjobs.train.packing; needs ``prepared``),
                       eval_batch_size (default micro_batch_size),
                       report_to (the Trainer's integrations, a list; default []),
                       best_metric (evaluate, checkpoint at each evaluation, keep the
                       save_total_limit best by eval_<metric> and the latest, load the best
                       at the end; null: checkpoints every save_steps)}

Preemption: SIGUSR2 on any rank makes every rank stop after the current
optimizer step (the flag is all-reduced at each step end), save a checkpoint,
skip the final adapter, and exit with code 75 (EX_TEMPFAIL). A rerun with
``resume: auto`` continues from that global step. DeepSpeed's runner and
launch.py do not handle SIGUSR2 (its default action kills them), so when the
job script signals whole process groups it must start them with SIGUSR2
ignored, e.g. ``bash -c "trap '' USR2; exec deepspeed ..."``: the ignored
disposition is inherited through exec/fork, and each rank installs its own
handler first thing.

Exit codes: 0 done (adapter saved), 75 preempted (checkpoint saved),
2 user error (bad config/data/model path; message printed), 1 crash.
With ``resume: auto``, a checkpoint directory without trainer_state.json (a
save cut short) is skipped in favour of the previous one.

Tokenizer padding: Llama has no pad token; we use ``unk`` (``eos`` when the
tokenizer has no unk) with right padding. Padded label positions are masked
with -100 by TRL's collator, and the pad id differs from eos, so the
end-of-sequence token appended by TRL is still learned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hpcjobs.errors import HpcjobsError
from hpcjobs.train.runtime import (EXIT_PREEMPTED, PreemptFlag, ProgressWriter, any_rank, barrier,
                                   checkpointing_field, curves_lines, find_resume_checkpoint, finite,
                                   load_tokenizer, log, log_record, rank_info, resolve_device, save_and_stop,
                                   set_log_prefix, setup_environment, torch_dtype)

LOG_PREFIX = "[hpcjobs.finetune]"

TRAIN_DEFAULTS: dict[str, Any] = {
    "micro_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-3,
    "max_steps": -1,
    "num_train_epochs": 1,
    "warmup_steps": 0,
    "lr_scheduler_type": "cosine",
    "max_seq_length": 512,
    "gradient_checkpointing": True,
    "precision": "bf16",
    "max_grad_norm": 0.3,
    "logging_steps": 10,
    "save_steps": 100,
    "save_total_limit": 2,
    "eval_steps": None,
    "seed": 42,
    "optim": "adamw_torch",
    "packing": False,
    "eval_batch_size": None,
    "report_to": [],
}
LORA_DEFAULTS: dict[str, Any] = {
    "r": 8,
    "alpha": 8,
    "dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
}
PRECISIONS = ("bf16", "fp16", "fp32")


# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------


def load_train_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read train.json, fill defaults, make paths absolute (relative to its directory)."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise HpcjobsError(f"{p}: train config not found") from None
    except json.JSONDecodeError as e:
        raise HpcjobsError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise HpcjobsError(f"{p}: train config must be a JSON object")
    base = p.resolve().parent

    def absolute(key: str, value: Any) -> str | None:
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            raise HpcjobsError(f"{p}: {key}: expected a path string, got {value!r}")
        v = Path(os.path.expanduser(value))
        return str(v if v.is_absolute() else (base / v).resolve())

    cfg: dict[str, Any] = dict(raw)
    for key in ("model_path", "output_dir"):
        if not raw.get(key):
            raise HpcjobsError(f"{p}: {key}: required")
    cfg["model_path"] = absolute("model_path", raw["model_path"])
    cfg["output_dir"] = absolute("output_dir", raw["output_dir"])
    cfg["checkpoint_dir"] = absolute("checkpoint_dir", raw.get("checkpoint_dir")) or str(
        Path(cfg["output_dir"]).parent / "checkpoints"
    )
    cfg["progress_file"] = absolute("progress_file", raw.get("progress_file"))
    cfg["tensorboard_dir"] = absolute("tensorboard_dir", raw.get("tensorboard_dir"))
    cfg["memory_file"] = absolute("memory_file", raw.get("memory_file"))
    cfg["deepspeed_config"] = absolute("deepspeed_config", raw.get("deepspeed_config"))

    resume = raw.get("resume", "auto")
    if resume in (None, False):
        resume = "never"
    if resume not in ("auto", "never"):
        resume = absolute("resume", resume)
    cfg["resume"] = resume

    device = raw.get("device")
    if device not in (None, "cuda", "cpu"):
        raise HpcjobsError(f"{p}: device: expected 'cuda' or 'cpu', got {device!r}")
    cfg["device"] = device
    # Ranks the job was planned for (hpcjobs writes it; the DeepSpeed batch size depends on it).
    cfg["world_size"] = raw.get("world_size")
    cfg["preempt_file"] = absolute("preempt_file", raw.get("preempt_file"))

    data = dict(raw.get("data") or {})
    if not data.get("path"):
        raise HpcjobsError(f"{p}: data.path: required")
    data["path"] = absolute("data.path", data["path"])
    cfg["data"] = data
    # A prepare stage's output: loaded instead of tokenizing data.* on every rank.
    cfg["prepared"] = absolute("prepared", raw.get("prepared"))

    lora = {**LORA_DEFAULTS, **(raw.get("lora") or {})}
    cfg["lora"] = lora

    train = {**TRAIN_DEFAULTS, **(raw.get("train") or {})}
    if train["precision"] not in PRECISIONS:
        raise HpcjobsError(f"{p}: train.precision: expected one of {', '.join(PRECISIONS)}, got {train['precision']!r}")
    if train["max_steps"] is None:
        train["max_steps"] = -1
    for key in ("micro_batch_size", "gradient_accumulation_steps", "max_seq_length"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise HpcjobsError(f"{p}: train.{key}: expected a positive integer, got {train[key]!r}")
    report = train["report_to"]
    if isinstance(report, str):
        report = [report]
    if not isinstance(report, list) or not all(isinstance(r, str) for r in report):
        raise HpcjobsError(f"{p}: train.report_to: expected a list of integration names, got {report!r}")
    train["report_to"] = [r for r in report if r != "none"]
    cfg["train"] = train
    return cfg


# ----------------------------------------------------------------------------
# environment and ranks
# ----------------------------------------------------------------------------


def _engine_summary(optimizer: Any) -> str:
    """What DeepSpeed really runs (its own logger is quiet under the HF Trainer): the ZeRO
    optimizer class and offload devices, read from the live optimizer, not the config file."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps DeepSpeed's optimizer
    if inner is None or "deepspeed" not in type(inner).__module__:
        return ""
    parts = [f"optimizer={type(inner).__name__}"]
    for attr, label in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_param"),
                        ("cpu_offload", "offload_optimizer")):
        value = getattr(inner, attr, None)
        if value is not None and not any(p.startswith(label + "=") for p in parts):
            parts.append(f"{label}={'cpu' if value else 'none'}")
    return " ".join(parts)


def make_callbacks(progress: ProgressWriter, preempt: PreemptFlag, global_batch: int, info: dict):
    """Build the TrainerCallbacks (imported lazily: transformers is heavy)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Rank 0: progress.jsonl lines and concise step/loss/lr lines on stdout."""

        def __init__(self) -> None:
            self.last_time = time.time()
            self.last_step = 0
            self.summary: dict[str, Any] = {}

        def on_train_begin(self, args, state, control, **kw):
            self.last_time = time.time()
            self.last_step = state.global_step
            if state.is_world_process_zero:
                progress.event(
                    "start",
                    step=state.global_step,
                    max_steps=state.max_steps,
                    world_size=info["world_size"],
                    global_batch_size=global_batch,
                    resumed_from=info.get("resumed_from"),
                    hostname=socket.gethostname(),
                    **({"packing": info["packing"]} if info.get("packing") else {}),
                )
                log(
                    f"training: step {state.global_step}/{state.max_steps} world_size={info['world_size']} "
                    f"global_batch={global_batch}"
                    + (f" resumed_from={info['resumed_from']}" if info.get("resumed_from") else "")
                )
                engine = _engine_summary(kw.get("optimizer"))
                if engine:
                    log(f"deepspeed engine: {engine}")

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now = time.time()
            if "loss" in logs:
                rec = log_record(state, logs, global_batch, self.last_step, self.last_time, now)
                self.last_time, self.last_step = now, state.global_step
                progress.write(rec)
                log(
                    f"step {state.global_step}/{state.max_steps} loss={rec['loss']:.4f} "
                    f"lr={rec['learning_rate'] or 0:.3e} epoch={rec['epoch'] or 0:.3f}"
                    + (f" samples/s={rec['samples_per_second']}" if "samples_per_second" in rec else "")
                )
            elif "eval_loss" in logs:
                rec = {
                    "step": state.global_step,
                    "max_steps": state.max_steps,
                    "epoch": finite(state.epoch),
                    "eval_loss": finite(logs["eval_loss"]),
                }
                # the task's metrics too (eval_accuracy, eval_f1, eval_rouge1, ...), not the timings
                rec.update({k: finite(v) for k, v in logs.items() if k.startswith("eval_") and k not in rec
                            and not k.endswith(("_runtime", "_per_second")) and finite(v) is not None})
                progress.write(rec)
                log(f"eval step {state.global_step}: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else
                                                                   f"{k}={v}" for k, v in rec.items()
                                                                   if k.startswith("eval_")))
            elif "train_runtime" in logs:
                self.summary = {k: finite(v) for k, v in logs.items() if finite(v) is not None}

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                progress.event("checkpoint", step=state.global_step, path=path)
                log(f"checkpoint saved: {path}")

    class PreemptCallback(TrainerCallback):
        """All ranks: on SIGUSR2 (any rank) save a checkpoint and stop at this step end."""

        def __init__(self) -> None:
            self.stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kw):
            if any_rank(preempt.requested(), args.device):
                self.stopped_at = state.global_step
                save_and_stop(control)
            return control

    return ProgressCallback(), PreemptCallback()


# ----------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------


def fix_adapter_config(adapter_dir: str, base_model_path: str) -> None:
    """Make sure adapter_config.json records the absolute base model path."""
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    want = str(Path(base_model_path).resolve())
    if cfg.get("base_model_name_or_path") != want:
        cfg["base_model_name_or_path"] = want
        tmp = cfg_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        os.replace(tmp, cfg_path)


# ----------------------------------------------------------------------------
# model / tokenizer
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m hpcjobs.train.finetune", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="train.json")
    # added by the DeepSpeed launcher; LOCAL_RANK in the environment is what we use
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # first thing: SIGUSR2 must never kill a rank, even during the imports
    preempt = PreemptFlag().install()
    set_log_prefix(LOG_PREFIX)
    args = parse_args(argv)
    info: dict[str, Any] = rank_info()
    progress = ProgressWriter(None, False)
    try:
        cfg = load_train_config(args.config)
        device = resolve_device(cfg["device"])
        setup_environment(device, info["local_size"])
        log(
            f"rank={info['rank']} world_size={info['world_size']} local_rank={info['local_rank']} "
            f"node_rank={info['node_rank']} hostname={socket.gethostname()} pid={os.getpid()} device={device} "
            f"visible_devices={os.environ.get('CUDA_VISIBLE_DEVICES', '-')} "
            f"deepspeed={'yes' if cfg['deepspeed_config'] else 'no'}"
        )
        progress = ProgressWriter(cfg["progress_file"], info["rank"] == 0)
        if info["rank"] == 0:
            for line in curves_lines(cfg["train"]["report_to"], cfg["tensorboard_dir"]):
                log(line)
        preempt.file = cfg.get("preempt_file")
        planned = cfg.get("world_size")
        if planned and planned != info["world_size"]:
            # The DeepSpeed config's train_batch_size was computed for the planned world size.
            raise HpcjobsError(f"the launcher started {info['world_size']} ranks but this job was planned, "
                               f"and its DeepSpeed batch size computed, for {planned}")
        return run(cfg, device, info, preempt, progress)
    except HpcjobsError as e:
        log(f"error: {e}")
        progress.event("error", message=str(e))
        return 2
    except Exception as e:
        traceback.print_exc()
        progress.event("error", message=f"{type(e).__name__}: {e}")
        return 1


def run(cfg: dict, device: str, info: dict, preempt: PreemptFlag, progress: ProgressWriter) -> int:
    import warnings

    from hpcjobs.train.data import load_splits

    # known, harmless deprecation chatter from inside transformers/torch (x every rank)
    for pattern in (r".*is_gradient_checkpointing.*", r".*all_gather_into_tensor.*"):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)

    t = cfg["train"]
    use_cpu = device == "cpu"

    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    if info["rank"] != 0:
        transformers.utils.logging.disable_progress_bar()

    if use_cpu and t["precision"] == "fp16":
        raise HpcjobsError("train.precision fp16 is not supported on CPU; use fp32 (or bf16)")

    # inputs are checked before the distributed rendezvous, so a bad path or
    # column fails every rank at once instead of leaving peers waiting
    model_path = cfg["model_path"]
    if not Path(model_path, "config.json").is_file():
        raise HpcjobsError(f"{model_path}: not a Hugging Face model directory (no config.json)")
    from hpcjobs.train.tasks import task_module

    task = task_module(cfg.get("task"))   # None: causal-lm (SFTTrainer, below)
    prepared_info: dict[str, Any] = {}
    if cfg.get("prepared"):
        from hpcjobs.train.prepare import MODEL_COLUMNS, load_prepared, read_stats

        # Tokenized once by the prepare stage: memory-mapped Arrow files, no work per rank.
        splits = load_prepared(cfg["prepared"])
        prepared_info = read_stats(cfg["prepared"])
        if prepared_info.get("task", "causal-lm") != (cfg.get("task") or "causal-lm"):
            raise HpcjobsError(f"{cfg['prepared']} was prepared for task {prepared_info.get('task', 'causal-lm')}, "
                               f"this stage trains task {cfg.get('task') or 'causal-lm'}")
        columns = task.MODEL_COLUMNS if task is not None else MODEL_COLUMNS
        splits = {k: v.select_columns([c for c in columns if c in v.column_names]) for k, v in splits.items()}
        if info["rank"] == 0:
            log(f"data: loaded prepared dataset {cfg['prepared']} (train={len(splits['train'])} "
                f"eval={len(splits['eval'])} rows; no tokenization)")
        if t.get("packing"):
            from hpcjobs.train import packing

            examples = len(splits["train"])
            # every rank bins the same shuffled rows (seeded), so the ranks agree on the rows
            splits["train"] = packing.pack(splits["train"], int(t["max_seq_length"]), int(t["seed"]))
            splits["eval"] = packing.single(splits["eval"])   # the same collator evaluates
            info["packing"] = packing.stats(examples, splits["train"])
            if info["rank"] == 0:
                p = info["packing"]
                log(f"packing: {p['examples']} examples -> {p['rows']} rows of at most {t['max_seq_length']} "
                    f"tokens ({p['tokens']} tokens, rows {100 * p['fill']:.0f}% full)")
    else:
        if t.get("packing"):
            raise HpcjobsError("train.packing packs a prepare stage's examples; set prepared, or packing false")
        splits = load_splits(cfg["data"])
        if info["rank"] == 0:
            log(f"data: train={len(splits['train'])} test={len(splits['test'])} eval={len(splits['eval'])} rows")

    eval_steps = t.get("eval_steps")
    best = t.get("best_metric")
    report_eval = bool(eval_steps) or bool(best)
    tensorboard: dict[str, Any] = {}
    if "tensorboard" in t["report_to"] and cfg["tensorboard_dir"]:
        # transformers 5 dropped TrainingArguments.logging_dir: its TensorBoardCallback reads
        # this variable when the Trainer is built (4.x takes logging_dir). train.json decides,
        # so the "curves:" line is where they are.
        os.environ["TENSORBOARD_LOGGING_DIR"] = cfg["tensorboard_dir"]
        if "logging_dir" in {f.name for f in dataclasses.fields(SFTConfig)}:
            tensorboard["logging_dir"] = cfg["tensorboard_dir"]
    if best:
        # a checkpoint at every evaluation, the best loaded at the end; KeepBest prunes them
        # (the Trainer's own rotation keeps the newest, not the best)
        when = "steps" if eval_steps else "epoch"
        saving = dict(save_strategy=when, save_steps=eval_steps or t["save_steps"], save_total_limit=None,
                      eval_strategy=when, eval_steps=eval_steps, load_best_model_at_end=True,
                      metric_for_best_model=best, greater_is_better=best != "loss")
    else:
        saving = dict(save_strategy="steps", save_steps=t["save_steps"], save_total_limit=t["save_total_limit"],
                      eval_strategy="steps" if report_eval else "no", eval_steps=eval_steps if report_eval else None)
    common = dict(
        output_dir=cfg["checkpoint_dir"],
        per_device_train_batch_size=t["micro_batch_size"],
        per_device_eval_batch_size=t.get("eval_batch_size") or t["micro_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        learning_rate=float(t["learning_rate"]),
        max_steps=int(t["max_steps"]),
        num_train_epochs=float(t["num_train_epochs"]),
        warmup_steps=t["warmup_steps"] or 0,
        lr_scheduler_type=t["lr_scheduler_type"],
        include_num_input_tokens_seen="non_padding",  # real tokens, for throughput
        **{checkpointing_field(SFTConfig): bool(t["gradient_checkpointing"])},
        bf16=t["precision"] == "bf16",
        fp16=t["precision"] == "fp16",
        max_grad_norm=float(t["max_grad_norm"]),
        logging_steps=t["logging_steps"],
        logging_first_step=True,
        **saving,
        seed=int(t["seed"]),
        data_seed=int(t["seed"]),
        optim=t["optim"],
        deepspeed=cfg["deepspeed_config"],
        use_cpu=use_cpu,
        report_to=list(t["report_to"]) or "none",
        **tensorboard,
        disable_tqdm=True,
        log_level="warning",
        log_level_replica="warning",
        ddp_find_unused_parameters=False,
        save_only_model=False,
    )
    if task is not None:
        sft_args = task.training_args(common, {**t, **prepared_info})
    else:
        sft_args = SFTConfig(
            **common,
            max_length=t["max_seq_length"],
            packing=False,   # prepared examples are packed above (hpcjobs.train.packing), not by TRL
            dataset_text_field="text",
            # prepared: already tokenized, labelled and cut; SFTTrainer must not map over it again
            dataset_kwargs={"skip_prepare_dataset": True} if cfg.get("prepared") else None,
        )
    # TrainingArguments initialised torch.distributed (and DeepSpeed) by now
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if cfg["deepspeed_config"]:
            # With use_cpu accelerate sets up torch.distributed itself and never initialises
            # deepspeed.comm (it does so only on the GPU path). Under ZeRO-3, from_pretrained
            # below runs deepspeed.zero.Init, whose DeepSpeedConfig then sees no backend, takes
            # world_size=1 and fails the batch check ("4 != 2 * 1 * 1"). Wrapping the existing
            # process group (no new rendezvous) is what deepspeed.initialize does later anyway.
            import deepspeed.comm as ds_comm

            if not ds_comm.is_initialized():
                ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        log(
            f"distributed: rank={dist.get_rank()} world_size={dist.get_world_size()} "
            f"backend={dist.get_backend()} hostname={socket.gethostname()}"
        )
    info["world_size"] = sft_args.world_size
    global_batch = t["micro_batch_size"] * t["gradient_accumulation_steps"] * sft_args.world_size

    tokenizer = load_tokenizer(model_path)
    if task is not None:
        model = task.load_model(model_path, torch_dtype(t["precision"]), prepared_info)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(t["precision"]))
    model.config.use_cache = False

    lora = cfg["lora"]
    peft_config = LoraConfig(
        r=int(lora["r"]),
        lora_alpha=int(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        target_modules=list(lora["target_modules"]),
        bias=lora["bias"],
        task_type=task.PEFT_TASK_TYPE if task is not None else "CAUSAL_LM",
    ) if lora.get("enabled", True) else None  # None: full finetuning, the output is the whole model

    resume_from = find_resume_checkpoint(
        cfg["checkpoint_dir"], cfg["resume"], deepspeed=bool(cfg["deepspeed_config"])
    )
    info["resumed_from"] = resume_from
    progress_cb, preempt_cb = make_callbacks(progress, preempt, global_batch, info)
    from hpcjobs.train import memory

    probe = memory.MemoryProbe()
    callbacks = [progress_cb, preempt_cb, memory.probe_callback(probe)]
    if best:
        from hpcjobs.train.best import KeepBest

        callbacks.append(KeepBest(best, t["save_total_limit"]))
    evaluation = splits["eval"] if report_eval and len(splits["eval"]) else None
    if task is not None:
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = task.make_trainer(model, sft_args, splits["train"], evaluation, tokenizer, callbacks,
                                    prepared_info)
    else:
        trainer = SFTTrainer(
            model=model,
            args=sft_args,
            train_dataset=splits["train"],
            eval_dataset=evaluation,
            processing_class=tokenizer,
            peft_config=peft_config,
            # prepared labels (-100 on prompts) padded with -100, inputs to a multiple of 8
            data_collator=prepared_collator(tokenizer, bool(t.get("packing"))) if cfg.get("prepared") else None,
            callbacks=callbacks,
        )
    trainer.remove_callback(PrinterCallback)  # our ProgressCallback prints the step lines
    if info["rank"] == 0:
        # ZeRO-3 has partitioned the weights: numel() is 0, ds_numel the whole tensor's
        numel = lambda p: getattr(p, "ds_numel", p.numel())   # noqa: E731
        trainable = sum(numel(p) for p in trainer.model.parameters() if p.requires_grad)
        total = sum(numel(p) for p in trainer.model.parameters())
        if peft_config is not None:
            trainable, total = trainer.model.get_nb_trainable_parameters()
        log(f"{'lora' if peft_config is not None else 'full finetune'}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
        if resume_from:
            log(f"resuming from {resume_from}")

    result = trainer.train(resume_from_checkpoint=resume_from)
    # Every rank gets here (finished or stopped for the time limit): a collective is safe.
    memory.gather_and_write(cfg["memory_file"], probe.record(info["rank"]))

    if preempt_cb.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
        step = preempt_cb.stopped_at
        ckpt = os.path.join(cfg["checkpoint_dir"], f"checkpoint-{step}")
        barrier()  # every rank has written its part of the checkpoint
        if info["rank"] == 0:
            progress.event("preempted", step=step, max_steps=trainer.state.max_steps, checkpoint=ckpt)
        log(f"preempted: checkpoint {ckpt} saved at step {step}; exiting with {EXIT_PREEMPTED}")
        _shutdown()
        return EXIT_PREEMPTED

    trainer.save_model(cfg["output_dir"])  # rank 0 writes; collective-safe under DeepSpeed
    if trainer.args.should_save:
        fix_adapter_config(cfg["output_dir"], model_path)
        from hpcjobs.train.merge import fix_permissions

        fix_permissions(Path(cfg["output_dir"]))
    barrier()
    if info["rank"] == 0:
        summary = dict(progress_cb.summary)
        summary.update(
            step=trainer.state.global_step,
            max_steps=trainer.state.max_steps,
            adapter=cfg["output_dir"],
            train_loss=finite(getattr(result, "training_loss", None)),
        )
        progress.event("end", **summary)
        log(f"done: {'adapter' if peft_config is not None else 'model'} saved to {cfg['output_dir']} (step {trainer.state.global_step})")
    _shutdown()
    return 0


def prepared_collator(tokenizer, packed: bool = False):
    if packed:   # rows of whole examples, kept apart by position_ids (no attention mask)
        from hpcjobs.train.packing import PackedCollator

        return PackedCollator(tokenizer.pad_token_id)
    from hpcjobs.train.prepare import collator

    return collator(tokenizer)


def _shutdown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort at exit
        pass


if __name__ == "__main__":
    sys.exit(main())
