"""Packing prepared causal-LM examples into rows of up to ``max_seq_length`` tokens.

Padding a batch to its longest example wastes the compute of every pad token; packing puts
several whole examples into one row instead (``finetune.packing``). Each example must still
see only itself: the rows go to the model with ``position_ids`` that restart at 0 at every
example and **no** ``attention_mask``, from which transformers' ``create_causal_mask`` builds a
block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``). That holds only
for models that hand their ``position_ids`` to the mask (Llama, Qwen2, ...): Bloom's ALiBi
attention ignores them, so the login node allows packing only for the architectures in
``hpcjobs.stages.finetune.PACKING_ARCHS``, and ``tests/test_packing.py`` checks, per
architecture, that a packed row gives the same logits and loss as its examples alone.

The examples are binned by TRL's best-fit-decreasing ``pack_dataset`` (whole examples, none
split). The collator is ours rather than TRL's padding-free one because that one flattens the
whole micro batch into a single row: without a variable-length attention kernel (flash-attn)
attention then costs (micro batch x length)^2 instead of micro batch x length^2, and the
memory plan would no longer hold. Here a micro batch stays ``micro_batch_size`` rows of at
most ``max_seq_length`` tokens, exactly what the planner counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


def pack(train, max_seq_length: int, seed: int):
    """``train`` (input_ids, labels) binned into rows of whole examples (a ``seq_lengths``
    column gives each row's examples), shuffled first so a row mixes the data set."""
    from trl import pack_dataset

    rows = train.select_columns(["input_ids", "labels"]).shuffle(seed=seed)
    return pack_dataset(rows, max_seq_length, strategy="bfd")


def single(split):
    """An unpacked split (eval) in the packed rows' form: one example per row."""
    return split.map(lambda row: {"seq_lengths": [len(row["input_ids"])]})


def stats(examples: int, packed) -> dict[str, Any]:
    """Rows before and after, and how full the packed rows are (tokens / (rows x longest))."""
    lengths = [sum(s) for s in packed["seq_lengths"]]
    width = max(lengths) if lengths else 0
    return {"examples": examples, "rows": len(packed), "tokens": sum(lengths),
            "fill": round(sum(lengths) / (len(lengths) * width), 4) if width else 0.0}


@dataclass
class PackedCollator:
    """Pads rows (packed, or one example each: ``single``) to the longest, to a multiple of ``pad_to_multiple_of``:
    ``input_ids`` with ``pad_token_id``, ``labels`` with -100, and ``position_ids`` restarting
    at every example. No attention mask: right padding needs none under a causal mask (no
    real token sees a later position), and its absence is what lets the model read example
    boundaries from ``position_ids``. The first label of each example is -100: it would be
    predicted from the previous example's last token, which an unpacked batch never does."""

    pad_token_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            if "seq_lengths" not in row:   # without it the examples of a row would see each other
                raise KeyError("a packed row came without its seq_lengths column; the Trainer must keep it")
            segments = list(row["seq_lengths"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            start = 0
            for length in segments + ([width - n] if width > n else []):  # the padding: one more segment
                position_ids[i, start:start + length] = torch.arange(length)
                labels[i, start] = IGNORE_INDEX
                start += length
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
