"""Tiny local stand-ins for Llama-2 and the patient/doctor dataset (no model hub).

* :func:`make_tiny_llama` writes a standard HF Llama directory: ``config.json``,
  ``generation_config.json``, ``model.safetensors`` (LlamaConfig, hidden 64,
  2 layers, 4 heads, random init with a fixed seed) and a Llama-style
  sentencepiece tokenizer (``tokenizer.model`` BPE with byte fallback,
  unk=0 / bos=1 / eos=2 and no pad token, like Llama-2) trained locally on
  synthetic dialogue text, plus the ``tokenizer.json`` transformers derives
  from it. ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` load it.
* :func:`make_dialogue_parquet` writes a small Description/Patient/Doctor
  parquet with learnable structure (the Doctor answer depends on the symptom).

Everything is deterministic for a given seed. Torch/transformers are imported
inside the functions so that the module can be imported by light tests.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

SYMPTOMS = ["fever", "cough", "headache", "back pain", "sore throat", "rash", "nausea", "dizziness"]
ADVICE = {
    "fever": "take paracetamol and drink water",
    "cough": "use a cough syrup and rest",
    "headache": "rest in a dark room and drink water",
    "back pain": "apply heat and do gentle stretching",
    "sore throat": "gargle with warm salt water",
    "rash": "apply a mild steroid cream",
    "nausea": "eat small meals and sip water",
    "dizziness": "sit down and check your blood pressure",
}
DURATIONS = ["two days", "three days", "a week", "since yesterday", "a month"]


def dialogue_rows(n: int = 120, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic Description/Patient/Doctor records."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = rng.choice(SYMPTOMS)
        d = rng.choice(DURATIONS)
        rows.append(
            {
                "Description": f"Q. What should I do about {s}?",
                "Patient": f"Hi doctor, I have had {s} for {d}. Patient number {i}.",
                "Doctor": f"Hello. For {s} you should {ADVICE[s]}. See a doctor if it lasts.",
            }
        )
    return rows


def make_dialogue_parquet(path: str | os.PathLike, n: int = 120, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = dialogue_rows(n, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _corpus(seed: int = 0) -> list[str]:
    lines = []
    for r in dialogue_rows(400, seed):
        lines.append(f"Description: {r['Description']} Patient: {r['Patient']} Doctor: {r['Doctor']}")
    return lines


def make_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 400, seed: int = 0) -> Path:
    """Train a Llama-style sentencepiece BPE tokenizer and save it in HF layout."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        seed_sentencepiece_size=1000,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 512,
                "legacy": False,
            },
            indent=2,
        )
    )
    # let transformers derive tokenizer.json once, as with a real Llama-2 checkout
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def make_tiny_llama(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 400,
) -> Path:
    """Write a tiny random Llama (safetensors) plus tokenizer into ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    make_tokenizer(out, vocab_size=vocab_size, seed=seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    d = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny")
    make_tiny_llama(d / "model")
    make_dialogue_parquet(d / "data.parquet")
    print(d.resolve())
