"""Before/after evaluation of a finetune: base model vs merged model.

    python -m hpcjobs.train.evaluate --config train.json --base DIR --merged DIR
        [--prompts FILE] --output DIR [--max-new-tokens N] [--max-eval-samples N]
        [--batch-size N] [--device cpu|cuda] [--dtype float32|float16|bfloat16]

For each model (loaded one after the other, to bound memory):

* **eval loss**: mean token cross-entropy (natural log, averaged over all
  predicted tokens, not over batches) on the held-out *test* split, built
  exactly as finetune builds it (same data block of train.json: template,
  split and seed). Each text is tokenised like SFTTrainer does: BOS from the
  tokenizer, EOS appended, truncated to ``train.max_seq_length``. At most
  ``--max-eval-samples`` (default 1000; 0 = all) test rows are used, the first
  ones of the split.
* **samples**: greedy generation (``do_sample=False``) of up to
  ``--max-new-tokens`` (default 128) tokens for each prompt; only the new
  text is reported.

Prompts file: UTF-8 text, one prompt per line; blank lines are ignored and
surrounding whitespace is stripped. Without ``--prompts``, the first
``--num-test-prompts`` (default 5) test rows are used, cut after the
template's last label (e.g. ``... Doctor:``), and the true continuation is
reported as ``reference``.

Writes ``OUTPUT/report.json``::

    {"eval_loss": {"base": f, "merged": f}, "perplexity": {...},
     "eval_examples": n, "eval_tokens": n,
     "samples": [{"prompt", "base", "merged", "reference"?}], ...}

and ``OUTPUT/report.md`` (the same, for humans).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import sys
import time
from pathlib import Path
from typing import Any

from hpcjobs.errors import HpcjobsError


def log(msg: str) -> None:
    print(f"[hpcjobs.evaluate] {msg}", flush=True)


def read_prompts(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HpcjobsError(f"{p}: prompts file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HpcjobsError(f"{p}: cannot read prompts file: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise HpcjobsError(f"{p}: prompts file has no prompts (one per line, blank lines are ignored)")
    return prompts


def prompt_split_point(template: str) -> str | None:
    """Literal text just before the template's last field, e.g. ``" Doctor: "``."""
    parts = list(string.Formatter().parse(template))
    last = None
    for literal, field, _, _ in parts:
        if field is not None:
            last = literal
    return last or None


def prompts_from_texts(texts: list[str], template: str, n: int) -> list[dict[str, str]]:
    marker = prompt_split_point(template)
    out = []
    for text in texts:
        if len(out) >= n:
            break
        if marker and marker.strip() and marker.rstrip() in text:
            cut = text.rfind(marker.rstrip()) + len(marker.rstrip())
            out.append({"prompt": text[:cut], "reference": text[cut:].strip()})
        else:
            half = len(text) // 2
            out.append({"prompt": text[:half], "reference": text[half:]})
    return out


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def load_model(path: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path, "config.json").is_file():
        raise HpcjobsError(f"{path}: not a Hugging Face model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.to(device)
    model.eval()
    return model, tok


def eval_loss(model, tok, texts: list[str], max_length: int, batch_size: int, device: str) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over ``texts``; returns (loss, tokens)."""
    import torch
    import torch.nn.functional as F

    eos = tok.eos_token or ""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = [t + eos if eos and not t.endswith(eos) else t for t in texts[i : i + batch_size]]
            enc = tok(batch, truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                      padding_side="right")
            ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            labels = ids.masked_fill(mask == 0, -100)[:, 1:]
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((labels != -100).sum())
    if count == 0:
        return float("nan"), 0
    return total / count, count


def eval_loss_prepared(model, tok, ds, batch_size: int, device: str) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the labelled (not -100) tokens of a prepared split."""
    import torch
    import torch.nn.functional as F

    from hpcjobs.train.prepare import IGNORE_INDEX, MODEL_COLUMNS, collator

    collate = collator(tok)
    rows = ds.select_columns(list(MODEL_COLUMNS))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            labels = batch["labels"].to(device)[:, 1:]
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        return float("nan"), 0
    return total / count, count


def generate(model, tok, prompts: list[str], max_new_tokens: int, device: str) -> list[str]:
    import torch

    outs = []
    with torch.no_grad():
        for prompt in prompts:
            enc = tok(prompt, return_tensors="pt").to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            new = gen[0, enc["input_ids"].shape[1]:]
            outs.append(tok.decode(new, skip_special_tokens=True).strip())
    return outs


def _finite_or_none(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None


def write_reports(out_dir: Path, report: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _block(text: str) -> list[str]:
    fence = "```"
    while fence in text:
        fence += "`"
    return [fence + "text", text, fence, ""]


def render_markdown(r: dict[str, Any]) -> str:
    el, pp = r["eval_loss"], r["perplexity"]
    delta = None if el["base"] is None or el["merged"] is None else el["merged"] - el["base"]
    names = {"base": "base", "merged": "merged", **(r.get("labels") or {})}
    lines = [
        "# Evaluation: base vs finetuned (merged)" if names == {"base": "base", "merged": "merged"} else
        f"# Evaluation: {names['base']} (base) vs {names['merged']} (merged)",
        "",
        f"- base model: `{r['base']}`",
        f"- merged model: `{r['merged']}`",
        f"- test split: {r['eval_examples']} examples, {r['eval_tokens']} tokens "
        f"(data `{r['data']['path']}`, split {r['data']['split']}, seed {r['data']['seed']})",
        f"- generation: greedy, up to {r['max_new_tokens']} new tokens; device {r['device']}, dtype {r['dtype']}",
        "",
        "| model | eval loss (mean token CE) | perplexity |",
        "|---|---|---|",
        f"| {names['base']} | {_fmt(el['base'])} | {_fmt(pp['base'], '.2f')} |",
        f"| {names['merged']} | {_fmt(el['merged'])} | {_fmt(pp['merged'], '.2f')} |",
        "",
        f"Change in eval loss: {_fmt(delta, '+.4f')}" + (" (lower is better)" if delta is not None else ""),
        "",
        "## Samples",
        "",
    ]
    if r.get("reward"):
        from hpcjobs.train.rewards import reward_markdown

        lines[-2:-2] = reward_markdown(r["reward"], names)
    for i, s in enumerate(r["samples"], 1):
        lines += [f"### {i}", "", "**Prompt**", ""] + _block(s["prompt"])
        if s.get("reference") is not None:
            lines += ["**Reference**", ""] + _block(s["reference"])
        lines += [f"**{names['base'].capitalize()}**", ""] + _block(s["base"]) + \
            [f"**{names['merged'].capitalize()}**", ""] + _block(s["merged"])
    return "\n".join(lines)


def evaluate(
    config: str,
    base: str,
    merged: str,
    output: str,
    prompts_file: str | None = None,
    max_new_tokens: int = 128,
    max_eval_samples: int = 1000,
    batch_size: int = 8,
    num_test_prompts: int = 5,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    from hpcjobs.train.data import load_splits
    from hpcjobs.train.finetune import load_train_config

    t0 = time.time()
    cfg = load_train_config(config)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    from hpcjobs.train.tasks import task_module

    task = task_module(cfg.get("task"))
    if task is not None:   # classification, seq2seq: their own metrics (hpcjobs.train.tasks)
        report = task.evaluate(cfg, base, merged, output, batch_size=batch_size, device=device, dtype=dtype,
                               log=log, **({"max_new_tokens": max_new_tokens} if cfg["task"] == "seq2seq" else {}))
        log(f"reports written to {Path(output).resolve()}/report.{{md,json}} ({time.time() - t0:.1f}s)")
        return report
    max_length = int(cfg["train"]["max_seq_length"])
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

    template = cfg["data"].get("template") or " ".join(f"{c}: {{{c}}}" for c in cfg["data"].get("columns", []))
    prepared = None
    all_test_texts: list[str] = []
    if cfg.get("prepared"):
        from hpcjobs.train.prepare import load_prepared

        # The test split as the prepare stage tokenized and labelled it: the loss counts the
        # tokens training learned (the responses only, unless train_on_inputs).
        prepared = full_prepared = load_prepared(cfg["prepared"])["test"]
        all_test_texts = list(prepared["text"]) if "text" in prepared.column_names else []
        if max_eval_samples and max_eval_samples > 0:
            prepared = prepared.select(range(min(len(prepared), max_eval_samples)))
        test_texts = all_test_texts[:len(prepared)]
        log(f"loaded prepared test split from {cfg['prepared']} ({len(prepared)} rows)")
    else:
        splits = load_splits(cfg["data"])
        all_test_texts = test_texts = list(splits["test"]["text"])
        if max_eval_samples and max_eval_samples > 0:
            test_texts = test_texts[:max_eval_samples]
    if prompts_file:
        samples = [{"prompt": p} for p in read_prompts(prompts_file)]
    elif prepared is not None and "prompt" in prepared.column_names:
        n = min(num_test_prompts, len(full_prepared))
        samples = [{"prompt": p, "reference": r}
                   for p, r in zip(full_prepared["prompt"][:n], full_prepared["response"][:n])]
    else:
        # prompts come from the whole test split: max_eval_samples only bounds the loss pass
        samples = prompts_from_texts(all_test_texts, template, num_test_prompts)
    prompts = [s["prompt"] for s in samples]
    log(f"device={device} dtype={dtype} test examples={len(test_texts)} prompts={len(prompts)}")

    reward_eval = None
    if cfg.get("reward"):  # a grpo stage's rewards: mean reward of greedy completions, held-out prompts
        from hpcjobs.train.rewards import RewardEval

        reward_eval = RewardEval(cfg["data"], cfg["reward"], max_new_tokens)
    losses: dict[str, float | None] = {}
    tokens = 0
    for name, path in (("base", base), ("merged", merged)):
        t = time.time()
        model, tok = load_model(str(Path(path).resolve()), device, dtype)
        if prepared is not None:
            loss, tokens = eval_loss_prepared(model, tok, prepared, batch_size, device)
        else:
            loss, tokens = eval_loss(model, tok, test_texts, max_length, batch_size, device) if test_texts else (
                float("nan"),
                0,
            )
        losses[name] = _finite_or_none(loss)
        outs = generate(model, tok, prompts, max_new_tokens, device)
        for s, o in zip(samples, outs):
            s[name] = o
        if reward_eval is not None:
            reward_eval.run(name, model, tok, device)
            log(f"{name}: mean reward {reward_eval.results[name]['mean_reward']}")
        log(f"{name}: eval_loss={losses[name]} ({tokens} tokens) in {time.time() - t:.1f}s")
        del model
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()

    report = {
        "eval_loss": losses,
        "perplexity": {k: (math.exp(v) if v is not None and v < 50 else None) for k, v in losses.items()},
        "eval_examples": len(prepared) if prepared is not None else len(test_texts),
        "prepared": cfg.get("prepared"),
        "labels": cfg.get("labels") or {"base": "base", "merged": "merged"},
        "eval_tokens": tokens,
        "samples": [
            {"prompt": s["prompt"], "base": s["base"], "merged": s["merged"], **({"reference": s["reference"]}
                                                                                 if "reference" in s else {})}
            for s in samples
        ],
        "base": str(Path(base).resolve()),
        "merged": str(Path(merged).resolve()),
        "config": str(Path(config).resolve()),
        "data": {
            "path": cfg["data"]["path"],
            "split": cfg["data"].get("split", [0.8, 0.1, 0.1]),
            "seed": cfg["data"].get("seed", 42),
        },
        "max_seq_length": max_length,
        "max_new_tokens": max_new_tokens,
        "generation": "greedy",
        "device": device,
        "dtype": dtype,
        "prompts_file": str(Path(prompts_file).resolve()) if prompts_file else None,
        "seconds": round(time.time() - t0, 2),
    }
    if reward_eval is not None:
        report["reward"] = reward_eval.report()
    write_reports(Path(output), report)
    log(f"reports written to {Path(output).resolve()}/report.{{md,json}}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcjobs.train.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="train.json of the finetune (data block and max_seq_length)")
    ap.add_argument("--base", required=True, help="base model directory")
    ap.add_argument("--merged", required=True, help="merged model directory")
    ap.add_argument("--prompts", default=None, help="prompts file: one prompt per line, blank lines ignored")
    ap.add_argument("--output", required=True, help="directory for report.md and report.json")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-eval-samples", type=int, default=1000, help="test rows for the eval loss (0 = all)")
    ap.add_argument("--batch-size", type=int, default=8, help="batch size for the eval loss")
    ap.add_argument("--num-test-prompts", type=int, default=5, help="prompts taken from the test split without --prompts")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    a = ap.parse_args(argv)
    try:
        evaluate(
            a.config,
            a.base,
            a.merged,
            a.output,
            prompts_file=a.prompts,
            max_new_tokens=a.max_new_tokens,
            max_eval_samples=a.max_eval_samples,
            batch_size=a.batch_size,
            num_test_prompts=a.num_test_prompts,
            device=a.device,
            dtype=a.dtype,
        )
    except HpcjobsError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
