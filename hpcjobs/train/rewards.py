"""Reward functions of the ``grpo`` stage, and the prompt data both GRPO and evaluate read.

Every reward is called the way TRL's ``GRPOTrainer`` calls one (TRL 1.16.0,
``_calculate_rewards``): ``f(prompts=..., completions=..., completion_ids=..., trainer_state=...,
<each dataset column but prompt>=...)`` and returns one float (or None) per completion.

Shipped (the names :data:`hpcjobs.stages.grpo.SHIPPED_REWARDS` accepts):

``target_length``
    ``-abs(target_length - len(completion))``, the length in characters (TRL's example reward),
    tokens (``completion_ids``, as generated: up to and including the end-of-sequence token)
    or whitespace-separated words.
``regex``
    1.0 when the completion, stripped, matches ``pattern`` as a whole (``re.fullmatch``,
    ``re.DOTALL``), else 0.0: a format reward.
``exact_match``
    1.0 when the completion, stripped, equals the row's ``reference_column`` value, stripped.

Yours, ``path/to/file.py:function`` (the copy hpcjobs made at submission) or
``module:function``, are imported here, in the job.

The reward spec (``grpo.json``'s ``reward``) comes from :func:`hpcjobs.stages.grpo.plan_rewards`.
The functions are plain Python (no torch), so the evaluate stage scores greedy completions with
exactly the functions GRPO trained on.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence

from hpcjobs.errors import HpcjobsError

PROMPT = "prompt"


def _text(completion: Any) -> str:
    """A completion's text: a string, or the last message of a conversational completion."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return "" if completion is None else str(completion)


def target_length_reward(target: int, unit: str) -> Callable[..., List[float]]:
    def target_length(completions, completion_ids=None, **kwargs) -> List[float]:
        if unit == "tokens":
            if completion_ids is None:
                raise HpcjobsError("target_length in tokens needs completion_ids")
            lengths = [len(ids) for ids in completion_ids]
        elif unit == "words":
            lengths = [len(_text(c).split()) for c in completions]
        else:
            lengths = [len(_text(c)) for c in completions]
        return [-abs(float(target) - n) for n in lengths]

    return target_length


def regex_reward(pattern: str) -> Callable[..., List[float]]:
    rx = re.compile(pattern, re.DOTALL)

    def regex(completions, **kwargs) -> List[float]:
        return [1.0 if rx.fullmatch(_text(c).strip()) else 0.0 for c in completions]

    return regex


def exact_match_reward(column: str) -> Callable[..., List[float]]:
    def exact_match(completions, **kwargs) -> List[float]:
        refs = kwargs.get(column)
        if refs is None:
            raise HpcjobsError(f"exact_match: the data has no column {column!r}")
        return [1.0 if _text(c).strip() == ("" if r is None else str(r).strip()) else 0.0
                for c, r in zip(completions, refs)]

    return exact_match


def _user_function(spec: Dict[str, Any]) -> Callable[..., Any]:
    name = spec["function"]
    if spec["kind"] == "file":
        path = spec["path"]
        mod_name = f"hpcjobs_reward_{abs(hash(path))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise HpcjobsError(f"{path}: cannot load as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
        where = spec.get("source", path)
    else:
        module = importlib.import_module(spec["module"])
        where = f"module {spec['module']}"
    fn = getattr(module, name, None)
    if not callable(fn):
        raise HpcjobsError(f"{where}: {name} is not a callable")
    return fn


def build(reward: Dict[str, Any]) -> List[Callable[..., Any]]:
    """The reward functions of a reward spec, in order (each with the ``__name__`` TRL logs)."""
    funcs = []
    for spec in reward["functions"]:
        if spec["kind"] == "shipped":
            name = spec["function"]
            if name == "target_length":
                fn = target_length_reward(int(reward["target_length"]), reward["length_unit"])
            elif name == "regex":
                fn = regex_reward(reward["pattern"])
            elif name == "exact_match":
                fn = exact_match_reward(reward["reference_column"])
            else:
                raise HpcjobsError(f"no shipped reward {name!r}")
        else:
            fn = _user_function(spec)
        funcs.append(fn)
    return funcs


def weights(reward: Dict[str, Any]) -> List[float]:
    w = reward.get("weights")
    return [float(x) for x in w] if w else [1.0] * len(reward["functions"])


def score(funcs: Sequence[Callable[..., Any]], w: Sequence[float], rows: Sequence[Dict[str, Any]],
          completions: Sequence[str], completion_ids: Sequence[Sequence[int]]) -> Dict[str, Any]:
    """Rewards of completions as TRL combines them: per function, and the weighted sum per
    completion (NaN/None from a function counts as missing, as TRL's nansum does)."""
    prompts = [r[PROMPT] for r in rows]
    columns = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {}) if k != PROMPT}
    per_func: Dict[str, List[Optional[float]]] = {}
    for fn in funcs:
        out = fn(prompts=prompts, completions=list(completions), completion_ids=[list(x) for x in completion_ids],
                 trainer_state=None, **columns)
        per_func[getattr(fn, "__name__", "reward")] = [None if v is None or not math.isfinite(float(v)) else float(v)
                                                        for v in out]
    total = []
    for i in range(len(completions)):
        vals = [wt * per_func[name][i] for wt, name in zip(w, per_func) if per_func[name][i] is not None]
        total.append(sum(vals) if vals else None)
    return {"per_function": per_func, "total": total}


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


# ---------------------------------------------------------------------------- prompts


def load_prompt_splits(data_cfg: Dict[str, Any]):
    """The prompt data set, split as every hpcjobs stage splits data (:mod:`hpcjobs.train.data`):
    ``prompt`` is ``data.template`` filled from each row (``{prompt}`` keeps the column as is),
    and every other column stays (TRL hands them to the reward functions). Returns a
    ``datasets.DatasetDict`` with ``train`` (GRPO), ``test`` (evaluate) and ``eval`` (in-training
    evaluation)."""
    from hpcjobs.datacheck import template_fields
    from hpcjobs.train.data import DEFAULT_SEED, DEFAULT_SPLIT, format_record, load_table, split_dataset

    path = data_cfg["path"]
    template = data_cfg.get("template") or "{prompt}"
    fields = template_fields(template)
    needed = list(data_cfg.get("columns") or []) + [c for c in fields if c not in (data_cfg.get("columns") or [])]
    ds = load_table(path, needed)

    def fmt(batch: Dict[str, list]) -> Dict[str, list]:
        n = len(next(iter(batch.values())))
        return {PROMPT: [format_record(template, {k: batch[k][i] for k in fields}) for i in range(n)]}

    ds = ds.map(fmt, batched=True, desc=None)
    return split_dataset(ds, data_cfg.get("split", DEFAULT_SPLIT), int(data_cfg.get("seed", DEFAULT_SEED)))


# ---------------------------------------------------------------------------- evaluation


def greedy_completions(model, tok, prompts: Sequence[str], max_new_tokens: int, device: str,
                       batch_size: int = 16) -> tuple[list[str], list[list[int]]]:
    """Greedy completions and their token ids as TRL hands them to rewards: the new tokens up to
    and including the first end-of-sequence token."""
    import torch

    eos = tok.eos_token_id
    texts, ids_out = [], []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                enc = tok(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True).to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tok.pad_token_id, eos_token_id=eos)
                for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                    if eos in row:
                        row = row[:row.index(eos) + 1]
                    ids_out.append(row)
                    texts.append(tok.decode(row, skip_special_tokens=True))
    finally:
        tok.padding_side = side
    return texts, ids_out


class RewardEval:
    """Mean reward of greedy completions on held-out prompts (the test split), per model; the
    evaluate stage's reward option (eval.json's ``reward``)."""

    def __init__(self, data_cfg: Dict[str, Any], reward: Dict[str, Any], max_new_tokens: int) -> None:
        test = load_prompt_splits(data_cfg)["test"]
        n = min(int(reward.get("prompts") or 32), len(test))
        self.rows = [test[i] for i in range(n)]
        self.funcs = build(reward)
        self.weights = weights(reward)
        self.max_new_tokens = max_new_tokens
        self.results: Dict[str, Any] = {}
        self.completions: Dict[str, list] = {}

    def run(self, name: str, model, tok, device: str) -> None:
        if not self.rows:
            return
        texts, ids = greedy_completions(model, tok, [r[PROMPT] for r in self.rows], self.max_new_tokens, device)
        s = score(self.funcs, self.weights, self.rows, texts, ids)
        self.completions[name] = [{"completion": t, "tokens": len(i), "reward": r}
                                  for t, i, r in zip(texts, ids, s["total"])]
        self.results[name] = {"mean_reward": mean(s["total"]),
                              "per_function": {k: mean(v) for k, v in s["per_function"].items()},
                              "mean_completion_tokens": sum(map(len, ids)) / len(ids)}

    def report(self, samples: int = 5) -> Dict[str, Any]:
        names = list(self.results)
        return {"prompts": len(self.rows), "generation": "greedy", "max_new_tokens": self.max_new_tokens,
                "functions": [getattr(f, "__name__", "reward") for f in self.funcs], "weights": self.weights,
                **{n: self.results[n] for n in names},
                "samples": [{"prompt": self.rows[i][PROMPT], **{n: self.completions[n][i] for n in names}}
                            for i in range(min(samples, len(self.rows)))]}


def reward_markdown(rep: Dict[str, Any], names: Dict[str, str]) -> list[str]:
    """The report.md section of a :meth:`RewardEval.report`."""
    def fmt(x: Optional[float]) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    models = [m for m in ("base", "merged") if m in rep]
    funcs = rep["functions"]
    lines = ["## Reward on held-out prompts", "",
             f"{rep['prompts']} prompts of the test split, greedy completions of up to {rep['max_new_tokens']} "
             f"tokens; reward = {' + '.join(f'{w:g} × {f}' for w, f in zip(rep['weights'], funcs))}.", "",
             "| model | mean reward | " + " | ".join(funcs) + " | mean completion tokens |",
             "|---|---|" + "---|" * len(funcs) + "---|"]
    for m in models:
        r = rep[m]
        lines.append(f"| {names.get(m, m)} | {fmt(r['mean_reward'])} | "
                     + " | ".join(fmt(r["per_function"].get(f)) for f in funcs)
                     + f" | {r['mean_completion_tokens']:.2f} |")
    if len(models) == 2 and rep["base"]["mean_reward"] is not None and rep["merged"]["mean_reward"] is not None:
        lines += ["", f"Change in mean reward: {rep['merged']['mean_reward'] - rep['base']['mean_reward']:+.4f} "
                      "(higher is better)"]
    lines += ["", "### Sample completions", ""]
    for i, s in enumerate(rep["samples"], 1):
        lines += [f"{i}. prompt: `{s['prompt'][:200].replace(chr(10), ' ')}`"]
        for m in models:
            c = s[m]
            lines += [f"   - {names.get(m, m)} (reward {fmt(c['reward'])}, {c['tokens']} tokens): "
                      f"`{c['completion'][:200].replace(chr(10), ' ')}`"]
    return lines + [""]
