"""``evaluate``: before/after generations and held-out loss (job side: :mod:`hpcjobs.train.evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from ..constraints import choice, number
from ..errors import ConfigError
from ..schema import TASKS, StageCfg
from ..userfiles import read_text
from . import register
from .base import StageKind, plain, to_json
from .grpo import RewardCfg, check_reward_columns, plan_rewards


@dataclass
class EvaluateStage(StageCfg):
    base: str = MISSING
    merged: str = MISSING
    prompts: Optional[str] = None
    """Prompts file, one prompt per line; None: the first test-split rows without the answer column."""
    max_new_tokens: int = number(150, ge=1)
    max_seq_length: int = number(512, ge=1)
    """Length the held-out texts are cut to for the loss (as in training)."""
    output: str = "${run.dir}/eval"
    prepared: Optional[str] = None
    """A prepare stage's output: its test split (tokens and labels as trained) instead of data.*."""
    base_label: str = "base"
    """How the report names the first model (e.g. ``untrained init``)."""
    merged_label: str = "merged"
    """How the report names the second model (e.g. ``pretrained``)."""
    reward: RewardCfg = field(default_factory=lambda: RewardCfg(functions=[]))
    """Reward functions (a grpo stage's ``reward`` block): with any, the report also has the mean
    reward of greedy completions on held-out prompts (the test split), base vs merged."""
    reward_prompts: int = number(32, ge=1)
    """Held-out prompts the reward is measured on (the first of the test split)."""
    task: str = choice(*TASKS, default="causal-lm")
    """causal-lm: held-out loss and generations; classification: accuracy and F1 on the
    validation (eval) and test splits and the test predictions; seq2seq: ROUGE-1/2/L on both
    and before/after outputs. The last two read a prepare stage's output (``prepared``)."""


class Evaluate(StageKind):
    name = "evaluate"
    summary = "base vs finetuned: held-out loss + generations, accuracy/F1 or ROUGE by task; eval/report.md"
    settings = EvaluateStage
    entry_point = "hpcjobs.train.evaluate"
    sections = ("data",)
    path_keys = ("base", "merged", "prompts", "output", "prepared")
    input_dirs = ("base", "merged", "prepared")

    def default_gpus(self, profile):
        return min(1, profile.gpus_per_node)

    def plan(self, ctx):
        s = ctx.sp.cfg
        if s.task != "causal-lm" and not s.prepared:
            raise ctx.error("prepared", f"task {s.task} evaluates on a prepare stage's output",
                            hint=f"set {ctx.sp.name}.prepared to the prepare stage's output")
        if s.task != "causal-lm" and s.reward.functions:
            raise ctx.error("reward", f"rewards score generated text of a causal LM, not task {s.task}")
        if ctx.sp.cfg.reward.functions:
            ctx.sp.extra["reward"] = plan_rewards(ctx, ctx.sp.cfg.reward)
        return [], []

    def preflight(self, plan, sp, composed, produced):
        s = sp.cfg
        if "reward" in sp.extra:
            check_reward_columns(composed, plan.chain, sp.name, sp.extra["reward"]["spec"])
        if not s.prompts:
            return
        try:
            text = read_text(s.prompts, "prompts file")
        except ConfigError as e:
            raise composed.error(f"{sp.name}.prompts", e.message) from None
        if not text.strip():
            raise composed.error(f"{sp.name}.prompts", f"{s.prompts}: prompts file has no prompts "
                                 "(one per line, blank lines are ignored)")

    def files(self, plan, sp):
        s = sp.cfg
        # The same shape as a finetune's train.json, so the held-out split is built the same way.
        reward = sp.extra.get("reward")
        return {**(reward["code"] if reward else {}), "eval.json": to_json({
            **({"reward": {**reward["spec"], "prompts": s.reward_prompts}} if reward else {}),
            "task": s.task,
            "model_path": s.base,
            "output_dir": s.output,
            "device": plan.chain.profile.accelerator,
            "data": plain(plan.chain.data),
            "prepared": s.prepared,
            "labels": {"base": s.base_label, "merged": s.merged_label},
            "train": {"max_seq_length": s.max_seq_length},
        })}


register(Evaluate())
