"""``grpo``: reinforcement learning with TRL's ``GRPOTrainer`` across nodes (job side:
:mod:`hpcjobs.train.grpo`, rewards :mod:`hpcjobs.train.rewards`).

Built on the ``script`` kind's launch machinery: the shipped program ``hpcjobs.train.grpo``
is started by the accelerate launcher on every node (one ``accelerate launch`` per node
under ``srun``, :mod:`hpcjobs.launchers`), with DeepSpeed ZeRO-3 (default) or ZeRO-2
through a DeepSpeed JSON whose batch numbers are settled here (:mod:`hpcjobs.scriptbatch`)
and an accelerate YAML made from yours, if you give one (``gradient_accumulation_steps:
auto`` never reaches accelerate). The job script is the script kind's (time-limit
requeue, progress.jsonl, ``HPCJOBS_*`` environment).

On the login node, before anything is queued:

* GRPO's batch rules, as the installed TRL checks them in ``GRPOConfig.__post_init__``
  (TRL 1.16.0; see :func:`grpo_batch`), with the numbers in the message;
* the DeepSpeed batch identity ``train_batch_size = micro × accumulation × world size``
  against your DeepSpeed JSON and accelerate YAML, if any;
* the reward functions: shipped ones by name, and yours, ``path/to/file.py:function`` or
  ``module:function``, read with :mod:`ast` (never imported here: no torch on the login
  node): the function exists, takes ``**kwargs`` (TRL passes ``prompts``, ``completions``,
  ``completion_ids``, ``trainer_state``, ... and the dataset's columns as keywords) and
  needs no argument TRL does not pass. A file is copied into the attempt directory
  (``code/``), so a later edit does not change what a requeue runs.

Generation is the policy model's own ``generate`` (no vLLM yet): ``grpo.generator`` is
the one setting, and :func:`hpcjobs.train.grpo.generation_settings` the one function,
where a vLLM server or colocated mode would plug in.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import MISSING

from .. import dsconfig, launchers, scriptbatch, yamlfile
from ..constraints import choice, number
from ..errors import ConfigError, HpcjobsError
from ..schema import PRECISIONS, RESUME, SCHEDULERS, SCHEDULERS_UNSUPPORTED, SEED_MAX, ZERO_STAGES, StageCfg
from ..userfiles import read_text
from . import register
from .base import PlanContext, StageKind, check_report_to, plain, report_to_setting, time_limit_signal, to_json

#: rewards shipped in hpcjobs.train.rewards (the job side implements exactly these names)
SHIPPED_REWARDS = ("target_length", "regex", "exact_match")
LENGTH_UNITS = ("chars", "tokens", "words")
#: keywords TRL 1.16.0 passes to every reward function (GRPOTrainer._calculate_rewards), besides
#: the dataset's columns other than ``prompt``
TRL_REWARD_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                     "environments")
GENERATORS = ("model",)
PROGRAM = "hpcjobs.train.grpo"


@dataclass
class RewardCfg:
    functions: List[str] = field(default_factory=lambda: ["target_length"])
    """Reward functions, summed with ``weights``: shipped ``target_length`` (``-abs(target_length -
    len(completion))``), ``regex`` (1 if the completion matches ``pattern``, else 0), ``exact_match``
    (1 if it equals the ``reference_column`` value, else 0), or yours: ``path/to/file.py:function``
    or ``module:function``, called as ``function(completions=..., **kwargs)``."""
    weights: Optional[List[float]] = number(None, ge=-1e6, le=1e6)
    """One weight per function (TRL's reward_weights); None: 1 each."""
    target_length: int = number(20, ge=0)
    """target_length: the completion length rewarded most."""
    length_unit: str = choice(*LENGTH_UNITS, default="chars")
    """target_length counts characters (as TRL's example reward), tokens or words."""
    pattern: Optional[str] = None
    """regex: a Python regular expression the whole completion (stripped) must match (DOTALL)."""
    reference_column: str = "answer"
    """exact_match: the dataset column with the expected completion."""


@dataclass
class GrpoStage(StageCfg):
    model: str = MISSING
    """Hugging Face causal LM directory (Qwen2 by default in the recipe) to train."""
    output: str = "${run.dir}/grpo"
    """The trained model (HF directory with its tokenizer)."""
    checkpoints: str = "${run.dir}/grpo-checkpoints"
    reward: RewardCfg = field(default_factory=RewardCfg)
    micro_batch_size: int = number(4, ge=1, le=65536)
    """Completions per rank per micro step (TRL's per_device_train_batch_size)."""
    grad_accum: int = number(2, ge=1)
    """gradient_accumulation_steps."""
    num_generations: int = number(8, ge=1)
    """Completions sampled per prompt (a group); at least 2."""
    steps_per_generation: Optional[int] = number(None, ge=1)
    """Micro steps one generation batch is used for; None: grad_accum (TRL's default)."""
    generation_batch_size: Optional[int] = number(None, ge=1)
    """Completions generated at once over all ranks; None: micro × world size × steps_per_generation."""
    max_completion_length: int = number(256, ge=1)
    memory_prompt_length: int = number(512, ge=1)
    """Prompt tokens the memory planner assumes for each sequence (TRL 1.16 does not truncate
    prompts, so keep the longest prompt within it); only `hpcjobs plan` and the submit check use it."""
    temperature: float = number(1.0, gt=0)
    beta: float = number(0.0, ge=0)
    """KL coefficient against the reference model; 0 (TRL's default) loads no reference model."""
    lr: float = number(1e-6, gt=0)
    max_steps: int = number(-1, ge=1, also=(-1,), message="must be a positive step count or -1 (use epochs)")
    epochs: float = number(1.0, gt=0)
    warmup_steps: int = number(0, ge=0)
    scheduler: str = choice(*SCHEDULERS, default="linear", unsupported=SCHEDULERS_UNSUPPORTED)
    max_grad_norm: float = number(1.0, ge=0)
    precision: str = choice("auto", *PRECISIONS, default="auto")
    """bf16, fp16, fp32 or auto (from profile.precision); fp16 needs a GPU."""
    gradient_checkpointing: bool = False
    logging_steps: int = number(10, ge=1)
    save_steps: int = number(100, ge=1)
    save_total_limit: int = number(2, ge=0)
    eval_steps: Optional[int] = number(None, ge=1)
    """Evaluate on the data's eval split every N steps; None: no evaluation while training."""
    eval_micro_batch_size: Optional[int] = number(None, ge=1)
    """per_device_eval_batch_size; None: micro_batch_size."""
    num_generations_eval: Optional[int] = number(None, ge=1)
    """Completions per prompt when evaluating; None: num_generations."""
    seed: int = number(42, ge=0, le=SEED_MAX)
    zero_stage: int = choice(*ZERO_STAGES, default=3)
    deepspeed: Optional[str] = None
    """Your DeepSpeed JSON instead of the generated one (its "auto" values are the Trainer's to
    fill; the batch keys are settled here and checked against the settings)."""
    accelerate_config: Optional[str] = None
    """Your accelerate YAML (e.g. the one you launch by hand); the job's is made from it."""
    generator: str = choice(*GENERATORS, default="model")
    """How completions are generated: model (the policy's own generate). vLLM is not built yet."""
    resume: str = choice(*RESUME, default="auto")
    """auto: continue from the latest checkpoint if there is one; never: start fresh."""
    report_to: List[str] = report_to_setting()
    """The Trainer's report_to integrations (tensorboard, wandb, mlflow, ...); [] or [none]: none.
    TensorBoard event files go to ``<run dir>/tensorboard/<stage>/attempt-<n>``."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment for every rank on every node, on top of the profile's."""


# --------------------------------------------------------------------------- GRPO's batch rules


def grpo_batch(*, micro: int, grad_accum: int, world: int, num_generations: int,
               steps_per_generation: Optional[int], generation_batch_size: Optional[int],
               eval_on: bool = False, eval_micro: Optional[int] = None,
               num_generations_eval: Optional[int] = None) -> Tuple[int, int]:
    """``(steps_per_generation, generation_batch_size)`` as TRL derives them; a rule broken is a
    :class:`ConfigError` whose ``key`` is the setting to change, with the numbers in its message.

    Mirrors ``trl.GRPOConfig.__post_init__`` of TRL 1.16.0 (trl/trainer/grpo_config.py), in
    its order: neither set -> steps_per_generation = gradient_accumulation_steps and
    generation_batch_size = per_device_train_batch_size × num_processes × steps_per_generation;
    only generation_batch_size -> it must divide by the global batch (per_device × processes);
    both -> refused; with evaluation on, per_device_eval_batch_size × num_processes must divide
    by num_generations_eval (or num_generations); generation_batch_size must divide by
    num_generations; num_generations >= 2.
    """
    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(message, key=key)

    per_step = micro * world
    if generation_batch_size is None and steps_per_generation is None:
        spg = grad_accum
        gbs = per_step * spg
        how = (f"micro_batch_size {micro} × world size {world} × steps_per_generation {spg} "
               f"(= grad_accum)")
    elif generation_batch_size is not None and steps_per_generation is None:
        if generation_batch_size % per_step:
            raise fail("generation_batch_size", f"{generation_batch_size} is not a multiple of the global batch "
                       f"micro_batch_size {micro} × world size {world} = {per_step}")
        gbs, spg = generation_batch_size, generation_batch_size // per_step
        how = f"generation_batch_size {gbs}"
    elif generation_batch_size is None and steps_per_generation is not None:
        spg = steps_per_generation
        gbs = per_step * spg
        how = f"micro_batch_size {micro} × world size {world} × steps_per_generation {spg}"
    else:
        raise fail("generation_batch_size", "generation_batch_size and steps_per_generation cannot both be set "
                   "(TRL derives one from the other)")
    if eval_on:
        n_eval = num_generations_eval or num_generations
        em = eval_micro or micro
        if (em * world) % n_eval:
            raise fail("num_generations_eval" if num_generations_eval else "eval_micro_batch_size",
                       f"the evaluation batch eval_micro_batch_size {em} × world size {world} = {em * world} is "
                       f"not a multiple of {'num_generations_eval' if num_generations_eval else 'num_generations'} "
                       f"{n_eval}")
    if gbs % num_generations:
        fits = [n for n in range(2, gbs + 1) if gbs % n == 0]
        raise fail("num_generations", f"{num_generations} does not divide the generation batch {how} = {gbs}: "
                   f"each prompt's {num_generations} completions must be in one generation batch"
                   + (f" (values that divide it: {', '.join(map(str, fits[:8]))})" if fits else ""))
    if num_generations < 2:
        raise fail("num_generations", f"is {num_generations}; GRPO needs at least 2 completions per prompt "
                   "to compute advantages")
    return spg, gbs


# --------------------------------------------------------------------------- reward functions


def _find_module_file(module: str, search: List[str]) -> Optional[Path]:
    """The source file of ``module`` on ``search`` without importing anything (importlib's
    find_spec would import the parent packages, which may import torch)."""
    parts = module.split(".")
    for base in search:
        if not base:
            base = os.getcwd()
        root = Path(base, *parts)
        for cand in (root.with_suffix(".py"), root / "__init__.py"):
            if cand.is_file():
                return cand
    return None


def _function_def(tree: ast.Module, name: str) -> Optional[ast.AST]:
    found = None
    for node in tree.body:  # the last top-level binding wins, as at import
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            found = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom, ast.ClassDef)):
            targets: List[str] = []
            if isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                targets = [node.target.id]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [(a.asname or a.name).split(".")[0] for a in node.names]
            elif isinstance(node, ast.ClassDef):
                targets = [node.name]
            if name in targets:
                found = node
    return found


def check_reward_function(ref: str, *, workdir: str) -> Dict[str, Any]:
    """Check one ``reward.functions`` entry on the login node; returns its job-side spec:
    ``{"name", "kind": "shipped"|"file"|"module", "function", "path"?, "module"?, "text"?,
    "required": [parameter names without a default]}``. Raises :class:`ConfigError`."""
    if ":" not in ref:
        if ref in SHIPPED_REWARDS:
            return {"name": ref, "kind": "shipped", "function": ref, "required": []}
        raise ConfigError(f"{ref!r} is not a shipped reward ({', '.join(SHIPPED_REWARDS)}) nor "
                          "path/to/file.py:function or module:function")
    target, func = ref.rsplit(":", 1)
    if not func.isidentifier():
        raise ConfigError(f"{ref}: {func!r} is not a function name")
    spec: Dict[str, Any] = {"name": func, "function": func}
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(workdir) / path
        text = read_text(path, "reward function file")
        spec.update(kind="file", path=str(path), text=text)
        where = str(path)
    else:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", target):
            raise ConfigError(f"{ref}: {target!r} is neither a .py file nor a dotted module name")
        found = _find_module_file(target, [workdir, *sys.path])
        if found is None:
            raise ConfigError(f"{ref}: module {target} not found (looked in {workdir} and the login node's "
                              "sys.path, without importing it)",
                              hint="name its file instead: path/to/file.py:function")
        text = read_text(found, "reward function module")
        spec.update(kind="module", module=target)
        where = f"module {target} ({found})"
    try:
        tree = ast.parse(text, filename=where)
    except SyntaxError as e:
        raise ConfigError(f"{ref}: {where}:{e.lineno}: syntax error: {e.msg}") from None
    node = _function_def(tree, func)
    if node is None:
        raise ConfigError(f"{ref}: {where} defines no function {func!r} at its top level")
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise ConfigError(f"{ref}: {where}:{node.lineno}: {func!r} is not defined with def, so its signature "
                          "cannot be checked without importing it",
                          hint=f"define it as def {func}(completions, **kwargs)")
    a = node.args
    line = f"{where}:{node.lineno}"
    if a.kwarg is None:
        raise ConfigError(f"{ref}: {line}: {func}({_signature(a)}) takes no **kwargs; TRL calls it as "
                          f"{func}(prompts=..., completions=..., completion_ids=..., trainer_state=..., "
                          "<each dataset column>=...)",
                          hint=f"def {func}(completions, **kwargs)")
    posonly = [p.arg for p in a.posonlyargs]
    if "completions" in posonly:
        raise ConfigError(f"{ref}: {line}: completions is positional-only; TRL passes it by keyword")
    n_def = len(a.defaults)
    ordered = a.posonlyargs + a.args
    required_pos = ordered[:len(ordered) - n_def] if n_def else ordered
    req_posonly = [p.arg for p in required_pos if p.arg in posonly]
    if req_posonly:
        raise ConfigError(f"{ref}: {line}: positional-only parameter(s) {', '.join(req_posonly)} without a "
                          "default; TRL passes everything by keyword")
    required = [p.arg for p in required_pos] + [p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    spec["required"] = required
    return spec


def _signature(a: ast.arguments) -> str:
    names = [p.arg for p in a.posonlyargs + a.args]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [p.arg for p in a.kwonlyargs]
    return ", ".join(names)


def plan_rewards(ctx: PlanContext, r: RewardCfg, key: str = "reward") -> Dict[str, Any]:
    """Check a reward block; the spec the job reads (``functions`` with their specs) and the
    files to copy (``code``). Shared with the evaluate kind's reward option."""
    if not r.functions:
        raise ctx.error(f"{key}.functions", "needs at least one reward function")
    if r.weights is not None and len(r.weights) != len(r.functions):
        raise ctx.error(f"{key}.weights", f"has {len(r.weights)} weight(s) for {len(r.functions)} function(s)")
    workdir = os.getcwd()
    funcs, code, names = [], {}, []
    for i, ref in enumerate(r.functions):
        try:
            spec = check_reward_function(str(ref), workdir=workdir)
        except ConfigError as e:
            raise ctx.error(f"{key}.functions", e.message, hint=e.hint) from None
        if spec["name"] in names:
            raise ctx.error(f"{key}.functions", f"two reward functions are named {spec['name']!r}; TRL logs "
                            "each under its name")
        names.append(spec["name"])
        text = spec.pop("text", None)
        if text is not None:
            rel = f"code/reward_{i}_{Path(spec['path']).name}"
            code[rel] = text
            spec["source"] = spec["path"]
            spec["path"] = str(ctx.sp.attempt_dir / rel)
        funcs.append(spec)
    if "regex" in r.functions:
        if not r.pattern:
            raise ctx.error(f"{key}.pattern", "the regex reward needs a pattern")
        try:
            re.compile(r.pattern)
        except re.error as e:
            raise ctx.error(f"{key}.pattern", f"{r.pattern!r} is not a regular expression: {e}") from None
    spec = {**plain(r), "functions": funcs}
    return {"spec": spec, "code": code}


def check_reward_columns(composed: Any, chain: Any, name: str, spec: Dict[str, Any], key: str = "reward") -> None:
    """Preflight: the dataset has the reference column and every column a user function requires."""
    from ..datacheck import check_dataset  # pyarrow + stdlib only

    data = getattr(chain, "data", None)
    if data is None:
        return
    try:
        columns = check_dataset(data.path, [])["columns"]
    except HpcjobsError:
        return  # the data check names the problem
    if any(f["kind"] == "shipped" and f["function"] == "exact_match" for f in spec["functions"]):
        col = spec["reference_column"]
        if col not in columns:
            raise composed.error(f"{name}.{key}.reference_column", f"{data.path} has no column {col!r} "
                                 f"(columns: {', '.join(columns)})")
    known = set(TRL_REWARD_KWARGS) | (set(columns) - {"prompt"})
    for f in spec["functions"]:
        missing = [p for p in f.get("required", []) if p not in known]
        if missing:
            raise composed.error(f"{name}.{key}.functions", f"{f['name']} requires {', '.join(missing)}, which "
                                 f"TRL does not pass: not one of its keywords ({', '.join(TRL_REWARD_KWARGS)}) "
                                 f"nor a column of {data.path} ({', '.join(columns)})",
                                 hint="give the parameter a default, or take it from **kwargs")


# --------------------------------------------------------------------------- the kind


def _ds_preset(zero_stage: int) -> Dict[str, Any]:
    ds: Dict[str, Any] = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                          "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
                          "zero_optimization": {"stage": zero_stage}}
    if zero_stage == 3:
        # the Trainer's save_model gathers the full weights only with this on (else it writes
        # a DeepSpeed checkpoint instead of a loadable model)
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


class Grpo(StageKind):
    name = "grpo"
    summary = "GRPO reinforcement learning (TRL GRPOTrainer) under accelerate + DeepSpeed across nodes"
    settings = GrpoStage
    entry_point = PROGRAM
    sections = ("model", "data")
    path_keys = ("model", "output", "checkpoints", "deepspeed", "accelerate_config")
    output_keys = ("output", "checkpoints")
    input_dirs = ("model",)
    multi_node = True
    can_resume = True

    def default_gpus(self, profile):
        return profile.train_gpus_per_node or profile.gpus_per_node

    def plan(self, ctx: PlanContext):
        s: GrpoStage = ctx.sp.cfg
        sp, p = ctx.sp, ctx.chain.profile
        check_report_to(ctx, s.report_to)
        if s.precision == "auto":
            s.precision = p.precision
        if p.accelerator == "cpu" and s.precision == "fp16":
            raise ctx.error("precision", f"fp16 needs a GPU; use fp32 or bf16 on profile {p.name} (accelerator cpu)")
        for k in s.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)):
                raise ctx.error(f"env.{k}", "not a valid environment variable name")
        sp.world_size = sp.nodes * max(sp.gpus_per_node, 1)
        sp.gpus_per_node = max(sp.gpus_per_node, 1)
        try:
            spg, gbs = grpo_batch(micro=s.micro_batch_size, grad_accum=s.grad_accum, world=sp.world_size,
                                  num_generations=s.num_generations, steps_per_generation=s.steps_per_generation,
                                  generation_batch_size=s.generation_batch_size, eval_on=bool(s.eval_steps),
                                  eval_micro=s.eval_micro_batch_size, num_generations_eval=s.num_generations_eval)
        except ConfigError as e:
            raise ctx.error(e.key or "num_generations", e.message) from None
        sp.extra["generation"] = {"steps_per_generation": spg, "generation_batch_size": gbs}
        rewards = plan_rewards(ctx, s.reward)
        sp.extra["reward"] = rewards["spec"]
        sp.extra["code"] = rewards["code"]
        self._plan_launch(ctx)
        return [], []

    def _plan_launch(self, ctx: PlanContext) -> None:
        """The script kind's accelerate + DeepSpeed resolution, for the shipped program."""
        s: GrpoStage = ctx.sp.cfg
        sp = ctx.sp
        accel_user = None
        ds_ref, ds_key = s.deepspeed, "deepspeed"
        if s.accelerate_config:
            try:
                accel_user, _ = yamlfile.read(Path(s.accelerate_config), what="accelerate config")
            except ConfigError as e:
                raise ctx.error("accelerate_config", e.message) from None
            _, accel_json = launchers.accelerate_uses_deepspeed(accel_user)
            if accel_json and not ds_ref:
                ds_ref = accel_json if os.path.isabs(accel_json) else str(Path(s.accelerate_config).parent / accel_json)
                ds_key = "accelerate_config"
        if ds_ref:
            try:
                ds_json = dsconfig.load_user_ds_config(ds_ref)
            except ConfigError as e:
                raise ctx.error(ds_key, e.message) from None
            ds_source = ds_ref
        else:
            ds_json, ds_source = _ds_preset(s.zero_stage), f"preset zero{s.zero_stage}"
        ds_path = str(sp.attempt_dir / "ds_config.json")
        precision = {"bf16": "bf16", "fp16": "fp16"}.get(s.precision, "no")
        flags = {"max_grad_norm": scriptbatch.Found(float(s.max_grad_norm), f"{sp.name}.max_grad_norm"),
                 "bf16": scriptbatch.Found(s.precision == "bf16", f"{sp.name}.precision"),
                 "fp16": scriptbatch.Found(s.precision == "fp16", f"{sp.name}.precision")}
        try:
            accel, notes = launchers.accelerate_yaml(
                accel_user, num_machines=sp.nodes, num_processes=sp.world_size, deepspeed_config=ds_path,
                mixed_precision=precision, source=s.accelerate_config or "accelerate config")
            ds_json = scriptbatch.merge_ds_updates(ds_json, notes.ds_updates,
                                                   updates_source=s.accelerate_config or "accelerate",
                                                   ds_source=ds_source)
            res = scriptbatch.resolve_batch(
                declared={"micro_batch_size": s.micro_batch_size, "grad_accum": s.grad_accum},
                from_args=flags, ds_json=ds_json, world_size=sp.world_size, hf_script=True,
                declared_source=sp.name, ds_source=ds_source)
            launchers.check_ds_json_for_accelerate(res.ds_json, source=ds_source)
        except ConfigError as e:
            key = "accelerate_config" if s.accelerate_config and "accelerate" in e.message.lower() else \
                (ds_key if ds_ref else "grad_accum")
            raise ctx.error(key, e.message, hint=e.hint) from None
        sp.ds_config = res.ds_json
        sp.extra["accelerate"] = accel
        sp.extra["accelerate_notes"] = list(notes.messages)
        sp.extra["batch"] = {"numbers": res.numbers._asdict() if res.numbers else None,
                             "provenance": res.provenance}

    def sbatch(self, ctx: PlanContext):
        return time_limit_signal(ctx)

    def memory(self, plan, sp):
        """The policy as a full training setup over prompt + completion tokens with the micro batch
        (TRL's fused log-prob head: no full logits), plus the reference model when TRL loads one
        (beta > 0; this kind trains no PEFT adapter) and the generation phase: the KV cache of the
        micro_batch × steps_per_generation sequences one rank generates at once
        (:mod:`hpcjobs.memplan.estimate`)."""
        from ..memplan import report
        from ..memplan.estimate import TrainSetup

        if "memory_plan" in sp.extra:   # render, submit and the CLI all ask: predict once
            return sp.extra["memory_plan"]
        s: GrpoStage = sp.cfg
        shape, cfg_path = report.load_shape(plan.chain, sp.name, s.model)
        ds = sp.ds_config or {}
        world = sp.world_size or sp.nodes * max(1, sp.gpus_per_node)
        micro = report._num(ds.get("train_micro_batch_size_per_gpu"), s.micro_batch_size)
        spg = sp.extra["generation"]["steps_per_generation"]
        tokens = s.memory_prompt_length + s.max_completion_length
        numbers = report.ds_numbers(ds, shape.hidden)
        if (ds.get("zero_optimization") or {}).get("stage") == "auto":
            numbers["zero_stage"] = s.zero_stage
        setup = TrainSetup(
            shape=shape, world_size=world, ranks_per_node=max(1, world // max(1, sp.nodes)), micro_batch=micro,
            grad_accum=report._num(ds.get("gradient_accumulation_steps"), s.grad_accum), seq_len=tokens,
            precision=s.precision, gradient_checkpointing=bool(s.gradient_checkpointing), lora_r=None,
            accelerator=plan.chain.profile.accelerator, ref_model=s.beta > 0, generation_batch=micro * spg,
            generation_tokens=tokens, fused_logprobs=True, **numbers)
        details = [f"generation: {micro * spg} sequences per rank at once (micro batch {micro} × "
                   f"steps_per_generation {spg}) of {tokens} tokens (prompt {s.memory_prompt_length}, "
                   f"{sp.name}.memory_prompt_length, + completion {s.max_completion_length}); reference model "
                   + (f"loaded (beta {s.beta:g})" if s.beta > 0 else "none (beta 0)")]
        # a user DeepSpeed JSON fixes the ZeRO stage; the kind has no offload setting
        fixed = ("offload_optimizer",) + (("zero_stage",) if s.deepspeed or s.accelerate_config else ())
        sp.extra["memory_plan"] = report.kind_memory(plan, sp, shape, cfg_path, setup, [], label="full GRPO",
                                                     details=details, fixed=fixed)
        return sp.extra["memory_plan"]

    def preflight(self, plan, sp, composed, produced):
        check_reward_columns(composed, plan.chain, sp.name, sp.extra["reward"])

    # ---- files

    def _config(self, plan, sp) -> Dict[str, Any]:
        s: GrpoStage = sp.cfg
        return {
            "model_path": s.model,
            "output_dir": s.output,
            "checkpoint_dir": s.checkpoints,
            "deepspeed_config": str(sp.attempt_dir / "ds_config.json"),
            "resume": s.resume,
            "device": plan.chain.profile.accelerator,
            "world_size": sp.world_size,
            "data": plain(plan.chain.data),
            "reward": sp.extra["reward"],
            "generator": s.generator,
            "train": {
                "report_to": [r for r in s.report_to if r != "none"],
                "micro_batch_size": s.micro_batch_size,
                "gradient_accumulation_steps": s.grad_accum,
                "num_generations": s.num_generations,
                "steps_per_generation": sp.extra["generation"]["steps_per_generation"],
                "generation_batch_size": sp.extra["generation"]["generation_batch_size"],
                "max_completion_length": s.max_completion_length,
                "temperature": s.temperature,
                "beta": s.beta,
                "learning_rate": s.lr,
                "max_steps": s.max_steps,
                "num_train_epochs": s.epochs,
                "warmup_steps": s.warmup_steps,
                "lr_scheduler_type": s.scheduler,
                "max_grad_norm": s.max_grad_norm,
                "precision": s.precision,
                "gradient_checkpointing": s.gradient_checkpointing,
                "logging_steps": s.logging_steps,
                "save_steps": s.save_steps,
                "save_total_limit": s.save_total_limit,
                "eval_steps": s.eval_steps,
                "eval_micro_batch_size": s.eval_micro_batch_size or s.micro_batch_size,
                "num_generations_eval": s.num_generations_eval,
                "seed": s.seed,
            },
        }

    def files(self, plan, sp):
        s: GrpoStage = sp.cfg
        files: Dict[str, str] = dict(sp.extra.get("code", {}))
        files["grpo.json"] = to_json(self._config(plan, sp))
        files["ds_config.json"] = to_json(sp.ds_config)
        files["accelerate.yaml"] = launchers.dump_yaml(sp.extra["accelerate"])
        spec = launchers.LaunchSpec(
            launcher="accelerate", program=["-m", PROGRAM], args=["--config", str(sp.attempt_dir / "grpo.json")],
            nnodes=sp.nodes, nproc_per_node=sp.gpus_per_node, world_size=sp.world_size,
            allocation=str(sp.attempt_dir / "allocation"),
            deepspeed_config=str(sp.attempt_dir / "ds_config.json"),
            accelerate_config=str(sp.attempt_dir / "accelerate.yaml"),
            env={str(k): str(v) for k, v in s.env.items()})
        try:
            spec.validate()
        except ConfigError as e:
            raise ConfigError(f"{sp.name}: {e.message}") from None
        files["launch.json"] = spec.to_json()
        try:   # the prediction (`hpcjobs status` and `hpcjobs report` show it)
            files["memory_plan.json"] = to_json(self.memory(plan, sp).to_json())
        except ConfigError:
            pass   # no readable model configuration: nothing predicted
        return files

    def template_vars(self, plan, sp):
        shown = " ".join(shlex.quote(a) for a in ["-m", PROGRAM, "--config", str(sp.attempt_dir / "grpo.json")])
        return {"launcher": "accelerate", "workdir": str(sp.attempt_dir), "program_line": shown, "sha256": None,
                "program": ["-m", PROGRAM], "batch": sp.extra.get("batch") or {},
                "accelerate_notes": sp.extra.get("accelerate_notes", []), "generation": sp.extra["generation"]}

    def progress(self, attempt_dir, log):
        from .. import progress as progress_mod

        return progress_mod.read(attempt_dir / "progress.jsonl")

    def fresh(self, name, cfg):
        return [f"{name}.resume=never"], [cfg.checkpoints] if cfg is not None else []


register(Grpo())
