"""Sequence to sequence (FLAN-T5 on dialogue summarisation), job side.

* prepare: the ``prompt`` template (e.g. ``"summarize: {dialogue}"``) is the encoder input, cut
  to ``max_seq_length``; the ``response`` template (``"{summary}"``) is the target, tokenized
  as ``text_target`` and cut to ``max_target_length`` (the tokenizer's EOS included).
* finetune: ``AutoModelForSeq2SeqLM`` under ``Seq2SeqTrainer``; ``DataCollatorForSeq2Seq``
  pads the labels with -100 and builds the decoder inputs from them. With evaluation on, it
  generates (``predict_with_generate``, greedy, up to ``max_target_length`` tokens) and logs
  ROUGE-1/2/L beside the eval loss.
* evaluate: ROUGE-1/2/L of greedy generations of the base and the finetuned model on the eval
  (validation) and test splits, the eval loss of each, and before/after summaries of the first
  test rows.

ROUGE is Google's ``rouge_score`` package (what HF ``evaluate`` wraps, without ``evaluate``'s
download of a metric script at run time): F-measures, with Porter stemming, in [0, 1]; text
in Chinese, Japanese or Korean is scored per character (RougeTokens).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from hpcjobs.errors import HpcjobsError
from hpcjobs.train.tasks import fill, mean

MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")
PEFT_TASK_TYPE = "SEQ_2_SEQ_LM"
ROUGE = ("rouge1", "rouge2", "rougeL")
IGNORE_INDEX = -100


# ---------------------------------------------------------------- prepare

def templates(cfg: dict[str, Any]) -> list[str]:
    return [cfg["prompt"], cfg["response"]]


def columns(cfg: dict[str, Any]) -> list[str]:
    return []


def prepare_map(cfg: dict[str, Any], tok, source: str):
    from hpcjobs.datacheck import template_fields

    src_t, tgt_t = cfg["prompt"], cfg["response"]
    s_fields, t_fields = template_fields(src_t), template_fields(tgt_t)
    max_src, max_tgt = int(cfg["max_seq_length"]), int(cfg["max_target_length"])

    def fn(batch: dict[str, list]) -> dict[str, list]:
        rows = batch["_row"]
        srcs = [fill(src_t, s_fields, batch, i, row, source) for i, row in enumerate(rows)]
        tgts = []
        for i, row in enumerate(rows):
            t = fill(tgt_t, t_fields, batch, i, row, source)
            if not t:
                col = next((f for f in t_fields if not str(batch[f][i] or "").strip()), "(response template)")
                raise HpcjobsError(f"{source}: row {row}, column {col!r}: empty target, nothing to train on",
                                   hint="drop the row or fix the data set")
            tgts.append(t)
        src_ids = tok(text=srcs)["input_ids"]
        tgt_ids = tok(text_target=tgts)["input_ids"]
        return {"input_ids": [x[:max_src] for x in src_ids], "attention_mask": [[1] * min(len(x), max_src)
                                                                                for x in src_ids],
                "labels": [y[:max_tgt] for y in tgt_ids], "prompt": srcs, "response": tgts,
                "length": [min(len(x), max_src) for x in src_ids],
                "target_length": [min(len(y), max_tgt) for y in tgt_ids],
                "truncated": [len(x) > max_src or len(y) > max_tgt for x, y in zip(src_ids, tgt_ids)]}

    return fn


def split_stats(ds, classes: list) -> dict[str, Any]:
    lengths, targets = ds["length"], ds["target_length"]
    return {"rows": len(ds), "tokens": int(sum(lengths)), "trained_tokens": int(sum(targets)),
            "truncated": int(sum(ds["truncated"])), "dropped": 0,
            "longest": int(max(lengths)) if lengths else 0, "longest_target": int(max(targets)) if targets else 0}


# ---------------------------------------------------------------- finetune

def training_args(common: dict[str, Any], t: dict[str, Any]):
    from transformers import Seq2SeqTrainingArguments

    evaluating = common.get("eval_strategy", "no") != "no"
    return Seq2SeqTrainingArguments(**common, predict_with_generate=evaluating,
                                    generation_max_length=int(t["max_target_length"]), generation_num_beams=1)


def load_model(path: str, dtype, info: dict[str, Any]):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype)
    # Its loss is a plain mean over its own batch and ignores num_items_in_batch; the Trainer,
    # seeing **kwargs in forward, would still multiply it by the number of ranks (doubling the
    # logged loss and the gradients on 2 ranks).
    model.accepts_loss_kwargs = False
    return model


def make_trainer(model, args, train, evaluation, tok, callbacks, info: dict[str, Any]):
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

    def metrics(p) -> dict[str, float]:
        import numpy as np

        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.where(preds < 0, tok.pad_token_id, preds)
        labels = np.where(p.label_ids < 0, tok.pad_token_id, p.label_ids)
        return rouge(tok.batch_decode(preds, skip_special_tokens=True),
                     tok.batch_decode(labels, skip_special_tokens=True))

    return Seq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tok,
                          data_collator=DataCollatorForSeq2Seq(tok, model=model, pad_to_multiple_of=8,
                                                               label_pad_token_id=IGNORE_INDEX),
                          compute_metrics=metrics if args.predict_with_generate else None, callbacks=callbacks)


# Chinese, Japanese kana and Korean Hangul: scored one character per token, the usual unit for
# ROUGE on text without spaces between words
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


class RougeTokens:
    """rouge_score's tokens for any language. Its default tokenizer keeps only ``[a-z0-9]`` runs,
    so a Chinese summary scores 0 whatever it says. Here ASCII words go through that same
    tokenizer (lowercase, Porter stemming: English scores do not change), a CJK character is a
    token of its own, and any other word (``café``, ``Straße``) is a lowercased token."""

    def __init__(self) -> None:
        from rouge_score import tokenizers

        self._ascii = tokenizers.DefaultTokenizer(use_stemmer=True)

    def tokenize(self, text: str) -> list[str]:
        out: list[str] = []
        for word in _TOKEN.findall(text.lower()):
            out.extend(self._ascii.tokenize(word) if word.isascii() else [word])
        return out


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures of ``predictions`` against ``references`` (RougeTokens)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE), tokenizer=RougeTokens())
    per = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: float(mean([s[k].fmeasure for s in per]) or 0.0) for k in ROUGE}


# ---------------------------------------------------------------- evaluate

def _generate(model, tok, ds, batch_size: int, max_new_tokens: int, device: str) -> list[str]:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            ids = ds["input_ids"][i:i + batch_size]
            batch = tok.pad({"input_ids": ids}, return_tensors="pt")
            gen = model.generate(**{k: v.to(device) for k, v in batch.items()}, do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens)
            out += tok.batch_decode(gen, skip_special_tokens=True)
    return [o.strip() for o in out]


def _loss(model, tok, ds, batch_size: int, device: str) -> float | None:
    """Target-token-weighted mean cross-entropy (the model's own loss is a per-batch mean)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=IGNORE_INDEX)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            rows = ds.select(range(i, min(i + batch_size, len(ds))))
            batch = pad([{c: rows[j][c] for c in MODEL_COLUMNS} for j in range(len(rows))])
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            total += float(model(**{k: v.to(device) for k, v in batch.items()}).loss) * n
            count += n
    loss = total / count if count else float("nan")
    return loss if math.isfinite(loss) else None


def evaluate(cfg: dict[str, Any], base: str, merged: str, output: str, *, batch_size: int, device: str,
             dtype: str, log, max_new_tokens: int, samples: int = 5) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from hpcjobs.train.prepare import load_prepared, read_stats

    t0 = time.time()
    splits, info = load_prepared(cfg["prepared"]), read_stats(cfg["prepared"])
    tok = AutoTokenizer.from_pretrained(str(Path(cfg["prepared"]) / "tokenizer"))
    names = {"base": "base", "merged": "finetuned", **(cfg.get("labels") or {})}
    new_tokens = min(max_new_tokens, int(info.get("max_target_length") or max_new_tokens))
    scores: dict[str, dict[str, dict[str, float]]] = {}
    losses: dict[str, float | None] = {}
    shown = splits["test"].select(range(min(samples, len(splits["test"]))))
    outputs: dict[str, list[str]] = {}
    for name, path in (("base", base), ("merged", merged)):
        model = load_model(str(Path(path).resolve()), getattr(torch, dtype), info).to(device).eval()
        scores[name] = {}
        for split in ("eval", "test"):
            ds = splits[split]
            preds = _generate(model, tok, ds, batch_size, new_tokens, device)
            scores[name][split] = rouge(preds, list(ds["response"]))
            if split == "test":
                outputs[name] = preds[:len(shown)]
        losses[name] = _loss(model, tok, splits["test"], batch_size, device)
        log(f"{name}: test loss {losses[name]}, " + ", ".join(
            f"{s} " + " ".join(f"{k} {v:.4f}" for k, v in r.items()) for s, r in scores[name].items()))
        del model
    report: dict[str, Any] = {"task": "seq2seq"}
    for split, label in (("eval", "validation"), ("test", "test")):
        for k in ROUGE:
            report[f"{label}_{k}"] = {n: scores[n][split][k] for n in ("base", "merged")}
    report.update({
        "test_loss": losses, "rows": {"validation": len(splits["eval"]), "test": len(splits["test"])},
        "labels": names, "base": str(Path(base).resolve()), "merged": str(Path(merged).resolve()),
        "prepared": cfg["prepared"], "generation": "greedy", "max_new_tokens": new_tokens, "device": device,
        "dtype": dtype,
        "samples": [{"prompt": p, "reference": r, names["base"]: b, names["merged"]: m} for p, r, b, m in
                    zip(shown["prompt"], shown["response"], outputs["base"], outputs["merged"])],
        "seconds": round(time.time() - t0, 2),
    })
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    return report


def markdown(r: dict[str, Any]) -> str:
    names = r["labels"]
    fence = "```"
    lines = [f"# Evaluation: seq2seq, {names['base']} vs {names['merged']}", "",
             f"- {names['base']}: `{r['base']}`", f"- {names['merged']}: `{r['merged']}`",
             f"- validation {r['rows']['validation']} rows, test {r['rows']['test']} rows (prepared "
             f"`{r['prepared']}`); greedy generation, up to {r['max_new_tokens']} new tokens", "",
             f"| split | metric | {names['base']} | {names['merged']} |", "|---|---|---|---|"]
    for split in ("validation", "test"):
        for k in ROUGE:
            v = r[f"{split}_{k}"]
            lines.append(f"| {split} | {k} | {v['base']:.4f} | {v['merged']:.4f} |")
    loss = r["test_loss"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"   # noqa: E731
    lines += [f"| test | loss | {fmt(loss['base'])} | {fmt(loss['merged'])} |", "", "## Summaries", ""]
    for i, s in enumerate(r["samples"], 1):
        lines += [f"### {i}", ""]
        for key in ("prompt", "reference", names["base"], names["merged"]):
            lines += [f"**{key}**", "", fence + "text", s[key], fence, ""]
    return "\n".join(lines)
