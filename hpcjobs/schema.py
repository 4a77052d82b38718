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

PRECISIONS = ("bf16", "fp16", "fp32")
ACCELERATORS = ("cuda", "cpu")
STAGE_KINDS = ("command", "convert", "finetune", "merge", "evaluate")


@dataclass
class RecipeInfo:
    name: str = MISSING
    description: str = ""


@dataclass
class PipelineEntry:
    kind: str = MISSING
    """One of STAGE_KINDS: decides the stage's template and its settings."""
    after: List[str] = field(default_factory=list)
    """Stages that must complete first (Slurm ``--dependency=afterok``)."""


@dataclass
class RunCfg:
    name: Optional[str] = None
    """Chain name (letters, digits, '.', '_', '-'); defaults to the recipe name."""
    nodes: int = 1
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
    accelerator: str = "cuda"
    """``cuda`` (NCCL, bf16) or ``cpu`` (gloo; fake GPUs on the devcluster)."""
    gpus_per_node: int = 8
    train_gpus_per_node: Optional[int] = None
    """GPUs (ranks) per node a finetune stage uses unless it says otherwise; None: all of them."""
    gpu_type: Optional[str] = None
    """GRES type for ``--gpus-per-node=TYPE:N`` (e.g. ``a800``); None asks for any GPU."""
    cpus_per_node: int = 32
    mem_per_node: Optional[str] = None
    """Memory a whole-node stage asks for (``--mem``), e.g. ``1000G``; None: site default."""
    precision: str = "bf16"
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
    max_requeues: int = 3
    """How often a stage that reaches its time limit requeues itself."""
    signal_grace: int = 300
    """Seconds before the time limit at which a stage gets SIGUSR2 to checkpoint."""
    sbatch: Dict[str, str] = field(default_factory=dict)
    """Extra ``#SBATCH`` options for every stage, e.g. ``{constraint: ib}``."""


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
    template: str = MISSING
    """Python format string building each training text from the columns."""
    split: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train / eval / test fractions."""
    seed: int = 42


@dataclass
class StageCfg:
    """Resources every stage has. None: derived from the profile."""

    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    time: Optional[str] = None
    sbatch: Dict[str, str] = field(default_factory=dict)
    """Extra ``#SBATCH`` options for this stage only."""


@dataclass
class CommandStage(StageCfg):
    command: str = MISSING
    """Shell commands run as the stage body (your own shell code, used as written)."""


@dataclass
class ConvertStage(StageCfg):
    input: str = "${model.source}"
    """Meta checkpoint or Hugging Face directory; a Hugging Face one passes through."""
    output: str = "${run.dir}/hf-model"
    llama_version: int = 2
    dtype: str = "auto"
    """float32, float16, bfloat16 or auto (from profile.precision)."""


@dataclass
class LoraCfg:
    r: int = 8
    alpha: int = 8
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"


@dataclass
class FinetuneStage(StageCfg):
    model: str = MISSING
    """Hugging Face model directory to finetune (recipes wire it to the convert output)."""
    output: str = "${run.dir}/adapter"
    checkpoints: str = "${run.dir}/checkpoints"
    lora: LoraCfg = field(default_factory=LoraCfg)
    micro_batch_size: int = 16
    """Per-GPU micro batch (train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    lr: float = 1e-3
    max_steps: int = 200
    """-1: train for ``epochs`` instead."""
    epochs: float = 1.0
    warmup_steps: int = 100
    scheduler: str = "cosine"
    max_seq_length: int = 512
    gradient_checkpointing: bool = True
    precision: str = "auto"
    """bf16, fp16, fp32 or auto (from profile.precision)."""
    max_grad_norm: float = 0.3
    optim: str = "adamw_torch"
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    eval_steps: Optional[int] = None
    seed: int = 42
    zero_stage: int = 2
    offload_optimizer: str = "none"
    """none or cpu: optimizer states in host memory (ZeRO-Offload); the Trainer's torch AdamW steps them."""
    offload_param: str = "none"
    """none or cpu; ZeRO stage 3 only."""
    deepspeed_config: Optional[str] = None
    """Your own DeepSpeed JSON instead of the generated one; its batch numbers are checked."""
    hostfile: Optional[str] = None
    """DeepSpeed hostfile (``host slots=N``): the job asks Slurm for exactly these hosts."""
    include: str = ""
    """DeepSpeed ``--include`` spec, e.g. ``node1:0,1@node2:0``."""
    exclude: str = ""
    """DeepSpeed ``--exclude`` spec."""
    resume: str = "auto"
    """auto: continue from the latest checkpoint if there is one; never: start fresh."""


@dataclass
class MergeStage(StageCfg):
    base: str = MISSING
    adapter: str = MISSING
    output: str = "${run.dir}/merged"
    dtype: str = "auto"


@dataclass
class EvaluateStage(StageCfg):
    base: str = MISSING
    merged: str = MISSING
    prompts: Optional[str] = None
    """Prompts file, one prompt per line; None: the first test-split rows without the answer column."""
    max_new_tokens: int = 150
    max_seq_length: int = 512
    """Length the held-out texts are cut to for the loss (as in training)."""
    output: str = "${run.dir}/eval"


STAGE_SCHEMAS: Dict[str, type] = {
    "command": CommandStage,
    "convert": ConvertStage,
    "finetune": FinetuneStage,
    "merge": MergeStage,
    "evaluate": EvaluateStage,
}

# Top-level sections that are not stages; a stage may not take one of these names.
RESERVED = ("recipe", "pipeline", "run", "profile", "model", "data")


def top_level_schema(stage_kinds: Dict[str, str]) -> Dict[str, Any]:
    """The structured nodes for a pipeline whose stages have the given kinds."""
    tree: Dict[str, Any] = {
        "recipe": RecipeInfo,
        "pipeline": Dict[str, PipelineEntry],
        "run": RunCfg,
        "profile": ProfileCfg,
        "model": ModelCfg,
        "data": DataCfg,
    }
    kinds = set(stage_kinds.values())
    if not kinds & {"convert"}:
        del tree["model"]
    if not kinds & {"finetune", "evaluate"}:
        del tree["data"]
    for name, kind in stage_kinds.items():
        tree[name] = STAGE_SCHEMAS[kind]
    return tree
