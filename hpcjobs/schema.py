"""The configuration schema: every setting hpcjobs knows, its type and its package default.

This module is the one place a setting is defined. Layers (cluster profile,
recipe, the user's config files, command-line overrides) may only set keys
that exist here, with values of the declared type; OmegaConf enforces both
when the layers are merged (see :mod:`hpcjobs.config`).

The tree a chain is rendered from::

    recipe:    name and description of the recipe
    pipeline:  the stages, in submission order, each with its kind and upstream stages
    run:       chain-wide settings (name, node count, where run directories go)
    profile:   the cluster (partition, GPUs per node, modules, NCCL environment, ...)
    model:     the input model
    data:      the training data set
    <stage>:   one section per pipeline stage, typed by the stage's kind

``None`` for a resource means "derive it from the profile" (see
:func:`hpcjobs.plan.stage_resources`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from .constraints import choice, number, slurm_mem, text_template

# Every choice below is a closed set and every number has a range, declared with the
# key (hpcjobs/constraints.py) and checked when the chain is composed, before anything
# is rendered or submitted. The sets are what the job-side code accepts.

PRECISIONS = ("bf16", "fp16", "fp32")
ACCELERATORS = ("cuda", "cpu")

# Weight dtypes: hpcjobs/train/convert.py DTYPES (auto keeps the checkpoint's) and
# merge.py DTYPES; for merge, render.py turns auto into the profile's precision.
DTYPES = ("auto", "float32", "float16", "bfloat16")
# hpcjobs/train/convert.py --llama-version (CONTEXT_LENGTH, DEFAULT_NORM_EPS).
LLAMA_VERSIONS = (1, 2)
ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu")
# peft.LoraConfig.bias.
LORA_BIAS = ("none", "all", "lora_only")
RESUME = ("auto", "never")
# What prepare, finetune and evaluate do with the data (hpcjobs/train/tasks): a causal LM's next
# tokens, a sequence(-pair) classifier's label, an encoder-decoder's target text.
TASKS = ("causal-lm", "classification", "seq2seq")
# The metrics a training stage's evaluation logs per task (the Trainer prefixes them eval_):
# best_metric picks one, and its direction (loss: lower is better).
TASK_METRICS = {"causal-lm": ("loss",), "classification": ("loss", "accuracy", "f1"),
                "seq2seq": ("loss", "rouge1", "rouge2", "rougeL")}
# finetune.strategy: one name for a parallelism setup, as the hand-written runs named them
# -> (zero_stage, offload_optimizer, offload_param); ddp runs without DeepSpeed.
STRATEGIES = {"ddp": (0, "none", "none"), "zero1": (1, "none", "none"), "zero2": (2, "none", "none"),
              "zero2-offload": (2, "cpu", "none"), "zero3": (3, "none", "none"),
              "zero3-offload": (3, "cpu", "cpu")}
# numpy's seed range (transformers.set_seed seeds numpy's legacy generator).
SEED_MAX = 2 ** 32 - 1
# Slurm's --signal=[B:]SIG@TIME takes 0..65535 seconds.
SIGNAL_GRACE_MAX = 65535

# [e.value for e in transformers.SchedulerType], transformers 5.24.0. The login node does
# not import transformers; tests/test_constraints.py (marked train) compares this with the
# installed version.
SCHEDULER_TYPES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy",
)
# Schedulers the finetune job cannot build: they need lr_scheduler_kwargs, which it does not pass.
_NEEDS_MIN_LR = "needs lr_scheduler_kwargs (min_lr or min_lr_rate), which hpcjobs does not pass to the Trainer"
SCHEDULERS_UNSUPPORTED = {
    "cosine_with_min_lr": _NEEDS_MIN_LR,
    "cosine_warmup_with_min_lr": _NEEDS_MIN_LR,
    "warmup_stable_decay": "needs lr_scheduler_kwargs (num_decay_steps), which hpcjobs does not pass to the Trainer",
}
SCHEDULERS = tuple(s for s in SCHEDULER_TYPES if s not in SCHEDULERS_UNSUPPORTED)
# Schedulers stepped on an evaluation metric: the Trainer refuses them without evaluation.
SCHEDULERS_NEEDING_EVAL = ("reduce_lr_on_plateau", "greedy")

# The Trainer's report_to integrations: transformers.integrations.INTEGRATION_TO_CALLBACK,
# transformers 5.24.0 (checked like SCHEDULER_TYPES), and "none". Each needs its package in the
# jobs' environment (tensorboard is in the train extra); they read their own environment
# variables (WANDB_MODE, MLFLOW_TRACKING_URI, ...), which reach every rank.
REPORT_TO_INTEGRATIONS = (
    "azure_ml", "comet_ml", "mlflow", "neptune", "tensorboard", "trackio", "wandb", "codecarbon",
    "clearml", "dagshub", "flyte", "dvclive", "swanlab", "kubeflow",
)
REPORT_TO = (*REPORT_TO_INTEGRATIONS, "none")
REPORT_TO_UNSUPPORTED = {"all": "reports to whatever happens to be installed on the nodes; name the integrations"}

# [e.value for e in transformers.training_args.OptimizerNames], transformers 5.24.0 (checked
# like SCHEDULER_TYPES). Some need extra packages in the jobs' environment (bitsandbytes, ...).
OPTIMIZER_NAMES = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit",
    "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
    "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw",
    "apollo_adamw_layerwise", "stable_adamw",
)


@dataclass
class RecipeInfo:
    name: str = MISSING
    description: str = ""


@dataclass
class PipelineEntry:
    kind: str = MISSING
    """A registered stage kind (`hpcjobs kinds` lists them): decides the template and the settings."""
    after: List[str] = field(default_factory=list)
    """Stages that must complete first (Slurm ``--dependency=afterok``)."""


@dataclass
class RunCfg:
    name: Optional[str] = None
    """Chain name (letters, digits, '.', '_', '-'); defaults to the recipe name."""
    nodes: int = number(1, ge=1, message="needs at least 1 node")
    """Nodes for multi-node stages (``--nodes``)."""
    root: str = "${profile.runs_root}"
    """Directory that holds one run directory per chain; must be on a filesystem every node sees."""
    id: Optional[str] = None
    """Set by hpcjobs: the chain id."""
    dir: Optional[str] = None
    """Set by hpcjobs: this chain's run directory (``<root>/<id>``)."""


@dataclass
class ContainerCfg:
    image: Optional[str] = None
    """Container image; stage commands then run inside it."""
    runtime: str = "apptainer"
    """``apptainer`` (``apptainer exec [--nv] IMAGE python ...``); the only runtime supported so far."""
    mounts: List[str] = field(default_factory=list)
    """Bind mounts, ``SRC[:DST]``; the run root is always mounted."""


@dataclass
class ProfileCfg:
    name: str = MISSING
    description: str = ""
    slurm_conf: Optional[str] = None
    """SLURM_CONF for every Slurm command hpcjobs runs (None: the site default)."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    reservation: Optional[str] = None
    accelerator: str = choice(*ACCELERATORS, default="cuda")
    """``cuda`` (NCCL, bf16) or ``cpu`` (gloo; fake GPUs on the devcluster)."""
    gpus_per_node: int = number(8, ge=0)
    train_gpus_per_node: Optional[int] = number(None, ge=1)
    """GPUs (ranks) per node a finetune stage uses unless it says otherwise; None: all of them."""
    gpu_type: Optional[str] = None
    """GRES type for ``--gpus-per-node=TYPE:N`` (e.g. ``a800``); None asks for any GPU."""
    cpus_per_node: int = number(32, ge=1)
    mem_per_node: Optional[str] = slurm_mem(None)
    """Memory a whole-node stage asks for (``--mem``), e.g. ``1000G``; None: site default."""
    gpu_mem: Optional[str] = slurm_mem(None)
    """Memory of one GPU, e.g. ``80G`` (A800) or ``40G`` (A100), for ``hpcjobs plan``; None: unknown."""
    gpu_mem_margin: Optional[str] = slurm_mem(None)
    """GPU memory the planner keeps free when it chooses ``auto`` values (allocator fragmentation,
    what the prediction leaves out), e.g. ``6G``; None: 10% of gpu_mem."""
    precision: str = choice(*PRECISIONS, default="bf16")
    """Default training/conversion precision on this cluster: bf16, fp16 or fp32."""
    python: str = "python3"
    """Python inside jobs (after ``modules`` and ``setup``); it needs ``hpcjobs[train]``."""
    modules: List[str] = field(default_factory=list)
    """Environment modules loaded in every stage (``module load ...``)."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run in every stage before the stage's command (e.g. activating a venv)."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment for every stage and every rank (NCCL_*, TORCH_NCCL_*, ...)."""
    container: ContainerCfg = field(default_factory=ContainerCfg)
    time_limit: str = "1-00:00:00"
    """Default ``--time`` for a stage."""
    runs_root: str = "~/hpcjobs-runs"
    """Default for ``run.root``."""
    max_requeues: int = number(3, ge=0)
    """How often a stage that reaches its time limit requeues itself."""
    signal_grace: int = number(300, ge=1, le=SIGNAL_GRACE_MAX)
    """Seconds before the time limit at which a stage gets SIGUSR2 to checkpoint."""
    sbatch: Dict[str, str] = field(default_factory=dict)
    """Extra ``#SBATCH`` options for every stage, e.g. ``{constraint: ib}``."""
    expected_busbw: Optional[float] = number(None, gt=0)
    """All-reduce bus bandwidth (GB/s, as nccl-tests reports it) a ``commcheck`` stage expects
    at least; None: the check reports bandwidth and fails on nothing."""


@dataclass
class ModelCfg:
    source: str = MISSING
    """Meta checkpoint directory (consolidated.*.pth, params.json, tokenizer.model) or a Hugging Face directory."""


@dataclass
class DataCfg:
    path: str = MISSING
    """Training data: .parquet, .jsonl, .json or .csv."""
    columns: List[str] = field(default_factory=list)
    """Columns the text template uses; checked before submission."""
    template: str = text_template(MISSING)
    """Python format string building each training text from the columns: plain ``{column}`` fields."""
    split: List[float] = number(default_factory=lambda: [0.8, 0.1, 0.1], ge=0, le=1)
    """Train / eval / test fractions."""
    seed: int = number(42, ge=0, le=SEED_MAX)


@dataclass
class StageCfg:
    """Resources every stage has. None: derived from the profile."""

    nodes: Optional[int] = number(None, ge=1)
    gpus_per_node: Optional[int] = number(None, ge=0)
    cpus_per_task: Optional[int] = number(None, ge=1)
    mem: Optional[str] = slurm_mem(None)
    time: Optional[str] = None
    sbatch: Dict[str, str] = field(default_factory=dict)
    """Extra ``#SBATCH`` options for this stage only."""


# Top-level sections that are not stages; a stage may not take one of these names.
RESERVED = ("recipe", "pipeline", "run", "profile", "model", "data")


def top_level_schema(stage_kinds: Dict[str, str]) -> Dict[str, Any]:
    """The structured nodes for a pipeline whose stages have the given kinds.

    Each stage's section is typed by its kind's settings (:mod:`hpcjobs.stages`);
    ``model`` and ``data`` are there when a kind of the pipeline refers to them.
    """
    from . import stages  # the kinds import this module for StageCfg

    tree: Dict[str, Any] = {
        "recipe": RecipeInfo,
        "pipeline": Dict[str, PipelineEntry],
        "run": RunCfg,
        "profile": ProfileCfg,
        "model": ModelCfg,
        "data": DataCfg,
    }
    wanted = {sec for kind in stage_kinds.values() for sec in stages.get(kind).sections}
    for section in ("model", "data"):
        if section not in wanted:
            del tree[section]
    for name, kind in stage_kinds.items():
        tree[name] = stages.get(kind).settings
    return tree
