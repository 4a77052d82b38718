"""Checks of a plan against the world before anything is submitted.

``check_inputs`` reads files only (render runs it too); ``check_cluster`` asks
Slurm (``sinfo``) whether the partition can hold the chain (submit only).
Each failure names the setting and where its value came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Set

from .config import Composed
from .errors import ConfigError, HpcjobsError
from .plan import ChainPlan
from .slurm import Slurm, gres_gpus


def _produced_paths(plan: ChainPlan) -> Set[str]:
    """Outputs of the chain's own stages: inputs that will exist once upstream stages ran."""
    out = set()
    for sp in plan.stages:
        for key in ("output", "checkpoints"):
            value = getattr(sp.cfg, key, None)
            if value:
                out.add(str(value))
    return out


def _meta_or_hf(path: Path) -> str:
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        if not (path / "tokenizer.model").is_file():
            return "meta-no-tokenizer"
        return "meta"
    return ""


def check_inputs(plan: ChainPlan, composed: Composed) -> None:
    produced = _produced_paths(plan)
    chain = plan.chain
    for sp in plan.stages:
        s, name = sp.cfg, sp.name
        if sp.kind == "convert":
            src = Path(s.input)
            if not src.is_dir():
                raise composed.error(f"{name}.input", f"{src} is not a directory")
            kind = _meta_or_hf(src)
            if kind == "meta-no-tokenizer":
                raise composed.error(f"{name}.input", f"{src} has a Meta checkpoint but no tokenizer.model "
                                     "(Meta ships it beside the llama-2-* folders: copy it in)")
            if not kind:
                raise composed.error(f"{name}.input", f"{src} is neither a Meta checkpoint "
                                     "(params.json, consolidated.*.pth, tokenizer.model) nor a Hugging Face "
                                     "model (config.json)")
        for key in ("model", "base", "adapter", "merged"):
            value = getattr(s, key, None) if sp.kind != "command" else None
            if value and value not in produced and not Path(value).is_dir():
                raise composed.error(f"{name}.{key}", f"{value} does not exist and no earlier stage "
                                     "produces it")
        if sp.kind == "evaluate" and s.prompts:
            p = Path(s.prompts)
            if not p.is_file() or not p.read_text().strip():
                raise composed.error(f"{name}.prompts", f"{p} is missing or empty")
        if sp.kind == "finetune":
            for key in ("hostfile", "deepspeed_config"):
                value = getattr(s, key)
                if value and not Path(value).is_file():
                    raise composed.error(f"{name}.{key}", f"{value} does not exist")
    if hasattr(chain, "data"):
        _check_data(chain.data, composed)


def _check_data(data, composed: Composed) -> None:
    from .datacheck import check_dataset, template_fields  # pyarrow + stdlib only

    try:
        fields = template_fields(data.template)
    except HpcjobsError as e:
        raise composed.error("data.template", e.message) from None
    unknown = [f for f in fields if data.columns and f not in data.columns]
    if unknown:
        raise composed.error("data.template", f"uses {', '.join(unknown)} which data.columns does not list "
                             f"({', '.join(data.columns)})")
    try:
        check_dataset(data.path, list(data.columns) or fields)
    except HpcjobsError as e:
        raise composed.error("data.path", e.message) from None
    if len(data.split) != 3 or abs(sum(data.split) - 1) > 1e-6 or min(data.split) < 0:
        raise composed.error("data.split", f"must be three non-negative fractions (train, eval, test) "
                             f"summing to 1, got {list(data.split)}")


def check_cluster(plan: ChainPlan, composed: Composed, slurm: Slurm) -> None:
    """The partition exists and has the nodes and GPUs each stage asks for."""
    conf = plan.chain.profile.slurm_conf
    if conf and not Path(conf).is_file():
        raise composed.error("profile.slurm_conf", f"{conf} does not exist",
                             hint="for profile local, start the cluster first: hpcjobs devcluster up"
                             if plan.profile == "local" else None)
    partition = plan.chain.profile.partition
    nodes = slurm.partition_nodes(partition)
    where = f"partition {partition}" if partition else "the default partition"
    if not nodes:
        raise composed.error("profile.partition", f"Slurm reports no nodes in {where}")
    for sp in plan.stages:
        key = "run.nodes" if sp.kind == "finetune" and sp.cfg.nodes is None else f"{sp.name}.nodes"
        if sp.nodes > len(nodes):
            raise composed.error(key, f"stage {sp.name} asks for {sp.nodes} nodes but {where} has "
                                 f"{len(nodes)} ({', '.join(sorted(nodes))})")
        wanted = [h for h in (sp.sbatch.get("nodelist") or "").split(",") if h]
        missing = [h for h in wanted if h not in nodes]
        if missing:
            raise composed.error(f"{sp.name}.include" if getattr(sp.cfg, "include", "") else
                                 f"{sp.name}.hostfile", f"{', '.join(missing)} not in {where} "
                                 f"(nodes: {', '.join(sorted(nodes))})")
        if sp.gpus_per_node:
            have = max(gres_gpus(n["gres"]) for n in nodes.values())
            if sp.gpus_per_node > have:
                raise ConfigError(f"stage {sp.name} asks for {sp.gpus_per_node} GPUs per node but nodes of "
                                  f"{where} have at most {have}")
