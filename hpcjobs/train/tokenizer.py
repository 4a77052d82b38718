"""Train a byte-level BPE tokenizer on a corpus (the ``tokenizer`` stage), or check a given one.

    python -m hpcjobs.train.tokenizer --config tokenizer-stage.json --output DIR
    python -m hpcjobs.train.tokenizer --config tokenizer-stage.json --check DIR --output DIR2

tokenizer-stage.json (written by :mod:`hpcjobs.stages.tokenizer`)::

    data        {path, columns, template, split, seed}: see hpcjobs.train.data
    vocab_size  size of the trained vocabulary, bytes and special tokens included

The tokenizer is trained on the *train* split only (the same split the pretrain and
evaluate stages make), with the ``tokenizers`` library: byte-level pre-tokenization (GPT-2
style, so every text round-trips and nothing is ever unknown), BPE merges up to
``vocab_size``, special tokens ``<pad>`` (0), ``<s>`` (1) and ``</s>`` (2). ``<s>`` is put in
front of every encoded text (a template post-processor), as Llama's tokenizer does;
``</s>`` ends each document when the pretrain stage packs the corpus. Saved as a
``PreTrainedTokenizerFast`` directory (``AutoTokenizer.from_pretrained`` loads it).

Exit codes: 0 done, 2 bad input (message printed), 1 crash.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from hpcjobs.errors import HpcjobsError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def log(msg: str) -> None:
    print(f"[hpcjobs.tokenizer] {msg}", flush=True)


def train_bpe(texts: Iterable[str], vocab_size: int, *, model_max_length: int = 1 << 20):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="right", model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def check_tokenizer(path: str) -> Any:
    """Load a tokenizer directory; it needs an end-of-sequence token (documents are separated by it)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise HpcjobsError(f"{path}: tokenizer directory not found")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # the library's own message says what is missing
        raise HpcjobsError(f"{path}: cannot load the tokenizer: {e}") from None
    if tok.eos_token_id is None:
        raise HpcjobsError(f"{path}: the tokenizer has no end-of-sequence token (eos_token)")
    return tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcjobs.train.tokenizer", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="tokenizer-stage.json")
    ap.add_argument("--output", required=True, help="directory for the tokenizer")
    ap.add_argument("--check", metavar="DIR", help="a given tokenizer: check that it loads and save a copy to "
                    "--output instead of training one")
    a = ap.parse_args(argv)
    # no progress bars in the job's log (datasets' map/save, transformers' shard writing)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    t0 = time.time()
    try:
        cfg = json.loads(Path(a.config).read_text(encoding="utf-8"))
        if a.check:
            tok = check_tokenizer(a.check)
            tok.save_pretrained(a.output)   # the tokenizer files only, whatever else the directory holds
            log(f"using the given tokenizer {a.check}: {len(tok)} tokens, bos={tok.bos_token!r} "
                f"eos={tok.eos_token!r} pad={tok.pad_token!r}; nothing to train; a copy is in the run directory")
            return 0
        from hpcjobs.train.data import load_splits

        texts = list(load_splits(cfg["data"])["train"]["text"])
        log(f"training a byte-level BPE tokenizer (vocab_size {cfg['vocab_size']}) on {len(texts)} texts")
        tok = train_bpe(texts, int(cfg["vocab_size"]))
        Path(a.output).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(a.output)
        sample = texts[0][:60] if texts else ""
        ids = tok(sample)["input_ids"]
        log(f"saved {len(tok)} tokens to {a.output} in {time.time() - t0:.1f}s; "
            f"{sample!r} -> {len(ids)} tokens")
    except HpcjobsError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
