"""``pretrain``: a Llama-architecture decoder trained from scratch, launched through accelerate
+ DeepSpeed on N nodes (job side: :mod:`hpcjobs.train.pretrain`).

Built on the ``script`` kind's machinery rather than beside it: the launch is a
:class:`hpcjobs.launchers.LaunchSpec` for the ``accelerate`` launcher running the shipped
program ``python -m hpcjobs.train.pretrain train`` (one accelerate per node under
``srun --ntasks-per-node=1``), the accelerate YAML comes from
:func:`hpcjobs.launchers.accelerate_yaml` and the batch numbers from
:func:`hpcjobs.scriptbatch.resolve_batch`. On the login node:

* the size settings are checked (``dim`` divisible by ``n_heads`` into an even head size,
  ``n_heads`` by ``n_kv_heads``), naming the key;
* the DeepSpeed JSON (``deepspeed``: a ZeRO preset, or your file, e.g. MiniMind's with
  ``"auto"`` everywhere) is settled for the real world size: batch sizes and accumulation,
  ``bf16``/``fp16`` from the precision, ``gradient_clipping`` from ``grad_clip``, the ZeRO
  bucket sizes from ``dim`` (as the HF Trainer would fill them). The job gets that file
  with no ``"auto"`` left (``render`` shows it), and the accelerate YAML points at it.

In the job, the batch host first tokenizes and packs the corpus into ``max_seq_len`` blocks
(once per run: ``packed/``, reused by a requeue or rerun) and saves the untrained init
(``init_output``, the "before" model of the evaluation), then launches training. Time
limits: the ``script`` kind's contract (SIGUSR2 -> checkpoint -> exit 75 -> requeue); the
next run resumes from the latest checkpoint at the same global step and data position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from .. import dsconfig, launchers, scriptbatch
from ..constraints import choice, number
from ..errors import ConfigError
from ..placement import place_ranks
from ..schema import PRECISIONS, RESUME, SEED_MAX, StageCfg
from . import register
from .base import PlanContext, StageKind, check_report_to, plain, report_to_setting, time_limit_signal, to_json

DS_PRESETS = ("zero1", "zero2", "zero3")
#: the program every rank runs (``accelerate launch -m hpcjobs.train.pretrain train ...``)
PROGRAM = ["-m", "hpcjobs.train.pretrain"]


@dataclass
class PretrainStage(StageCfg):
    tokenizer: str = MISSING
    """Hugging Face tokenizer directory (recipes wire it to the tokenizer stage's output)."""
    output: str = "${run.dir}/model"
    """The trained model, a Hugging Face directory (AutoModelForCausalLM) with the tokenizer."""
    init_output: str = "${run.dir}/model-init"
    """The untrained initialisation, saved before training (the "before" model of evaluate)."""
    checkpoints: str = "${run.dir}/checkpoints"
    """Trainer checkpoints (checkpoint-<step>/, each also a loadable HF model directory)."""
    packed: str = "${run.dir}/packed"
    """The tokenized corpus packed into max_seq_len blocks (datasets.save_to_disk), made once."""
    # ---- model size (a LlamaConfig)
    dim: int = number(512, ge=8, le=65536)
    """hidden_size."""
    n_layers: int = number(8, ge=1, le=1024)
    n_heads: int = number(8, ge=1, le=1024)
    n_kv_heads: Optional[int] = number(None, ge=1, le=1024)
    """Key/value heads (grouped-query attention); None: n_heads."""
    vocab_size: int = number(6400, ge=8, le=1_048_576)
    """Embedding rows; at least the tokenizer's size."""
    max_seq_len: int = number(512, ge=8, le=1_048_576)
    """Training block length (the corpus is packed into blocks of it) and max_position_embeddings."""
    intermediate_size: Optional[int] = number(None, ge=1)
    """MLP width; None: 8/3 x dim rounded up to a multiple of 64 (MiniMind's rule)."""
    rope_theta: float = number(1e6, gt=0)
    tie_embeddings: bool = True
    """Share the input embedding and output projection (MiniMind does)."""
    # ---- training
    micro_batch_size: int = number(24, ge=1, le=65536)
    """Blocks per rank per forward pass (train_micro_batch_size_per_gpu)."""
    grad_accum: int = number(1, ge=1)
    lr: float = number(5e-4, gt=0)
    min_lr_ratio: float = number(0.1, ge=0, lt=1)
    """The cosine schedule ends at lr x this (MiniMind: lr/10); 0: decays to 0."""
    warmup_steps: int = number(0, ge=0)
    weight_decay: float = number(0.01, ge=0)
    """AdamW weight decay (torch's default, which MiniMind uses)."""
    epochs: float = number(1.0, gt=0)
    max_steps: int = number(-1, ge=1, also=(-1,), message="must be a positive step count or -1 (use epochs)")
    """Optimizer steps; -1: train for ``epochs``."""
    grad_clip: float = number(1.0, ge=0)
    """Gradient norm clipping (0: none)."""
    precision: str = choice("auto", *PRECISIONS, default="auto")
    """bf16, fp16, fp32 or auto: profile.precision on GPU profiles, fp32 on CPU ones."""
    logging_steps: int = number(100, ge=1)
    save_steps: int = number(1000, ge=1)
    save_total_limit: int = number(2, ge=0)
    """Checkpoints kept (older ones are deleted); 0 keeps all."""
    seed: int = number(42, ge=0, le=SEED_MAX)
    deepspeed: str = "zero2"
    """zero1, zero2, zero3, or your DeepSpeed JSON ("auto" values are settled before submission)."""
    resume: str = choice(*RESUME, default="auto")
    """auto: continue from the latest checkpoint if there is one; never: start fresh."""
    report_to: List[str] = report_to_setting()
    """The Trainer's report_to integrations (tensorboard, wandb, mlflow, ...); [] or [none]: none.
    TensorBoard event files go to ``<run dir>/tensorboard/<stage>/attempt-<n>``."""
    hostfile: Optional[str] = None
    """A hostfile (``host slots=N``, whole nodes): the job runs on exactly these hosts."""
    include: str = ""
    """Whole nodes to run on, DeepSpeed's spelling (node1@node2)."""
    exclude: str = ""
    """Whole nodes not to run on."""


def intermediate_size(s: PretrainStage) -> int:
    if s.intermediate_size:
        return s.intermediate_size
    return 64 * ((int(s.dim * 8 / 3) + 63) // 64)


def model_config(s: PretrainStage) -> Dict[str, Any]:
    """The LlamaConfig keyword arguments of the stage's size settings."""
    return {
        "hidden_size": s.dim,
        "num_hidden_layers": s.n_layers,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_kv_heads or s.n_heads,
        "vocab_size": s.vocab_size,
        "max_position_embeddings": s.max_seq_len,
        "intermediate_size": intermediate_size(s),
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": s.tie_embeddings,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
    }


def _tokenizer_size(path: Path) -> Optional[int]:
    """Tokens of a tokenizer.json (vocabulary and added tokens), read without transformers."""
    try:
        data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vocab = (data.get("model") or {}).get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else []
    ids += [t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)]
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else None


class Pretrain(StageKind):
    name = "pretrain"
    summary = "a Llama-style LM from scratch (HF Trainer, accelerate + DeepSpeed) across nodes"
    settings = PretrainStage
    entry_point = "hpcjobs.train.pretrain"
    sections = ("data",)
    path_keys = ("tokenizer", "output", "init_output", "checkpoints", "packed", "hostfile")
    output_keys = ("output", "init_output", "checkpoints", "packed")
    input_dirs = ("tokenizer",)
    multi_node = True
    launch_options = True
    can_resume = True

    def default_gpus(self, profile):
        return profile.train_gpus_per_node or profile.gpus_per_node

    # ---- planning

    def plan(self, ctx: PlanContext):
        s: PretrainStage = ctx.sp.cfg
        sp, p = ctx.sp, ctx.chain.profile
        check_report_to(ctx, s.report_to)
        kv = s.n_kv_heads or s.n_heads
        if s.dim % s.n_heads:
            raise ctx.error("dim", f"{s.dim} is not divisible by n_heads ({s.n_heads}): each head gets "
                            f"dim / n_heads = {s.dim / s.n_heads:g} dimensions")
        if (s.dim // s.n_heads) % 2:
            raise ctx.error("dim", f"dim / n_heads = {s.dim // s.n_heads} is odd; rotary position embeddings "
                            "need an even head size")
        if s.n_heads % kv:
            raise ctx.error("n_kv_heads", f"{kv} does not divide n_heads ({s.n_heads}): grouped-query attention "
                            "shares each key/value head among n_heads / n_kv_heads query heads")
        precision_from = f"{sp.name}.precision"
        if s.precision == "auto":
            s.precision = p.precision if p.accelerator == "cuda" else "fp32"
            precision_from += f" (auto, profile {p.name})"
        if p.accelerator == "cpu" and s.precision != "fp32":
            raise ctx.error("precision", f"{s.precision} needs a GPU; use fp32 on profile {p.name} (accelerator cpu)")
        for key in ("include", "exclude"):
            spec = getattr(s, key)
            if spec and ":" in spec:
                raise ctx.error(key, f"{spec!r} picks GPUs within a node; the accelerate launcher takes whole "
                                "nodes", hint="name whole nodes (node1@node2)")
        nodelist, exclude_nodes = place_ranks(ctx.composed, ctx.chain, sp)
        if sp.pool and len(set(sp.pool.values())) > 1:
            raise ctx.error("hostfile", f"hosts have different slots ({sp.pool}); the accelerate launcher "
                            "runs the same number of ranks on every node")
        sp.ds_filter = None  # whole nodes: Slurm's --nodelist/--exclude already say it
        sp.world_size = sp.nodes * sp.gpus_per_node
        self._plan_deepspeed(ctx, precision_from)
        return nodelist, exclude_nodes

    def _plan_deepspeed(self, ctx: PlanContext, precision_from: str) -> None:
        s: PretrainStage = ctx.sp.cfg
        sp = ctx.sp
        ds_path = str(sp.attempt_dir / "ds_config.json")
        clip_from = f"{sp.name}.grad_clip"
        if s.deepspeed in DS_PRESETS:
            source = f"preset {s.deepspeed}"
            ds = dsconfig.build_ds_config(
                zero_stage=int(s.deepspeed[-1]), micro_batch_per_gpu=s.micro_batch_size,
                gradient_accumulation_steps=s.grad_accum, world_size=sp.world_size, precision=s.precision,
                gradient_clipping=s.grad_clip)
        else:
            source = s.deepspeed
            try:
                user = dsconfig.load_user_ds_config(s.deepspeed)
            except ConfigError as e:
                raise ctx.error("deepspeed", e.message) from None
            for section in ("optimizer", "scheduler"):
                if section in user:
                    raise ctx.error("deepspeed", f"{s.deepspeed}: has a {section!r} section; the stage's AdamW "
                                    f"({sp.name}.lr, weight_decay) and warmup + cosine schedule are used",
                                    hint=f"remove {section!r} from the file")
            try:
                dsconfig.check_against_job(user, precision=s.precision, precision_from=precision_from,
                                           max_grad_norm=s.grad_clip, max_grad_norm_from=clip_from,
                                           source=s.deepspeed)
                res = scriptbatch.resolve_batch(
                    declared={"micro_batch_size": s.micro_batch_size, "grad_accum": s.grad_accum},
                    from_args={}, ds_json=user, world_size=sp.world_size, hf_script=True,
                    declared_source=sp.name, ds_source=s.deepspeed)
            except ConfigError as e:
                raise ctx.error("deepspeed", e.message, hint=e.hint) from None
            ds = _fill_autos(res.ds_json, s)
            leftover = _auto_paths(ds)
            if leftover:
                raise ctx.error("deepspeed", f"{s.deepspeed}: {leftover[0]} is \"auto\", which hpcjobs cannot "
                                "settle for the pretrain stage; write a value")
        try:
            launchers.check_ds_json_for_accelerate(ds, source=source)
            accel, notes = launchers.accelerate_yaml(
                None, num_machines=sp.nodes, num_processes=sp.world_size, deepspeed_config=ds_path,
                mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(s.precision, "no"))
            ds = scriptbatch.merge_ds_updates(ds, notes.ds_updates, updates_source=precision_from, ds_source=source)
            numbers = dsconfig.resolve_batch_numbers(ds, world_size=sp.world_size, source=source)
        except ConfigError as e:
            raise ctx.error("deepspeed", e.message, hint=e.hint) from None
        sp.ds_config = ds
        sp.extra["accelerate"] = accel
        sp.extra["batch"] = numbers._asdict()
        sp.extra["ds_source"] = source

    def sbatch(self, ctx: PlanContext):
        return time_limit_signal(ctx)

    def memory(self, plan, sp):
        """Full training of the model the size settings describe (exact parameter count), with the
        settled DeepSpeed JSON's ZeRO stage, offload, buckets and micro batch; blocks of max_seq_len
        tokens; no gradient checkpointing (the job's Trainer leaves it off); SDPA attention."""
        from ..memplan import params, report
        from ..memplan.estimate import TrainSetup

        if "memory_plan" in sp.extra:   # render, submit and the CLI all ask: predict once
            return sp.extra["memory_plan"]
        s: PretrainStage = sp.cfg
        try:
            shape = params.model_shape({"model_type": "llama", **model_config(s)})
        except (params.UnsupportedModel, ValueError, TypeError, ZeroDivisionError) as e:
            raise ConfigError(f"cannot size the model for the memory plan: {e}", key=f"{sp.name}.dim") from e
        ds = sp.ds_config or {}
        world = sp.world_size or sp.nodes * max(1, sp.gpus_per_node)
        setup = TrainSetup(
            shape=shape, world_size=world, ranks_per_node=max(1, world // max(1, sp.nodes)),
            micro_batch=report._num(ds.get("train_micro_batch_size_per_gpu"), s.micro_batch_size),
            grad_accum=report._num(ds.get("gradient_accumulation_steps"), s.grad_accum),
            seq_len=s.max_seq_len, precision=s.precision, gradient_checkpointing=False, lora_r=None,
            accelerator=plan.chain.profile.accelerator, **report.ds_numbers(ds, s.dim))
        sp.extra["memory_plan"] = report.kind_memory(
            plan, sp, shape, sp.attempt_dir / "pretrain.json", setup, [], label="full training from scratch",
            fixed=("gradient_checkpointing", "zero_stage", "offload_optimizer"))
        return sp.extra["memory_plan"]

    def preflight(self, plan, sp, composed, produced):
        s: PretrainStage = sp.cfg
        if s.hostfile and not Path(s.hostfile).is_file():
            raise composed.error(f"{sp.name}.hostfile", f"{s.hostfile} does not exist")
        if s.tokenizer not in produced:
            size = _tokenizer_size(Path(s.tokenizer))
            if size is not None and size > s.vocab_size:
                raise composed.error(f"{sp.name}.vocab_size", f"{s.vocab_size} is smaller than the tokenizer's "
                                     f"{size} tokens ({s.tokenizer})")

    # ---- files

    def files(self, plan, sp):
        s: PretrainStage = sp.cfg
        adir = sp.attempt_dir
        files: Dict[str, str] = {
            "ds_config.json": to_json(sp.ds_config),
            "accelerate.yaml": launchers.dump_yaml(sp.extra["accelerate"]),
            "pretrain.json": to_json({
                "tokenizer": s.tokenizer,
                "output_dir": s.output,
                "init_dir": s.init_output,
                "checkpoint_dir": s.checkpoints,
                "packed_dir": s.packed,
                "deepspeed_config": str(adir / "ds_config.json"),
                "resume": s.resume,
                "device": plan.chain.profile.accelerator,
                "world_size": sp.world_size,
                "data": plain(plan.chain.data),
                "model": model_config(s),
                "train": {
                    "report_to": [r for r in s.report_to if r != "none"],
                    "micro_batch_size": s.micro_batch_size,
                    "gradient_accumulation_steps": s.grad_accum,
                    "learning_rate": s.lr,
                    "min_lr_ratio": s.min_lr_ratio,
                    "warmup_steps": s.warmup_steps,
                    "weight_decay": s.weight_decay,
                    "num_train_epochs": s.epochs,
                    "max_steps": s.max_steps,
                    "max_grad_norm": s.grad_clip,
                    "precision": s.precision,
                    "max_seq_len": s.max_seq_len,
                    "logging_steps": s.logging_steps,
                    "save_steps": s.save_steps,
                    "save_total_limit": s.save_total_limit,
                    "seed": s.seed,
                },
            }),
        }
        if sp.pool is not None:
            files["hostfile.requested"] = "".join(f"{h} slots={n}\n" for h, n in sp.pool.items())
        spec = launchers.LaunchSpec(
            launcher="accelerate", program=list(PROGRAM), args=["train", "--config", str(adir / "pretrain.json")],
            nnodes=sp.nodes, nproc_per_node=sp.gpus_per_node, world_size=sp.world_size,
            allocation=str(adir / "allocation"), deepspeed_config=str(adir / "ds_config.json"),
            accelerate_config=str(adir / "accelerate.yaml"), no_local_rank=True)
        try:
            spec.validate()
        except ConfigError as e:
            raise ConfigError(f"{sp.name}: {e.message}") from None
        files["launch.json"] = spec.to_json()
        try:   # the prediction (`hpcjobs status` and `hpcjobs report` show it)
            files["memory_plan.json"] = to_json(self.memory(plan, sp).to_json())
        except ConfigError:
            pass
        return files

    def template_vars(self, plan, sp):
        return {"batch": sp.extra["batch"], "ds_source": sp.extra["ds_source"], "model": model_config(sp.cfg)}

    def progress(self, attempt_dir, log):
        """The Trainer's progress, with tokens/s: every sample is one block of max_seq_len tokens."""
        from .. import progress as progress_mod

        found = progress_mod.read(Path(attempt_dir) / "progress.jsonl")
        if found is None:
            return None
        try:
            seq = json.loads((Path(attempt_dir) / "pretrain.json").read_text())["train"]["max_seq_len"]
        except (OSError, ValueError, KeyError, TypeError):
            seq = None
        found.tokens_per_sample = seq
        return found

    def fresh(self, name, cfg):
        return [f"{name}.resume=never"], [cfg.checkpoints] if cfg is not None else []


# ---- "auto" values the HF Trainer would fill, settled here instead

def _auto_paths(node: Any, path: tuple = ()) -> List[str]:
    return scriptbatch._auto_paths(node, path)


def _fill_autos(ds: Dict[str, Any], s: PretrainStage) -> Dict[str, Any]:
    """What ``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig`` fills from the
    Trainer's arguments and the model's hidden size, from the stage's settings."""
    auto = scriptbatch.AUTO

    def put(section: Dict[str, Any], key: str, value: Any) -> None:
        if section.get(key) == auto:
            section[key] = value

    put(ds, "gradient_clipping", s.grad_clip)
    for key in ("bf16", "fp16"):
        sec = ds.get(key)
        if isinstance(sec, dict):
            put(sec, "enabled", s.precision == key)
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        put(zero, "reduce_bucket_size", s.dim * s.dim)
        put(zero, "stage3_prefetch_bucket_size", int(0.9 * s.dim * s.dim))
        put(zero, "stage3_param_persistence_threshold", 10 * s.dim)
    return ds


register(Pretrain())
