"""Tokenize and format a dataset once, on CPU, for the training and evaluation stages.

    python -m hpcjobs.train.prepare --config prepare.json --output DIR

prepare.json (written by the ``prepare`` stage kind, :mod:`hpcjobs.stages.prepare`)::

    tokenizer        Hugging Face model/tokenizer directory, or a Meta checkpoint directory
                     (``tokenizer.model``, turned into the same tokenizer ``convert`` writes)
    data             {path, columns, template, split, seed}: see hpcjobs.train.data
    prompt           template of the prompt part (e.g. ``"{input}\\n"``); null: whole-text format
    response         template of the response part (e.g. ``"{target}"``)
    train_on_inputs  with a prompt: also compute the loss on the prompt tokens
    max_seq_length   examples are cut to this many tokens (from the end, as TRL does)

Two formats:

* **whole text** (``prompt`` null; llama2-lora): ``data.template`` filled from the row, EOS
  appended, tokenized as TRL's SFTTrainer tokenizes a text dataset (``tokenizer(text=...)``,
  so BOS as the tokenizer adds it), cut to ``max_seq_length``; every token is trained on.
* **prompt/response** (causal-LM SFT, the BELLE way): ``tokenizer(prompt)`` (with the
  tokenizer's BOS) followed by ``tokenizer(response, add_special_tokens=False)`` and EOS;
  labels are -100 on the prompt tokens unless ``train_on_inputs``. Prompt and response are
  tokenized separately so the prompt's tokens are exactly those the model is given at
  generation time, and the -100 positions are exact. Rows whose prompt alone fills
  ``max_seq_length`` have nothing left to learn and are dropped (counted in the stats).

Writes ``DIR`` with ``datasets.DatasetDict.save_to_disk`` (splits train, test, eval; columns
``input_ids``, ``attention_mask``, ``labels`` plus the texts: ``text``, or ``prompt`` and
``response``) and ``DIR/prepare.json``: rows, tokens, trained (non -100) tokens, truncated and
dropped rows and the longest example per split. The output is written to ``DIR.partial`` by
the job script and renamed when complete.

Errors name the row (1-based, in file order) and the column: a missing column, an empty
response cell, a value that is not text, an empty split. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hpcjobs.errors import HpcjobsError

STATS_FILE = "prepare.json"
SPLITS = ("train", "test", "eval")
MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")
IGNORE_INDEX = -100  # what the loss functions of transformers skip


def log(msg: str) -> None:
    print(f"[hpcjobs.prepare] {msg}", flush=True)


# ----------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------


def _meta_tokenizer_model(source: Path) -> Path | None:
    """A Meta checkpoint's tokenizer.model (in the directory or its parent, as convert looks)."""
    if (source / "config.json").is_file() or (source / "tokenizer_config.json").is_file():
        return None
    if not (source / "params.json").is_file():
        return None
    for d in (source, source.parent):
        if (d / "tokenizer.model").is_file():
            return d / "tokenizer.model"
    return None


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer the finetune stage will load from the (converted) model directory.

    For a Meta checkpoint it is built from ``tokenizer.model`` with convert's own
    :func:`hpcjobs.train.convert.build_tokenizer` (what convert saves into ``hf-model/``),
    so prepare need not wait for convert. Padding as in finetune: unk (else eos), right.
    """
    src = Path(source)
    if not src.is_dir():
        raise HpcjobsError(f"{src}: tokenizer directory not found")
    sp_model = _meta_tokenizer_model(src)
    if sp_model is not None:
        from hpcjobs.train.convert import build_tokenizer

        tok = build_tokenizer(sp_model)
        if tok.pad_token is None:
            tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        tok.padding_side = "right"
        return tok
    from hpcjobs.train.runtime import load_tokenizer as load_hf_tokenizer

    try:
        return load_hf_tokenizer(str(src))
    except (OSError, ValueError) as e:
        raise HpcjobsError(f"{src}: cannot load a tokenizer: {e}") from None


# ----------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------


def _check_columns(ds, templates: list[str], source: str) -> None:
    from hpcjobs.datacheck import _missing, _missing_error, template_fields

    for t in templates:
        missing = _missing(template_fields(t), ds.column_names)
        if missing:
            err = _missing_error(Path(source), missing, ds.column_names)
            raise HpcjobsError(f"{err.message} (template {t!r})", hint=err.hint)


def format_splits(cfg: dict[str, Any], tok) -> tuple["Any", dict[str, Any]]:
    """Load, check, split and tokenize; returns (DatasetDict, stats)."""
    import datasets

    from hpcjobs.datacheck import template_fields
    from hpcjobs.train.data import format_record, load_table, split_dataset

    from hpcjobs.train.tasks import cell_text, task_module

    data = cfg["data"]
    source = data["path"]
    task = task_module(cfg.get("task"))   # None: causal-lm, formatted here
    prompt_t, response_t = cfg.get("prompt"), cfg.get("response")
    if prompt_t is not None and response_t is None:
        raise HpcjobsError("prepare: prompt is set but response is not (both templates are needed)")
    if task is not None:
        templates = task.templates(cfg)
    else:
        templates = [prompt_t, response_t] if prompt_t is not None else [data["template"]]
    fields: list[str] = []
    for t in templates:
        fields += [f for f in template_fields(t) if f not in fields]
    table = load_table(source, [])  # columns checked below, naming the template
    _check_columns(table, templates, source)
    for col in task.columns(cfg) if task is not None else []:
        if col not in table.column_names:
            raise HpcjobsError(f"{source}: no column {col!r} (found: {', '.join(map(repr, table.column_names))})")
        if col not in fields:
            fields.append(col)
    # The row number in the file follows each row through the split.
    table = table.select_columns(fields).add_column("_row", list(range(1, len(table) + 1)))
    try:
        splits = split_dataset(table, data.get("split", (0.8, 0.1, 0.1)), int(data.get("seed", 42)))
    except ValueError as e:  # datasets refuses a split with an empty part
        raise HpcjobsError(f"{source}: data.split {list(data.get('split'))} of {len(table)} rows leaves a split "
                           f"empty ({e})", hint="add rows or change data.split") from None
    wanted = [s for s, frac in zip(SPLITS, data.get("split", (0.8, 0.1, 0.1))) if float(frac) > 0]
    empty = [s for s in wanted if len(splits[s]) == 0]
    if empty:
        sizes = ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)
        raise HpcjobsError(f"{source}: data.split {list(data.get('split'))} of {len(table)} rows leaves the "
                           f"{' and '.join(empty)} split empty ({sizes})", hint="add rows or change data.split")

    max_len = int(cfg["max_seq_length"])
    train_on_inputs = bool(cfg.get("train_on_inputs"))
    eos, eos_id = tok.eos_token, tok.eos_token_id
    if eos_id is None and task is None:   # a causal LM learns where to stop; an encoder has no EOS
        raise HpcjobsError(f"{cfg['tokenizer']}: the tokenizer has no EOS token")
    nproc = _num_proc(len(table))

    def whole_text(batch: dict[str, list]) -> dict[str, list]:
        rows = batch["_row"]
        # format_record: None/NaN as empty text, exactly as finetune's text path did
        texts = [format_record(templates[0], {f: batch[f][i] for f in fields}) for i in range(len(rows))]
        texts = [t if t.endswith(eos) else t + eos for t in texts]  # as TRL adds it
        enc = tok(text=texts)["input_ids"]
        out: dict[str, list] = {k: [] for k in (*MODEL_COLUMNS, "text", "length", "truncated")}
        for text, ids in zip(texts, enc):
            out["truncated"].append(len(ids) > max_len)
            ids = ids[:max_len]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(list(ids))
            out["text"].append(text[: -len(eos)])
            out["length"].append(len(ids))
        return out

    p_fields = template_fields(prompt_t) if prompt_t is not None else []
    r_fields = template_fields(response_t) if response_t is not None else []

    def prompt_response(batch: dict[str, list]) -> dict[str, list]:
        rows = batch["_row"]
        prompts, responses = [], []
        for i, row in enumerate(rows):
            p = prompt_t.format(**{f: cell_text(batch[f][i], row, f, source) for f in p_fields})
            r = response_t.format(**{f: cell_text(batch[f][i], row, f, source) for f in r_fields})
            if not r.strip():
                col = next((f for f in r_fields if not cell_text(batch[f][i], row, f, source)), r_fields[0]
                           if r_fields else "(response template)")
                raise HpcjobsError(f"{source}: row {row}, column {col!r}: empty response, nothing to train on",
                                   hint="drop the row or fix the data set")
            prompts.append(p)
            responses.append(r)
        p_ids = tok(text=prompts)["input_ids"]
        r_ids = tok(text=responses, add_special_tokens=False)["input_ids"]
        out: dict[str, list] = {k: [] for k in (*MODEL_COLUMNS, "prompt", "response", "length", "truncated",
                                              "dropped")}
        for p, r, pi, ri in zip(prompts, responses, p_ids, r_ids):
            ids = list(pi) + list(ri) + [eos_id]
            labels = (list(pi) if train_on_inputs else [IGNORE_INDEX] * len(pi)) + list(ri) + [eos_id]
            out["truncated"].append(len(ids) > max_len)
            ids, labels = ids[:max_len], labels[:max_len]
            out["dropped"].append(all(x == IGNORE_INDEX for x in labels))
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
            out["prompt"].append(p)
            out["response"].append(r)
            out["length"].append(len(ids))
        return out

    if task is not None:
        fn = task.prepare_map(cfg, tok, source)
    else:
        fn = prompt_response if prompt_t is not None else whole_text
    prepared, stats = {}, {}
    for name in SPLITS:
        ds = splits[name]
        ds = ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, num_proc=nproc if len(ds)
                    >= 2000 else None, desc=None)
        if task is not None:
            stats[name] = task.split_stats(ds, list(cfg.get("labels") or []))
            prepared[name] = ds.remove_columns([c for c in ("length", "target_length", "truncated")
                                                if c in ds.column_names])
            continue
        dropped = sum(ds["dropped"]) if "dropped" in ds.column_names else 0
        if dropped:
            ds = ds.filter(lambda d: not d, input_columns="dropped")
        if name == "train" and len(ds) == 0:
            raise HpcjobsError(f"{source}: no training example is left: every prompt fills max_seq_length "
                               f"({max_len} tokens)", hint="raise max_seq_length")
        lengths = ds["length"]
        labels = ds["labels"]
        stats[name] = {
            "rows": len(ds),
            "tokens": int(sum(lengths)),
            "trained_tokens": int(sum(sum(1 for x in lab if x != IGNORE_INDEX) for lab in labels)),
            "truncated": int(sum(ds["truncated"])),
            "dropped": int(dropped),
            "longest": int(max(lengths)) if lengths else 0,
        }
        prepared[name] = ds.remove_columns([c for c in ("length", "truncated", "dropped") if c in ds.column_names])
    return datasets.DatasetDict(prepared), stats


def _num_proc(rows: int) -> int | None:
    """Processes for datasets.map: the CPUs Slurm gave the job, when there is enough to share."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1)
    return max(1, min(cpus, rows // 1000)) if rows >= 2000 else None


# ----------------------------------------------------------------------------
# reading it back (training and evaluation stages)
# ----------------------------------------------------------------------------


def load_prepared(directory: str | os.PathLike):
    """The prepared DatasetDict (memory-mapped Arrow files; no tokenization)."""
    d = Path(directory)
    if not (d / STATS_FILE).is_file():
        raise HpcjobsError(f"{d}: not a prepared data set (no {STATS_FILE}; did the prepare stage complete?)")
    import datasets

    return datasets.load_from_disk(str(d))


def read_stats(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / STATS_FILE).read_text())


def collator(tok):
    """Pads input_ids with the pad token and labels with -100, to a multiple of 8 (tensor cores)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tok, padding="longest", pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
                                  return_tensors="pt")


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def prepare(config: str | os.PathLike, output: str | os.PathLike) -> dict[str, Any]:
    t0 = time.time()
    p = Path(config)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HpcjobsError(f"{p}: cannot read the prepare config: {e}") from None
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_caching()  # nothing written next to the data or under HF_HOME
    tok = load_tokenizer(cfg["tokenizer"])
    log(f"tokenizer {cfg['tokenizer']} ({type(tok).__name__}, {len(tok)} tokens, eos {tok.eos_token!r}); "
        f"data {cfg['data']['path']}; task {cfg.get('task') or 'causal-lm'}; format "
        + (f"text {cfg.get('text')!r} + pair {cfg.get('text_pair')!r} -> label {cfg.get('label_column')!r} "
           f"in {cfg.get('labels')}" if cfg.get("task") == "classification"
           else f"prompt {cfg['prompt']!r} + response {cfg['response']!r}, train_on_inputs="
           f"{bool(cfg.get('train_on_inputs'))}" if cfg.get("prompt") is not None
           else f"whole text {cfg['data']['template']!r}")
        + f"; max_seq_length {cfg['max_seq_length']}")
    ds, stats = format_splits(cfg, tok)
    out = Path(output)
    ds.save_to_disk(str(out))
    tok_files = out / "tokenizer"
    tok.save_pretrained(str(tok_files))  # what the tokens mean, beside them
    record = {
        "task": cfg.get("task") or "causal-lm",
        **({"labels": list(cfg["labels"])} if cfg.get("labels") else {}),
        **({"max_target_length": int(cfg["max_target_length"])} if cfg.get("max_target_length") else {}),
        "format": "prompt_response" if cfg.get("prompt") is not None else "text",
        "prompt": cfg.get("prompt"),
        "response": cfg.get("response"),
        "template": cfg["data"].get("template"),
        "train_on_inputs": bool(cfg.get("train_on_inputs")),
        "max_seq_length": int(cfg["max_seq_length"]),
        "tokenizer": str(cfg["tokenizer"]),
        "data": cfg["data"],
        "splits": stats,
        "seconds": round(time.time() - t0, 2),
    }
    (out / STATS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    for name, s in stats.items():
        what = f"{s['trained_tokens']} trained" if "trained_tokens" in s else f"classes {s.get('classes')}"
        log(f"{name}: {s['rows']} rows, {s['tokens']} tokens ({what}), "
            f"{s['truncated']} truncated, {s['dropped']} dropped, longest {s['longest']}")
    log(f"prepared data set in {out} ({record['seconds']}s)")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcjobs.train.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="prepare.json")
    ap.add_argument("--output", required=True, help="directory for the prepared data set")
    a = ap.parse_args(argv)
    try:
        prepare(a.config, a.output)
    except HpcjobsError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
