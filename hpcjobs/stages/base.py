"""What a stage kind declares: the one interface between the core and a kind.

The core (config, plan, render, preflight, rerun, status, display) asks a kind
through this interface and never names one. A kind is one module in
:mod:`hpcjobs.stages` holding, in one place: its settings (a dataclass extending
:class:`hpcjobs.schema.StageCfg`), how it plans resources and which checks it
makes on the login node, the files it renders beside its script, its template
(``templates/<kind>.sbatch.j2``), its job-side entry point, whether it can
resume, and whether it writes progress.

Everything here runs on the login node: no torch, no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

if TYPE_CHECKING:  # pragma: no cover - imports for type names only (no cycle at run time)
    from ..config import Composed
    from ..plan import ChainPlan, StagePlan


@dataclass
class PlanContext:
    """What a kind's :meth:`StageKind.plan` sees: the whole chain, and its own stage's plan."""

    composed: "Composed"
    chain: Any          # the resolved, typed configuration
    sp: "StagePlan"     # this stage's plan; ``sp.cfg`` is its resolved settings
    seconds: Optional[int]   # the stage's time limit in seconds (None: unlimited)

    def error(self, key: str, message: str, hint: Optional[str] = None):
        """A ConfigError for ``<stage>.<key>`` (or an absolute key containing a dot) naming its source."""
        from ..schema import RESERVED  # top-level sections; a stage can't be named like one

        full = key if key.split(".")[0] in RESERVED else f"{self.sp.name}.{key}"
        return self.composed.error(full, message, hint=hint)


class StageKind:
    """Base class of stage kinds; a kind module defines one subclass and registers an instance."""

    name: str = ""
    summary: str = ""
    settings: type = object
    """The settings dataclass (extends schema.StageCfg); the stage's section is typed by it."""
    entry_point: Optional[str] = None
    """The job-side module the template runs (``python -m ...``), for `--help` and docs."""
    sections: Tuple[str, ...] = ()
    """Top-level sections besides run/profile its settings refer to (``model``, ``data``)."""
    path_keys: Tuple[str, ...] = ()
    """Settings holding paths: made absolute on the login node (jobs run elsewhere)."""
    output_keys: Tuple[str, ...] = ("output",)
    """Settings naming what the stage produces (later stages may take them as inputs)."""
    input_dirs: Tuple[str, ...] = ()
    """Settings naming directories that must exist, or be produced by an earlier stage."""
    multi_node: bool = False
    """Spans ``run.nodes`` nodes (one task per node) unless ``<stage>.nodes`` says otherwise."""
    launch_options: bool = False
    """``--hostfile``/``--include``/``--exclude`` on the command line apply to this kind."""
    can_resume: bool = False
    """Continues from its checkpoints after a requeue or a rerun (``rerun --fresh`` starts over)."""

    @property
    def template(self) -> str:
        return f"{self.name}.sbatch.j2"

    # ---- login node: planning and checks

    def default_gpus(self, profile: Any) -> int:
        """GPUs per node when the stage does not say."""
        return 0

    def plan(self, ctx: PlanContext) -> Tuple[List[str], List[str]]:
        """Check the settings and settle resources on ``ctx.sp`` (nodes, gpus, world size, ...).

        Returns Slurm's ``--nodelist`` and ``--exclude`` hosts. Raise ``ctx.error(key, msg)``.
        """
        return [], []

    def sbatch(self, ctx: PlanContext) -> Dict[str, Optional[str]]:
        """Extra ``#SBATCH`` options (e.g. ``signal``, ``requeue``)."""
        return {}

    def preflight(self, plan: "ChainPlan", sp: "StagePlan", composed: "Composed", produced: Set[str]) -> None:
        """Login-node checks of the stage's input files (``render`` warns, ``submit`` refuses)."""

    def memory(self, plan: "ChainPlan", sp: "StagePlan") -> Any:
        """The predicted memory of a planned training stage (a
        :class:`hpcjobs.memplan.report.StageMemory`), or None for a kind that does not train.

        ``hpcjobs plan`` prints it; render and submit show the verdict, write it to the attempt's
        ``memory_plan.json``, and submit refuses a stage that does not fit. A kind whose settings
        take ``auto`` values chooses them in :meth:`plan` (before its files are rendered). Raise a
        ConfigError when the prediction is impossible (e.g. no readable model configuration)."""
        return None

    # ---- rendering

    def files(self, plan: "ChainPlan", sp: "StagePlan") -> Dict[str, str]:
        """Files written beside the stage's script in its attempt directory: name -> text."""
        return {}

    def template_vars(self, plan: "ChainPlan", sp: "StagePlan") -> Dict[str, Any]:
        """Extra variables for the kind's template."""
        return {}

    def progress(self, attempt_dir: Any, log: Any) -> Any:
        """Training progress of an attempt (a :class:`hpcjobs.progress.Progress`), or None."""
        return None

    # ---- reruns

    def fresh(self, name: str, cfg: Any) -> Tuple[List[str], List[str]]:
        """For ``rerun --fresh``: overrides for this attempt, and directories to move aside.

        ``cfg`` is the stage's resolved settings, or None when only the overrides are wanted
        (before the rerun is planned)."""
        return [], []


def relative_outputs(stages: Sequence[Tuple[StageKind, Any]]) -> Set[str]:
    """Every output path the given (kind, resolved settings) pairs produce."""
    out: Set[str] = set()
    for kind, cfg in stages:
        for key in kind.output_keys:
            value = getattr(cfg, key, None)
            if value:
                out.add(str(value))
    return out


# ---- small helpers the kinds share

def to_json(data: Any) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def plain(obj: Any) -> Any:
    """A settings dataclass as a plain dict (for the JSON files jobs read)."""
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj


def torch_dtype(value: str, precision: str) -> str:
    """A ``dtype`` setting, with ``auto`` taken from a precision (bf16 -> bfloat16, ...)."""
    if value != "auto":
        return value
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]


def report_to_setting():
    """A training kind's ``report_to``: the Trainer's integrations; TensorBoard by default, its
    event files in ``<run dir>/tensorboard/<stage>/attempt-<n>`` (the job template exports
    ``TENSORBOARD_LOGGING_DIR``). [] or [none]: none besides progress.jsonl."""
    from ..constraints import choices
    from ..schema import REPORT_TO, REPORT_TO_UNSUPPORTED

    return choices(*REPORT_TO, default_factory=lambda: ["tensorboard"], unsupported=REPORT_TO_UNSUPPORTED)


def check_report_to(ctx: PlanContext, values: Sequence[str]) -> List[str]:
    """The integrations to hand the Trainer ("none" alone turns reporting off)."""
    if "none" in values and len(values) > 1:
        raise ctx.error("report_to", "none turns reporting off; it cannot go with "
                        + ", ".join(r for r in values if r != "none"))
    return [r for r in values if r != "none"]


def time_limit_signal(ctx: PlanContext) -> Dict[str, Optional[str]]:
    """``#SBATCH`` options of a stage that checkpoints at its time limit and requeues itself:
    SIGUSR2 ``profile.signal_grace`` seconds before the limit (NCCL uses USR1)."""
    grace = ctx.chain.profile.signal_grace
    if ctx.seconds is not None and grace >= ctx.seconds:
        raise ctx.error("profile.signal_grace", f"{grace}s is not shorter than the stage's time limit {ctx.sp.time}")
    return {"signal": f"B:USR2@{grace}", "requeue": ""}
