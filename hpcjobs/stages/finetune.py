"""``finetune``: TRL SFTTrainer + PEFT LoRA + DeepSpeed ZeRO across nodes (job side:
:mod:`hpcjobs.train.finetune`, one DeepSpeed launcher per node started by srun).

On the login node it settles who runs where (:mod:`hpcjobs.placement`), the world
size, and the DeepSpeed config with ``train_batch_size = micro × accumulation ×
world size``, so DeepSpeed's batch assertion cannot fail in the job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING

from .. import dsconfig
from ..constraints import choice, number
from ..errors import ConfigError
from ..placement import place_ranks
from ..schema import (LORA_BIAS, OFFLOAD_DEVICES, OPTIMIZER_NAMES, PRECISIONS, RESUME, SCHEDULERS,
                      SCHEDULERS_NEEDING_EVAL, SCHEDULERS_UNSUPPORTED, SEED_MAX, ZERO_STAGES, StageCfg)
from . import register
from .base import PlanContext, StageKind, plain, time_limit_signal, to_json


@dataclass
class LoraCfg:
    r: int = number(8, ge=1)
    alpha: int = number(8, ge=1)
    dropout: float = number(0.05, ge=0, lt=1)
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = choice(*LORA_BIAS, default="none")


@dataclass
class FinetuneStage(StageCfg):
    model: str = MISSING
    """Hugging Face model directory to finetune (recipes wire it to the convert output)."""
    output: str = "${run.dir}/adapter"
    checkpoints: str = "${run.dir}/checkpoints"
    lora: LoraCfg = field(default_factory=LoraCfg)
    micro_batch_size: int = number(16, ge=1, le=65536)
    """Per-GPU micro batch (train_micro_batch_size_per_gpu)."""
    grad_accum: int = number(1, ge=1)
    lr: float = number(1e-3, gt=0)
    max_steps: int = number(200, ge=1, also=(-1,), message="must be a positive step count or -1 (use epochs)")
    """-1: train for ``epochs`` instead."""
    epochs: float = number(1.0, gt=0)
    warmup_steps: int = number(100, ge=0)
    scheduler: str = choice(*SCHEDULERS, default="cosine", unsupported=SCHEDULERS_UNSUPPORTED)
    """The Trainer's ``lr_scheduler_type``; reduce_lr_on_plateau and greedy need ``eval_steps``."""
    max_seq_length: int = number(512, ge=1)
    gradient_checkpointing: bool = True
    precision: str = choice("auto", *PRECISIONS, default="auto")
    """bf16, fp16, fp32 or auto (from profile.precision)."""
    max_grad_norm: float = number(0.3, ge=0)
    optim: str = choice(*OPTIMIZER_NAMES, default="adamw_torch")
    logging_steps: int = number(10, ge=1)
    save_steps: int = number(100, ge=1)
    save_total_limit: int = number(2, ge=0)
    """Checkpoints kept (older ones are deleted); 0 keeps all."""
    eval_steps: Optional[int] = number(None, ge=1)
    """Evaluate on the eval split every N steps; None: no evaluation."""
    seed: int = number(42, ge=0, le=SEED_MAX)
    zero_stage: int = choice(*ZERO_STAGES, default=2)
    offload_optimizer: str = choice(*OFFLOAD_DEVICES, default="none")
    """none or cpu: optimizer states in host memory (ZeRO-Offload); the Trainer's torch AdamW steps them."""
    offload_param: str = choice(*OFFLOAD_DEVICES, default="none")
    """none or cpu; ZeRO stage 3 only."""
    deepspeed_config: Optional[str] = None
    """Your own DeepSpeed JSON instead of the generated one; its batch numbers are checked."""
    hostfile: Optional[str] = None
    """DeepSpeed hostfile (``host slots=N``): the job asks Slurm for exactly these hosts."""
    include: str = ""
    """DeepSpeed ``--include`` spec, e.g. ``node1:0,1@node2:0``."""
    exclude: str = ""
    """DeepSpeed ``--exclude`` spec."""
    resume: str = choice(*RESUME, default="auto")
    """auto: continue from the latest checkpoint if there is one; never: start fresh."""


class Finetune(StageKind):
    name = "finetune"
    summary = "LoRA SFT (TRL + PEFT) with DeepSpeed ZeRO across nodes"
    settings = FinetuneStage
    entry_point = "hpcjobs.train.finetune"
    sections = ("data",)
    path_keys = ("model", "output", "checkpoints", "hostfile", "deepspeed_config")
    output_keys = ("output", "checkpoints")
    input_dirs = ("model",)
    multi_node = True
    launch_options = True
    can_resume = True

    def default_gpus(self, profile):
        return profile.train_gpus_per_node or profile.gpus_per_node

    def plan(self, ctx: PlanContext):
        composed, chain, sp = ctx.composed, ctx.chain, ctx.sp
        p = chain.profile
        name = sp.name
        s: FinetuneStage = sp.cfg
        # Sets and ranges of single keys (zero_stage, lr, ...) are constraints.check's; here what
        # depends on several keys.
        precision_from = f"{name}.precision"
        if s.precision == "auto":
            s.precision = p.precision
            precision_from = f"{name}.precision (auto: profile.precision of profile {p.name})"
        if p.accelerator == "cpu" and s.precision == "fp16":
            raise composed.error(f"{name}.precision", "fp16 needs a GPU; use fp32 or bf16 on profile "
                                 f"{p.name} (accelerator cpu)")
        if not s.lora.target_modules:
            raise composed.error(f"{name}.lora.target_modules", "needs at least one module name")
        if s.scheduler in SCHEDULERS_NEEDING_EVAL and not s.eval_steps:
            raise composed.error(f"{name}.scheduler", f"{s.scheduler} steps on the evaluation loss, and the "
                                 "Trainer refuses it without evaluation",
                                 hint=f"set {name}.eval_steps, or use another scheduler")

        if s.offload_param == "cpu" and s.zero_stage != 3:
            raise composed.error(f"{name}.offload_param", f"parameter offload needs zero_stage 3 "
                                 f"(zero_stage is {s.zero_stage})")
        if s.offload_optimizer == "cpu" and s.zero_stage == 0:
            raise composed.error(f"{name}.offload_optimizer", "optimizer offload needs zero_stage 1, 2 or 3")

        nodelist, exclude_nodes = place_ranks(composed, chain, sp)
        world = sp.world_size

        if s.deepspeed_config:
            try:
                ds = dsconfig.load_user_ds_config(s.deepspeed_config)
                dsconfig.check_batch_numbers(ds, micro_batch_per_gpu=s.micro_batch_size,
                                             gradient_accumulation_steps=s.grad_accum, world_size=world,
                                             source=s.deepspeed_config)
                dsconfig.check_against_job(ds, precision=s.precision, precision_from=precision_from,
                                           max_grad_norm=s.max_grad_norm, max_grad_norm_from=f"{name}.max_grad_norm",
                                           source=s.deepspeed_config)
            except ConfigError as e:
                raise composed.error(f"{name}.deepspeed_config", str(e)) from None
        else:
            try:
                ds = dsconfig.build_ds_config(
                    zero_stage=s.zero_stage, micro_batch_per_gpu=s.micro_batch_size,
                    gradient_accumulation_steps=s.grad_accum, world_size=world, precision=s.precision,
                    gradient_clipping=s.max_grad_norm or None, offload_optimizer=s.offload_optimizer,
                    offload_param=s.offload_param)
            except ConfigError as e:  # the checks above should make this unreachable
                raise composed.error(f"{name}.zero_stage", e.message) from None
        sp.ds_config = ds
        return nodelist, exclude_nodes

    def sbatch(self, ctx: PlanContext):
        # The ranks checkpoint at SIGUSR2 and exit 75; the script requeues the job.
        return time_limit_signal(ctx)

    def progress(self, attempt_dir, log):
        from .. import progress as progress_mod

        return progress_mod.read(attempt_dir / "progress.jsonl")

    def preflight(self, plan, sp, composed, produced):
        for key in ("hostfile", "deepspeed_config"):
            value = getattr(sp.cfg, key)
            if value and not Path(value).is_file():
                raise composed.error(f"{sp.name}.{key}", f"{value} does not exist")

    def files(self, plan, sp):
        s, adir, chain = sp.cfg, sp.attempt_dir, plan.chain
        files = {"ds_config.json": to_json(sp.ds_config), "train.json": to_json({
            "model_path": s.model,
            "output_dir": s.output,
            "checkpoint_dir": s.checkpoints,
            "progress_file": str(adir / "progress.jsonl"),
            "preempt_file": str(adir / "preempt"),
            "deepspeed_config": str(adir / "ds_config.json"),
            "resume": s.resume,
            "device": chain.profile.accelerator,
            "world_size": sp.world_size,
            "data": plain(chain.data),
            "lora": plain(s.lora),
            "train": {
                "micro_batch_size": s.micro_batch_size,
                "gradient_accumulation_steps": s.grad_accum,
                "learning_rate": s.lr,
                "max_steps": s.max_steps,
                "num_train_epochs": s.epochs,
                "warmup_steps": s.warmup_steps,
                "lr_scheduler_type": s.scheduler,
                "max_seq_length": s.max_seq_length,
                "gradient_checkpointing": s.gradient_checkpointing,
                "precision": s.precision,
                "max_grad_norm": s.max_grad_norm,
                "logging_steps": s.logging_steps,
                "save_steps": s.save_steps,
                "save_total_limit": s.save_total_limit,
                "eval_steps": s.eval_steps,
                "seed": s.seed,
                "optim": s.optim,
            },
        })}
        if sp.pool is not None:
            files["hostfile.requested"] = "".join(f"{h} slots={n}\n" for h, n in sp.pool.items())
        return files

    def fresh(self, name, cfg):
        return [f"{name}.resume=never"], [cfg.checkpoints] if cfg is not None else []


register(Finetune())
