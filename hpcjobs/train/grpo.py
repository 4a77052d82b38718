"""GRPO (TRL ``GRPOTrainer``) inside a Slurm job, one process per rank under ``accelerate launch``.

    accelerate launch --config_file accelerate.yaml ... -m hpcjobs.train.grpo --config grpo.json

grpo.json is written by the ``grpo`` stage kind (:mod:`hpcjobs.stages.grpo`), which has already
checked GRPO's batch rules and settled the DeepSpeed JSON's batch numbers for this world size::

    model_path, output_dir, checkpoint_dir, deepspeed_config, resume (auto|never), device,
    world_size, data {path, columns, template, split, seed}, reward (hpcjobs.train.rewards),
    generator (model), train {micro_batch_size, gradient_accumulation_steps, num_generations,
    steps_per_generation, max_completion_length, temperature, beta, learning_rate, max_steps,
    num_train_epochs, warmup_steps, lr_scheduler_type, max_grad_norm, precision,
    gradient_checkpointing, logging_steps, save_steps, save_total_limit, eval_steps,
    eval_micro_batch_size, num_generations_eval, seed}

Prompts are the ``train`` split of the data (:func:`hpcjobs.train.rewards.load_prompt_splits`);
the ``test`` split is what the evaluate stage scores. Progress (``$HPCJOBS_PROGRESS_FILE``)
and the time-limit contract (checkpoint on every rank, exit 75, resume from it) come from
:class:`hpcjobs.train.callbacks.HpcjobsCallback`; its progress lines here also carry the mean
reward, its std, the KL (``beta`` > 0) and the mean completion length.

Exit codes: 0 done (model saved to output_dir), 75 preempted, 2 bad input, 1 crash.
"""

from __future__ import annotations

# first: inside an hpcjobs job this installs the SIGUSR2 handler before the slow imports
from hpcjobs.train.callbacks import HpcjobsCallback, resume_checkpoint  # isort: skip

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict

from hpcjobs.errors import HpcjobsError
from hpcjobs.train.runtime import (checkpointing_field, finite, load_tokenizer, log_record, rank_info,
                                   resolve_device, set_log_prefix, setup_environment, torch_dtype)

#: progress.jsonl field <- TRL's log key
REWARD_FIELDS = {"reward": "reward", "reward_std": "reward_std", "kl": "kl",
                 "completion_length": "completions/mean_length"}


def log(msg: str) -> None:
    print(f"[hpcjobs.grpo] {msg}", flush=True)


def generation_settings(generator: str, train: Dict[str, Any]) -> Dict[str, Any]:
    """GRPOConfig keywords for how completions are generated: the one place a vLLM server
    (``use_vllm=True, vllm_mode="server", vllm_server_host=..., vllm_server_port=...``, a
    ``trl vllm-serve`` started on a node of its own) or colocated vLLM (``vllm_mode="colocate"``,
    ``vllm_gpu_memory_utilization``) plugs in, with a matching ``grpo.generator`` value.
    ``model``: the policy model's own ``generate`` on every rank (under ZeRO-3 TRL gathers
    the weights for it)."""
    if generator == "model":
        return {"use_vllm": False, "max_completion_length": int(train["max_completion_length"]),
                "temperature": float(train["temperature"])}
    raise HpcjobsError(f"grpo.generator {generator!r} is not supported (only 'model')")


class GrpoProgress(HpcjobsCallback):
    """HpcjobsCallback whose training lines also carry GRPO's reward, reward std, KL and
    completion length (``hpcjobs watch`` shows them)."""

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and state.is_world_process_zero and "loss" in logs:
            now = time.time()
            rec = log_record(state, logs, self._global_batch, self._last_step, self._last_time, now)
            self._last_time, self._last_step = now, state.global_step
            for out, key in REWARD_FIELDS.items():
                if logs.get(key) is not None:
                    rec[out] = finite(logs[key])
            per = {k[len("rewards/"):-len("/mean")]: finite(v) for k, v in logs.items()
                   if k.startswith("rewards/") and k.endswith("/mean")}
            if per:
                rec["rewards"] = per
            self._progress.write(rec)
            return
        super().on_log(args, state, control, logs=logs, **kw)


def load_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise HpcjobsError(f"{path}: cannot read the GRPO config: {e}") from None


def run(cfg: Dict[str, Any], device: str, info: Dict[str, int]) -> int:
    import transformers
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from hpcjobs.train import rewards

    t = cfg["train"]
    use_cpu = device == "cpu"
    if info["rank"] != 0:
        transformers.utils.logging.disable_progress_bar()
    if use_cpu and t["precision"] == "fp16":
        raise HpcjobsError("grpo.precision fp16 is not supported on CPU; use fp32 (or bf16)")
    model_path = cfg["model_path"]
    if not Path(model_path, "config.json").is_file():
        raise HpcjobsError(f"{model_path}: not a Hugging Face model directory (no config.json)")
    # inputs first, before the rendezvous: a bad column or reward file fails every rank at once
    splits = rewards.load_prompt_splits(cfg["data"])
    reward_funcs = rewards.build(cfg["reward"])
    if info["rank"] == 0:
        log(f"data: train={len(splits['train'])} test={len(splits['test'])} eval={len(splits['eval'])} prompts; "
            f"rewards: {', '.join(f.__name__ for f in reward_funcs)}")

    eval_on = bool(t.get("eval_steps")) and len(splits["eval"]) > 0
    args = GRPOConfig(
        output_dir=cfg["checkpoint_dir"],
        per_device_train_batch_size=t["micro_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        num_generations=t["num_generations"],
        steps_per_generation=t["steps_per_generation"],
        beta=float(t["beta"]),
        learning_rate=float(t["learning_rate"]),
        max_steps=int(t["max_steps"]),
        num_train_epochs=float(t["num_train_epochs"]),
        warmup_steps=t["warmup_steps"] or 0,
        lr_scheduler_type=t["lr_scheduler_type"],
        max_grad_norm=float(t["max_grad_norm"]),
        bf16=t["precision"] == "bf16",
        fp16=t["precision"] == "fp16",
        **{checkpointing_field(GRPOConfig): bool(t["gradient_checkpointing"])},
        logging_steps=t["logging_steps"],
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t["save_steps"],
        save_total_limit=t["save_total_limit"] or None,
        eval_strategy="steps" if eval_on else "no",
        eval_steps=t["eval_steps"] if eval_on else None,
        per_device_eval_batch_size=t["eval_micro_batch_size"],
        reward_weights=rewards.weights(cfg["reward"]),
        seed=int(t["seed"]),
        data_seed=int(t["seed"]),
        deepspeed=cfg["deepspeed_config"],
        use_cpu=use_cpu,
        # TensorBoard by default: the job template exports TENSORBOARD_LOGGING_DIR
        report_to=list(t.get("report_to") or []) or "none",
        disable_tqdm=True,
        log_level="warning",
        log_level_replica="warning",
        **generation_settings(cfg.get("generator", "model"), t),
        # only when set: older TRLs have no such field
        **({"num_generations_eval": t["num_generations_eval"]} if t.get("num_generations_eval") else {}),
    )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # As in hpcjobs.train.finetune: with use_cpu accelerate initialises torch.distributed but
        # not deepspeed.comm, and ZeRO-3's zero.Init in from_pretrained would then see world size 1.
        import deepspeed.comm as ds_comm

        if not ds_comm.is_initialized():
            ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        log(f"distributed: rank={dist.get_rank()} world_size={dist.get_world_size()} backend={dist.get_backend()}")
    planned = cfg.get("world_size")
    if planned and args.world_size != planned:
        raise HpcjobsError(f"the launcher started {args.world_size} ranks but this job was planned, and its "
                           f"batch numbers settled, for {planned}")

    tokenizer = load_tokenizer(model_path)
    tokenizer.padding_side = "left"  # generation pads prompts on the left
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(t["precision"]))
    resume = resume_checkpoint(cfg["checkpoint_dir"]) if cfg.get("resume", "auto") == "auto" else None
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"] if eval_on else None,
        processing_class=tokenizer,
        callbacks=[GrpoProgress()],
    )
    if info["rank"] == 0:
        log(f"GRPO: {args.world_size} rank(s) x micro batch {args.per_device_train_batch_size} x accumulation "
            f"{args.gradient_accumulation_steps}; generation batch {args.generation_batch_size} = "
            f"{args.generation_batch_size // args.num_generations} prompt(s) x {args.num_generations} completions"
            + (f"; resuming from {resume}" if resume else ""))
    trainer.train(resume_from_checkpoint=resume)   # exits 75 on the time-limit warning (HpcjobsCallback)
    trainer.save_model(cfg["output_dir"])           # a collective under ZeRO-3; rank 0 writes
    if trainer.args.should_save:
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(cfg["output_dir"])
        log(f"done: model saved to {cfg['output_dir']} (step {trainer.state.global_step})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcjobs.train.grpo", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="grpo.json written by the grpo stage")
    a = ap.parse_args(argv)
    set_log_prefix("[hpcjobs.grpo]")   # the shared helpers' lines say grpo
    info = rank_info()
    try:
        cfg = load_config(a.config)
        device = resolve_device(cfg.get("device"))
        setup_environment(device, info["local_size"])
        code = run(cfg, device, info)
    except HpcjobsError as e:
        log(f"error: {e}")
        code = 2
    except Exception:
        traceback.print_exc()
        code = 1
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort at exit
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
