"""Sequence(-pair) classification (a BERT-style encoder on AFQMC-like data), job side.

* prepare: ``text`` (and ``text_pair``) templates filled from the row and tokenized as a pair
  (``truncation="longest_first"``: both sentences keep a share of ``max_seq_length``); the
  ``label_column`` value becomes its index in ``labels`` (the class set). A value outside
  the set fails naming the row, the column and the set.
* finetune: ``AutoModelForSequenceClassification`` (a fresh head over the encoder) under the
  plain Trainer, padded to a multiple of 8; evaluation logs accuracy (and F1).
* evaluate: accuracy and F1 of the base (fresh head: chance) and the finetuned model on the
  eval (validation) and test splits, and ``predictions.jsonl`` of the finetuned model on the
  test split.

F1 is the positive class's (index 1) for two classes, else the macro mean; it is computed
here (a few lines) rather than with scikit-learn or ``evaluate``, which jobs would otherwise
install (scikit-learn) or download metric scripts for (``evaluate``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hpcjobs.errors import HpcjobsError
from hpcjobs.train.tasks import fill

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")
PREDICTIONS = "predictions.jsonl"
PEFT_TASK_TYPE = "SEQ_CLS"


# ---------------------------------------------------------------- prepare

def templates(cfg: dict[str, Any]) -> list[str]:
    return [t for t in (cfg["text"], cfg.get("text_pair")) if t is not None]


def columns(cfg: dict[str, Any]) -> list[str]:
    """Columns read besides the templates' fields."""
    return [cfg["label_column"]]


def prepare_map(cfg: dict[str, Any], tok, source: str):
    from hpcjobs.datacheck import template_fields

    text_t, pair_t, column = cfg["text"], cfg.get("text_pair"), cfg["label_column"]
    classes = list(cfg["labels"])
    index = {str(v): i for i, v in enumerate(classes)}
    t_fields, p_fields = template_fields(text_t), template_fields(pair_t) if pair_t else []
    max_len = int(cfg["max_seq_length"])

    def fn(batch: dict[str, list]) -> dict[str, list]:
        rows = batch["_row"]
        a = [fill(text_t, t_fields, batch, i, row, source) for i, row in enumerate(rows)]
        b = [fill(pair_t, p_fields, batch, i, row, source) for i, row in enumerate(rows)] if pair_t else None
        ys = []
        for i, row in enumerate(rows):
            value = batch[column][i]
            key = "" if value is None else str(value).strip()
            if key not in index:
                raise HpcjobsError(f"{source}: row {row}, column {column!r}: label {value!r} is not one of "
                                   f"prepare.labels {classes}", hint="fix the row, or add the class to prepare.labels")
            ys.append(index[key])
        enc = tok(a, b, truncation="longest_first", max_length=max_len)
        # Only a row cut to exactly max_len can have lost tokens: tokenize just those again,
        # untruncated, to count what was cut.
        full = [i for i, x in enumerate(enc["input_ids"]) if len(x) >= max_len]
        cut = set()
        if full:
            again = tok([a[i] for i in full], [b[i] for i in full] if b is not None else None)["input_ids"]
            cut = {i for i, x in zip(full, again) if len(x) > max_len}
        out: dict[str, list] = {k: list(v) for k, v in enc.items()}
        out.update(labels=ys, text=a, length=[len(x) for x in enc["input_ids"]],
                   truncated=[i in cut for i in range(len(rows))])
        if b is not None:
            out["text_pair"] = b
        return out

    return fn


def split_stats(ds, classes: list) -> dict[str, Any]:
    lengths, labels = ds["length"], ds["labels"]
    return {"rows": len(ds), "tokens": int(sum(lengths)), "truncated": int(sum(ds["truncated"])),
            "dropped": 0, "longest": int(max(lengths)) if lengths else 0,
            "classes": {str(c): sum(1 for y in labels if y == i) for i, c in enumerate(classes)}}


# ---------------------------------------------------------------- finetune

def training_args(common: dict[str, Any], t: dict[str, Any]):
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def load_model(path: str, dtype, info: dict[str, Any]):
    from transformers import AutoModelForSequenceClassification

    classes = [str(c) for c in info["labels"]]
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(classes), id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)}, dtype=dtype)
    # Its loss is a plain mean over its own batch and ignores num_items_in_batch; the Trainer,
    # seeing **kwargs in forward, would still multiply it by the number of ranks (doubling the
    # logged loss and the gradients on 2 ranks).
    model.accepts_loss_kwargs = False
    return model


def make_trainer(model, args, train, evaluation, tok, callbacks, info: dict[str, Any]):
    from transformers import DataCollatorWithPadding, Trainer

    n = len(info["labels"])
    return Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tok,
                   data_collator=DataCollatorWithPadding(tok, pad_to_multiple_of=8),
                   compute_metrics=lambda p: scores(p.predictions, p.label_ids, n), callbacks=callbacks)


def scores(logits, labels, n_classes: int) -> dict[str, float]:
    """Accuracy and F1 of the argmax of ``logits`` against ``labels``."""
    import numpy as np

    if isinstance(logits, tuple):   # some heads return (logits, hidden states)
        logits = logits[0]
    pred = np.asarray(logits).argmax(-1)
    gold = np.asarray(labels)
    acc = float((pred == gold).mean()) if len(gold) else 0.0

    def f1(c: int) -> float:
        tp = int(((pred == c) & (gold == c)).sum())
        fp, fn = int(((pred == c) & (gold != c)).sum()), int(((pred != c) & (gold == c)).sum())
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    return {"accuracy": acc, "f1": f1(1) if n_classes == 2 else sum(f1(c) for c in range(n_classes)) / n_classes}


# ---------------------------------------------------------------- evaluate

def _predict(model, tok, ds, batch_size: int, device: str):
    import torch
    from transformers import DataCollatorWithPadding

    cols = [c for c in MODEL_COLUMNS if c in ds.column_names and c != "labels"]
    pad = DataCollatorWithPadding(tok, pad_to_multiple_of=8)
    probs = []
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            rows = ds.select(range(i, min(i + batch_size, len(ds))))
            batch = pad([{c: rows[j][c] for c in cols} for j in range(len(rows))])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            probs += torch.softmax(logits, -1).cpu().tolist()
    return probs


def evaluate(cfg: dict[str, Any], base: str, merged: str, output: str, *, batch_size: int, device: str,
             dtype: str, log) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from hpcjobs.train.prepare import load_prepared, read_stats

    t0 = time.time()
    splits, info = load_prepared(cfg["prepared"]), read_stats(cfg["prepared"])
    classes = list(info["labels"])
    tok = AutoTokenizer.from_pretrained(str(Path(cfg["prepared"]) / "tokenizer"))
    names = {"base": "base", "merged": "finetuned", **(cfg.get("labels") or {})}
    results: dict[str, dict[str, dict[str, float]]] = {}
    predictions = []
    for name, path in (("base", base), ("merged", merged)):
        torch.manual_seed(0)   # the base model's head is freshly drawn: the same one every run
        model = load_model(str(Path(path).resolve()), getattr(torch, dtype), info).to(device).eval()
        results[name] = {}
        for split in ("eval", "test"):
            ds = splits[split]
            probs = _predict(model, tok, ds, batch_size, device)
            results[name][split] = scores(probs, ds["labels"], len(classes))
            if name == "merged" and split == "test":
                predictions = [{"row": i, "text": ds["text"][i],
                                **({"text_pair": ds["text_pair"][i]} if "text_pair" in ds.column_names else {}),
                                "label": classes[ds["labels"][i]], "predicted": classes[int(max(range(len(p)),
                                                                                             key=p.__getitem__))],
                                "probability": round(max(p), 6)} for i, p in enumerate(probs)]
        log(f"{name}: " + ", ".join(f"{s} accuracy {r['accuracy']:.4f} f1 {r['f1']:.4f}"
                                    for s, r in results[name].items()))
        del model
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / PREDICTIONS).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions),
                                   encoding="utf-8")
    report: dict[str, Any] = {"task": "classification"}
    for split, label in (("eval", "validation"), ("test", "test")):
        for metric in ("accuracy", "f1"):
            report[f"{label}_{metric}"] = {k: results[k][split][metric] for k in ("base", "merged")}
    report.update({
        "classes": classes, "rows": {"validation": len(splits["eval"]), "test": len(splits["test"])},
        "predictions": PREDICTIONS, "labels": names, "base": str(Path(base).resolve()),
        "merged": str(Path(merged).resolve()), "prepared": cfg["prepared"], "device": device, "dtype": dtype,
        "samples": [{"prompt": p["text"] + (f" ||| {p['text_pair']}" if "text_pair" in p else ""),
                     "label": p["label"], names["merged"]: p["predicted"]} for p in predictions[:5]],
        "seconds": round(time.time() - t0, 2),
    })
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    return report


def markdown(r: dict[str, Any]) -> str:
    names = r["labels"]
    lines = [f"# Evaluation: sequence classification, {names['base']} vs {names['merged']}", "",
             f"- {names['base']}: `{r['base']}` (a fresh classification head: chance level)",
             f"- {names['merged']}: `{r['merged']}`",
             f"- classes {r['classes']}; validation {r['rows']['validation']} rows, test {r['rows']['test']} rows "
             f"(prepared `{r['prepared']}`)",
             f"- predictions of the test split: `{r['predictions']}`", "",
             f"| split | metric | {names['base']} | {names['merged']} |", "|---|---|---|---|"]
    for split in ("validation", "test"):
        for metric in ("accuracy", "f1"):
            v = r[f"{split}_{metric}"]
            lines.append(f"| {split} | {metric} | {v['base']:.4f} | {v['merged']:.4f} |")
    lines += ["", "## First test predictions", "", "| text | label | predicted |", "|---|---|---|"]
    for s in r["samples"]:
        text = s["prompt"].replace("|", "\\|")   # a table cell
        lines.append(f"| {text} | {s['label']} | {s[names['merged']]} |")
    return "\n".join(lines) + "\n"
