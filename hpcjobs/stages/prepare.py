"""``prepare``: tokenize and format the data set once, on CPU (job side: :mod:`hpcjobs.train.prepare`).

The finetune and evaluate stages load what it writes (``datasets`` on disk in the run
directory) instead of every rank tokenizing the whole data set. What the login node can
check is checked before submission: the templates' columns, and for files whose rows can be
counted cheaply, that no split comes out empty.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from typing import Any

from ..constraints import choice, number, text_template
from ..errors import HpcjobsError
from ..schema import TASKS, StageCfg
from . import register
from .base import StageKind, plain, to_json

# Counting the rows of a JSON-lines/CSV file reads it; above this the prepare job does it.
_COUNT_LIMIT = 256 * 1024 * 1024


@dataclass
class PrepareStage(StageCfg):
    tokenizer: str = "${model.source}"
    """Hugging Face model or tokenizer directory, or a Meta checkpoint (its tokenizer.model is
    turned into the tokenizer convert writes, so prepare need not wait for convert)."""
    output: str = "${run.dir}/prepared"
    prompt: Optional[str] = text_template(None)
    """Template of the prompt, e.g. ``"{input}\\n"``; None: whole texts from data.template, every token trained."""
    response: Optional[str] = text_template(None)
    """Template of the response, e.g. ``"{target}"`` (a column is ``{column}``); needed with ``prompt``."""
    train_on_inputs: bool = False
    """With ``prompt``: compute the loss on the prompt tokens too (else their labels are -100)."""
    max_seq_length: int = number(512, ge=1)
    """Examples are cut to this many tokens (prompt, response and EOS; seq2seq: the input;
    classification: the pair, each text keeping a share)."""
    task: str = choice(*TASKS, default="causal-lm")
    """causal-lm: prompt/response or data.template; seq2seq: prompt is the encoder input,
    response the target; classification: text (+ text_pair) and label_column in labels."""
    text: Optional[str] = text_template(None)
    """classification: template of the (first) text, e.g. ``"{sentence1}"``."""
    text_pair: Optional[str] = text_template(None)
    """classification: template of the second text of a pair, e.g. ``"{sentence2}"``; None: single texts."""
    label_column: Optional[str] = None
    """classification: the column holding the class."""
    labels: List[Any] = field(default_factory=list)
    """classification: the class set, e.g. ``[0, 1]``; a row's label is its index here (the
    values are compared as text, so a CSV's "1" is the class 1)."""
    max_target_length: int = number(128, ge=1)
    """seq2seq: targets are cut to this many tokens (EOS included)."""


def _fields(template: Optional[str]) -> List[str]:
    from ..datacheck import template_fields

    return template_fields(template) if template else []


def split_sizes(rows: int, split) -> dict:
    """Rows of train/test/eval as :func:`hpcjobs.train.data.split_dataset` makes them
    (``datasets``' train_test_split: ``ceil`` of the held-out fraction)."""
    train, test, ev = (float(x) for x in split)
    total = train + test + ev
    held_out = round((test + ev) / total, 12)
    eval_part = round(ev / (test + ev), 12) if test + ev > 0 else 0.0
    n_held = math.ceil(held_out * rows)
    rest = n_held
    if eval_part <= 0:
        n_test, n_eval = rest, 0
    elif eval_part >= 1:
        n_test, n_eval = 0, rest
    elif rest < 2:
        n_test, n_eval = rest, 0
    else:
        n_eval = math.ceil(eval_part * rest)
        n_test = rest - n_eval
    return {"train": rows - n_held, "test": n_test, "eval": n_eval}


def count_rows(path: Path, fmt: str, known: Optional[int]) -> Optional[int]:
    """Rows of the data set, when cheap: parquet's footer, else a line count of a small file."""
    if known is not None:
        return known
    if fmt not in ("jsonl", "csv") or os.path.getsize(path) > _COUNT_LIMIT:
        return None
    with open(path, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    return lines - 1 if fmt == "csv" else lines  # a CSV header is a line, not a row (no quoted newlines assumed)


class Prepare(StageKind):
    name = "prepare"
    summary = "tokenize and format the data set once, on CPU (HF datasets on disk in the run directory)"
    settings = PrepareStage
    entry_point = "hpcjobs.train.prepare"
    sections = ("model", "data")
    path_keys = ("tokenizer", "output")

    def plan(self, ctx):
        s = ctx.sp.cfg
        if s.task == "classification":
            for key in ("text", "label_column"):
                if getattr(s, key) is None:
                    raise ctx.error(key, "task classification needs text, label_column and labels",
                                    hint=f"e.g. {ctx.sp.name}.text='{{sentence1}}' {ctx.sp.name}.text_pair="
                                    f"'{{sentence2}}' {ctx.sp.name}.label_column=label {ctx.sp.name}.labels=[0,1]")
            if len(s.labels) < 2:
                raise ctx.error("labels", f"the class set needs at least two classes, got {list(s.labels)}")
            dup = sorted({str(v) for v in s.labels if [str(x) for x in s.labels].count(str(v)) > 1})
            if dup:
                raise ctx.error("labels", f"class(es) {', '.join(dup)} listed twice in {list(s.labels)}")
            return [], []
        if s.task == "seq2seq" and (s.prompt is None or s.response is None):
            raise ctx.error("prompt" if s.prompt is None else "response", "task seq2seq needs prompt (the input, "
                            "e.g. 'summarize: {dialogue}') and response (the target, e.g. '{summary}')")
        if (s.prompt is None) != (s.response is None):
            key = "response" if s.response is None else "prompt"
            raise ctx.error(key, "prompt and response are set together (or neither: whole texts from "
                            "data.template)")
        return [], []

    def preflight(self, plan, sp, composed, produced):
        from ..datacheck import check_dataset

        s, name = sp.cfg, sp.name
        tok = Path(s.tokenizer)
        if s.tokenizer not in produced:
            if not tok.is_dir():
                raise composed.error(f"{name}.tokenizer", f"{tok} is not a directory")
            names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
            if not any((d / n).is_file() for d in (tok, tok.parent) for n in names):
                raise composed.error(f"{name}.tokenizer", f"{tok} has no tokenizer (tokenizer.json, "
                                     "tokenizer_config.json or a Meta tokenizer.model)")
        data = plan.chain.data
        if s.task == "classification":
            templates = [("text", s.text)] + ([("text_pair", s.text_pair)] if s.text_pair is not None else [])
        elif s.prompt is not None:
            templates = [("prompt", s.prompt), ("response", s.response)]
        else:
            templates = [("data.template", data.template)]
        try:
            # data.columns first (the file named by data.path lacks one: the error names data.path,
            # as the other stages' checks do), then the columns the templates use
            info = check_dataset(data.path, list(data.columns))
        except HpcjobsError as e:
            raise composed.error("data.path", e.message) from None
        for key, template in templates:
            try:
                fields = _fields(template)
            except HpcjobsError as e:
                raise composed.error(key if "." in key else f"{name}.{key}", e.message) from None
            missing = [f for f in fields if f not in info["columns"]]
            if missing:
                raise composed.error(key if "." in key else f"{name}.{key}",
                                     f"{template!r} names column(s) {', '.join(repr(m) for m in missing)} that "
                                     f"{data.path} does not have; found: "
                                     f"{', '.join(repr(c) for c in info['columns'])}")
        if s.task == "classification":
            self._check_labels(composed, name, s, data.path, info)
        rows = count_rows(Path(data.path), info["format"], info["rows"])
        if rows is not None and len(data.split) == 3 and sum(data.split) > 0:
            sizes = split_sizes(rows, data.split)
            empty = [k for k, frac in zip(("train", "test", "eval"), data.split) if frac > 0 and sizes[k] == 0]
            if empty:
                shown = ", ".join(f"{k} {v}" for k, v in sizes.items())
                raise composed.error("data.split", f"{list(data.split)} of the {rows} rows of {data.path} leaves "
                                     f"the {' and '.join(empty)} split empty ({shown})",
                                     hint="add rows or change data.split")

    @staticmethod
    def _check_labels(composed, name: str, s: PrepareStage, path: str, info: dict) -> None:
        """The label column is there, and, in a file small enough to read here, every value is a class."""
        from ..datacheck import column_values

        if s.label_column not in info["columns"]:
            raise composed.error(f"{name}.label_column", f"{path} has no column {s.label_column!r}; found: "
                                 f"{', '.join(repr(c) for c in info['columns'])}")
        if os.path.getsize(path) > _COUNT_LIMIT:
            return   # the prepare job checks every row
        classes = {str(v) for v in s.labels}
        for row, value in column_values(path, s.label_column):
            if ("" if value is None else str(value).strip()) not in classes:
                raise composed.error(f"{name}.labels", f"{path}: row {row}, column {s.label_column!r}: label "
                                     f"{value!r} is not one of {list(s.labels)}",
                                     hint=f"fix the row, or add the class to {name}.labels")

    def files(self, plan, sp):
        s = sp.cfg
        task = {"classification": {"text": s.text, "text_pair": s.text_pair, "label_column": s.label_column,
                                   "labels": list(s.labels)},
                "seq2seq": {"max_target_length": s.max_target_length}}.get(s.task, {})
        return {"prepare.json": to_json({
            "task": s.task,
            "tokenizer": s.tokenizer,
            "data": plain(plan.chain.data),
            "prompt": s.prompt,
            "response": s.response,
            "train_on_inputs": s.train_on_inputs,
            "max_seq_length": s.max_seq_length,
            **task,
        })}


register(Prepare())
