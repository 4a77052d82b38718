"""``finetune``: TRL SFTTrainer + PEFT LoRA + DeepSpeed ZeRO across nodes (job side:
:mod:`hpcjobs.train.finetune`, one DeepSpeed launcher per node started by srun).

On the login node it settles who runs where (:mod:`hpcjobs.placement`), the world
size, and the DeepSpeed config with ``train_batch_size = micro × accumulation ×
world size``, so DeepSpeed's batch assertion cannot fail in the job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING

from .. import dsconfig
from ..constraints import AUTO, Choice, Number, auto_or, choice, constraint_of, number
from ..errors import ConfigError
from ..placement import place_ranks
from ..schema import (LORA_BIAS, OFFLOAD_DEVICES, OPTIMIZER_NAMES, PRECISIONS,
                      RESUME, SCHEDULERS,
                      SCHEDULERS_NEEDING_EVAL, SCHEDULERS_UNSUPPORTED, SEED_MAX, STRATEGIES, TASK_METRICS, TASKS,
                      ZERO_STAGES, StageCfg)
from . import register
from .base import PlanContext, StageKind, check_report_to, plain, report_to_setting, time_limit_signal, to_json


@dataclass
class LoraCfg:
    r: int = number(8, ge=1)
    alpha: int = number(8, ge=1)
    dropout: float = number(0.05, ge=0, lt=1)
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules the adapters wrap; []: chosen from the model's architecture (LORA_TARGETS)."""
    bias: str = choice(*LORA_BIAS, default="none")
    enabled: bool = True
    """false: full finetuning (every weight trained; the output is a whole model, merge copies it)."""


# The attention projections LoRA wraps per architecture (memplan's names, from config.json or a
# Meta params.json): PEFT's own defaults for these models.
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "bloom": ["query_key_value"],
                "bert": ["query", "value"], "t5": ["q", "v"]}

# Architectures whose attention reads example boundaries from position_ids (transformers'
# create_causal_mask), so packed examples cannot attend to each other (hpcjobs.train.packing;
# tests/test_packing.py checks each). Not bloom: its ALiBi attention ignores position_ids.
PACKING_ARCHS = ("llama", "qwen2")


@dataclass
class FinetuneStage(StageCfg):
    model: str = MISSING
    """Hugging Face model directory to finetune (recipes wire it to the convert output)."""
    output: str = "${run.dir}/adapter"
    checkpoints: str = "${run.dir}/checkpoints"
    lora: LoraCfg = field(default_factory=LoraCfg)
    prepared: Optional[str] = None
    """A prepare stage's output: the ranks load it instead of tokenizing data.* each."""
    micro_batch_size: Any = auto_or(16, int, Number(ge=1, le=65536))
    """Per-GPU micro batch (train_micro_batch_size_per_gpu); auto: the largest that fits (`hpcjobs plan`)."""
    grad_accum: int = number(1, ge=1)
    lr: float = number(1e-3, gt=0)
    max_steps: int = number(200, ge=1, also=(-1,), message="must be a positive step count or -1 (use epochs)")
    """-1: train for ``epochs`` instead."""
    epochs: float = number(1.0, gt=0)
    warmup_steps: int = number(100, ge=0)
    scheduler: str = choice(*SCHEDULERS, default="cosine", unsupported=SCHEDULERS_UNSUPPORTED)
    """The Trainer's ``lr_scheduler_type``; reduce_lr_on_plateau and greedy need ``eval_steps``."""
    max_seq_length: int = number(512, ge=1)
    packing: bool = False
    """Pack whole prepared examples into rows of up to max_seq_length tokens instead of padding
    each micro batch (causal-lm with a prepare stage; Llama- and Qwen2-style models only). An
    example still attends only to itself; fewer, fuller rows make fewer steps per epoch."""
    gradient_checkpointing: Any = auto_or(True, bool)
    """true, false or auto (off if the setup fits without it)."""
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
    zero_stage: Any = auto_or(2, int, Choice(ZERO_STAGES))
    """0-3, or auto: the memory planner's choice (ZeRO-1, 2, 2+offload, 3, 3+offload)."""
    offload_optimizer: Any = auto_or("none", str, Choice(OFFLOAD_DEVICES))
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
    report_to: List[str] = report_to_setting()
    """The Trainer's report_to integrations (tensorboard, wandb, mlflow, ...); [] or [none]: none.
    TensorBoard event files go to ``<run dir>/tensorboard/<stage>/attempt-<n>``."""
    task: str = choice(*TASKS, default="causal-lm")
    """causal-lm: TRL's SFTTrainer; classification: a sequence(-pair) classifier under the
    Trainer; seq2seq: an encoder-decoder under Seq2SeqTrainer. The last two train on a prepare
    stage's output (``prepared``) of the same task."""
    strategy: Optional[str] = choice(*STRATEGIES, default=None)
    """One name for the parallelism setup; sets zero_stage and offload_*: ddp (no DeepSpeed,
    torch DDP), zero1, zero2, zero2-offload (optimizer in host memory), zero3, zero3-offload
    (parameters too). None: zero_stage and offload_* as set."""
    best_metric: Optional[str] = None
    """Evaluate every ``eval_steps`` (None: every epoch), checkpoint at each evaluation, keep the
    ``save_total_limit`` best by this eval metric (and the latest, for resuming) and load the
    best at the end: loss (lower is better), classification accuracy or f1, seq2seq rouge1,
    rouge2 or rougeL. None: checkpoints every save_steps, the latest kept."""


def tensorboard_dir(run_dir, stage: str, attempt: int) -> Path:
    """Where a training attempt's TensorBoard event files go. One tree for the whole chain:
    ``tensorboard --logdir <run dir>/tensorboard`` lists its runs as ``<stage>/attempt-<n>``
    (``--logdir <run dir>`` works too, with a ``tensorboard/`` prefix), and the curves can be
    copied off the cluster without the checkpoints beside them in the attempt directories."""
    return Path(run_dir) / "tensorboard" / stage / f"attempt-{attempt}"


AUTO_KEYS = ("gradient_checkpointing", "zero_stage", "offload_optimizer", "micro_batch_size")
"""Settings that take ``auto``: the memory planner (:mod:`hpcjobs.memplan.search`) chooses them."""


def _concrete(s: FinetuneStage) -> List[str]:
    """Give the ``auto``-able settings their typed values (a command-line value is text); returns
    those that are ``auto``, in the planner's search order."""
    free = []
    for f in dataclasses.fields(s):
        if f.name in AUTO_KEYS:
            value = getattr(s, f.name)
            if value == AUTO:
                free.append(f.name)
            else:   # constraints.check has accepted it: it converts
                setattr(s, f.name, constraint_of(f).convert(value))
    return [k for k in AUTO_KEYS if k in free]


def _choose(ctx: PlanContext, free: List[str]) -> None:
    """Set the ``auto`` settings to the fastest setup predicted to fit (before the DeepSpeed config
    is built, so the config, train.json and memory_plan.json agree); the choice and why go to
    ``sp.extra``."""
    from ..memplan import report, search
    from ..memplan.estimate import fmt_bytes

    composed, chain, sp = ctx.composed, ctx.chain, ctx.sp
    s: FinetuneStage = sp.cfg
    key = f"{sp.name}.{free[0]}"
    if s.deepspeed_config:
        raise composed.error(key, "auto needs the generated DeepSpeed config; "
                             f"{sp.name}.deepspeed_config is your own", hint=f"set {key} to a value")
    lim = report.limits(chain, sp.mem)
    if lim.gpu is None:
        raise composed.error(key, f"auto needs the GPU's memory, and profile {chain.profile.name} has no gpu_mem",
                             hint="set profile.gpu_mem (e.g. profile.gpu_mem=80G)")
    try:
        shape, _ = report.load_shape(chain, sp.name, s.model)
    except ConfigError as e:
        raise composed.error(key, f"auto needs the model's configuration to predict memory: {e.__cause__ or e}",
                             hint=f"set {key} to a value, or point {sp.name}.model (model.source) at a "
                             "directory with config.json or params.json") from None
    for k in free:   # placeholders; the search varies exactly these
        setattr(s, k, {"gradient_checkpointing": True, "zero_stage": 3, "offload_optimizer": "none",
                       "micro_batch_size": 1}[k])
    setup = report.train_setup(chain, s, shape, world=sp.world_size or 1, nodes=sp.nodes, ds=None)
    pick = search.search(setup, free, lim)
    if pick is None:
        least = search.smallest(setup, free)
        raise composed.error(key, f"auto: no setup fits in {fmt_bytes(lim.gpu)} per GPU with a margin of "
                             f"{fmt_bytes(lim.margin)}: the smallest, {search.describe(least.values)}, needs "
                             f"{fmt_bytes(least.plan.gpu_peak)} per GPU and {fmt_bytes(least.plan.host_peak)} "
                             "per node (set it, and `hpcjobs plan` shows the breakdown)",
                             hint=f"more GPUs (--nodes), a shorter {sp.name}.max_seq_length, or "
                             f"{sp.name}.offload_param=cpu with zero_stage 3")
    for k, v in pick.values.items():
        setattr(s, k, v)
    why = (f"the first setup that fits ({search.ORDER}): GPU peak {fmt_bytes(pick.plan.gpu_peak)} + margin "
           f"{fmt_bytes(lim.margin)} <= {fmt_bytes(lim.gpu)}")
    sp.extra[report.AUTO_EXTRA] = {
        "chosen": dict(pick.values), "why": why, "rejected": pick.rejected, "margin": lim.margin,
        "order": search.ORDER,
    }


def _check_packing(ctx: PlanContext) -> None:
    """Packing needs prepared causal-LM examples and a model whose attention keeps them apart."""
    from ..memplan import report

    s, name = ctx.sp.cfg, ctx.sp.name
    if s.task != "causal-lm":
        raise ctx.error("packing", f"packing is for task causal-lm; task {s.task} trains on whole examples",
                        hint=f"set {name}.packing=false")
    if not s.prepared:
        raise ctx.error("packing", "packing packs a prepare stage's examples, and this stage has none "
                        f"({name}.prepared is unset)",
                        hint=f"add a prepare stage and set {name}.prepared to its output (sft-lora and "
                        "llama2-lora do), or set packing=false")
    try:
        shape, cfg_path = report.load_shape(ctx.chain, name, s.model)
    except ConfigError as e:
        raise ctx.error("packing", f"packing needs the model's architecture, but {e.message}",
                        hint=f"set {name}.packing=false") from None
    if shape.arch not in PACKING_ARCHS:
        raise ctx.error("packing", f"{shape.arch} ({cfg_path}) cannot keep packed examples apart: its "
                        "attention ignores position ids, so each example would attend to the ones packed "
                        f"before it (packing works for {', '.join(PACKING_ARCHS)})",
                        hint=f"set {name}.packing=false")


def _lora_targets(ctx: PlanContext) -> List[str]:
    """LoRA targets for the model's architecture, read on the login node as `hpcjobs plan` reads it."""
    from ..memplan import report

    key = f"{ctx.sp.name}.lora.target_modules"
    try:
        shape, cfg_path = report.load_shape(ctx.chain, ctx.sp.name, ctx.sp.cfg.model)
    except ConfigError as e:
        raise ctx.error("lora.target_modules", f"[] chooses them from the model's architecture, but {e.message}",
                        hint=f"name them, e.g. {key}=[q_proj,v_proj]") from None
    if shape.arch not in LORA_TARGETS:
        raise ctx.error("lora.target_modules", f"no default LoRA targets for {shape.arch} ({cfg_path})",
                        hint=f"name them, e.g. {key}=[q,v]")
    return list(LORA_TARGETS[shape.arch])


class Finetune(StageKind):
    name = "finetune"
    summary = "LoRA or full finetuning (causal LM SFT, classification, seq2seq) with DeepSpeed ZeRO or DDP across nodes"
    settings = FinetuneStage
    entry_point = "hpcjobs.train.finetune"
    sections = ("data",)
    path_keys = ("model", "output", "checkpoints", "hostfile", "deepspeed_config", "prepared")
    output_keys = ("output", "checkpoints")
    input_dirs = ("model", "prepared")
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
        if s.strategy is not None:   # the shorthand decides the three settings it names
            s.zero_stage, s.offload_optimizer, s.offload_param = STRATEGIES[s.strategy]
            if s.strategy == "ddp" and s.deepspeed_config:
                raise composed.error(f"{name}.strategy", f"ddp runs without DeepSpeed, but {name}.deepspeed_config "
                                     "is set", hint="unset one of them")
        free = _concrete(s)   # the settings left to the memory planner (auto)
        # Sets and ranges of single keys (zero_stage, lr, ...) are constraints.check's; here what
        # depends on several keys.
        precision_from = f"{name}.precision"
        if s.precision == "auto":
            s.precision = p.precision
            precision_from = f"{name}.precision (auto: profile.precision of profile {p.name})"
        if p.accelerator == "cpu" and s.precision == "fp16":
            raise composed.error(f"{name}.precision", "fp16 needs a GPU; use fp32 or bf16 on profile "
                                 f"{p.name} (accelerator cpu)")
        if not s.lora.target_modules and s.lora.enabled:
            s.lora.target_modules = _lora_targets(ctx)
        if s.task != "causal-lm" and not s.prepared:
            raise composed.error(f"{name}.prepared", f"task {s.task} trains on a prepare stage's output",
                                 hint=f"add a prepare stage with task {s.task} and set {name}.prepared to its "
                                 "output (the seq-classification and seq2seq recipes do)")
        if s.packing:
            _check_packing(ctx)
        if s.best_metric is not None and s.best_metric not in TASK_METRICS[s.task]:
            raise composed.error(f"{name}.best_metric", f"task {s.task} evaluates "
                                 f"{', '.join(TASK_METRICS[s.task])}, not {s.best_metric!r}")
        if s.scheduler in SCHEDULERS_NEEDING_EVAL and not s.eval_steps:
            raise composed.error(f"{name}.scheduler", f"{s.scheduler} steps on the evaluation loss, and the "
                                 "Trainer refuses it without evaluation",
                                 hint=f"set {name}.eval_steps, or use another scheduler")

        check_report_to(ctx, s.report_to)

        if s.offload_param == "cpu" and s.zero_stage not in (3, AUTO):
            raise composed.error(f"{name}.offload_param", f"parameter offload needs zero_stage 3 "
                                 f"(zero_stage is {s.zero_stage})")
        if s.offload_optimizer == "cpu" and s.zero_stage == 0:
            raise composed.error(f"{name}.offload_optimizer", "optimizer offload needs zero_stage 1, 2 or 3")

        nodelist, exclude_nodes = place_ranks(composed, chain, sp)
        world = sp.world_size
        if free:
            _choose(ctx, free)

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

    def memory(self, plan, sp):
        from ..memplan import report

        if "memory_plan" not in sp.extra:   # render, submit and the CLI all ask: predict once
            sp.extra["memory_plan"] = report.stage_memory(plan, sp)
        return sp.extra["memory_plan"]

    def files(self, plan, sp):
        s, adir, chain = sp.cfg, sp.attempt_dir, plan.chain
        deepspeed = s.strategy != "ddp"   # ddp: the Trainer's own DistributedDataParallel
        files = {"ds_config.json": to_json(sp.ds_config)} if deepspeed else {}
        files.update({"train.json": to_json({
            "task": s.task,
            "model_path": s.model,
            "output_dir": s.output,
            "checkpoint_dir": s.checkpoints,
            "progress_file": str(adir / "progress.jsonl"),
            "preempt_file": str(adir / "preempt"),
            "deepspeed_config": str(adir / "ds_config.json") if deepspeed else None,
            "tensorboard_dir": str(tensorboard_dir(plan.run_dir, sp.name, sp.attempt)),
            "memory_file": str(adir / "memory_measured.json"),
            "resume": s.resume,
            "device": chain.profile.accelerator,
            "world_size": sp.world_size,
            "data": plain(chain.data),
            "lora": plain(s.lora),
            "prepared": s.prepared,
            "train": {
                "micro_batch_size": s.micro_batch_size,
                "gradient_accumulation_steps": s.grad_accum,
                "learning_rate": s.lr,
                "max_steps": s.max_steps,
                "num_train_epochs": s.epochs,
                "warmup_steps": s.warmup_steps,
                "lr_scheduler_type": s.scheduler,
                "max_seq_length": s.max_seq_length,
                "packing": s.packing,
                "gradient_checkpointing": s.gradient_checkpointing,
                "precision": s.precision,
                "max_grad_norm": s.max_grad_norm,
                "logging_steps": s.logging_steps,
                "save_steps": s.save_steps,
                "save_total_limit": s.save_total_limit,
                "eval_steps": s.eval_steps,
                "seed": s.seed,
                "optim": s.optim,
                "report_to": [r for r in s.report_to if r != "none"],
                "best_metric": s.best_metric,
            },
        })})
        if sp.pool is not None:
            files["hostfile.requested"] = "".join(f"{h} slots={n}\n" for h, n in sp.pool.items())
        try:   # the prediction, next to the memory_measured.json the job writes (`hpcjobs report`)
            files["memory_plan.json"] = to_json(self.memory(plan, sp).to_json())
        except ConfigError:
            pass   # no readable model configuration: nothing predicted
        return files

    def fresh(self, name, cfg):
        return [f"{name}.resume=never"], [cfg.checkpoints] if cfg is not None else []


register(Finetune())
