"""``tokenizer``: a byte-level BPE tokenizer trained on the corpus (job side:
:mod:`hpcjobs.train.tokenizer`), or a tokenizer you already have, checked and used as it is.

CPU only: the stage asks Slurm for no GPU. The trained tokenizer is a Hugging Face
directory (``PreTrainedTokenizerFast``: ``tokenizer.json``, ``tokenizer_config.json``)
with ``<pad>`` (0), ``<s>`` (1, added in front of every text) and ``</s>`` (2).

``existing``: a tokenizer directory to use instead of training one. The stage then trains
nothing: it checks that the directory loads and saves a copy of its tokenizer files to
``output`` (the record of what the run used). The ``llm-pretrain`` recipe wires it to
``pretrain.tokenizer``, so ``pretrain.tokenizer=/path`` is all it takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..constraints import number
from ..schema import StageCfg
from . import register
from .base import PlanContext, StageKind, plain, to_json

#: byte-level BPE starts from the 256 byte symbols; the special tokens come on top
MIN_VOCAB = 256 + 3


@dataclass
class TokenizerStage(StageCfg):
    vocab_size: int = number(6400, ge=MIN_VOCAB, le=1_048_576)
    """Tokens in the trained vocabulary, the 256 bytes and 3 special tokens included
    (fewer when the corpus has no more merges to learn)."""
    existing: Optional[str] = None
    """A Hugging Face tokenizer directory to use instead of training one; None (or the
    stage's own output): train."""
    output: str = "${run.dir}/tokenizer"


class Tokenizer(StageKind):
    name = "tokenizer"
    summary = "byte-level BPE tokenizer trained on the corpus (or one you give, checked)"
    settings = TokenizerStage
    entry_point = "hpcjobs.train.tokenizer"
    sections = ("data",)
    path_keys = ("existing", "output")

    def plan(self, ctx: PlanContext):
        return [], []

    def _given(self, s: TokenizerStage) -> Optional[str]:
        return s.existing if s.existing and s.existing != s.output else None

    def preflight(self, plan, sp, composed, produced):
        given = self._given(sp.cfg)
        if given is None or given in produced:
            return
        if not Path(given).is_dir():
            raise composed.error(f"{sp.name}.existing", f"{given} is not a directory")
        if not any((Path(given) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                         "tokenizer.model")):
            raise composed.error(f"{sp.name}.existing", f"{given} holds no Hugging Face tokenizer "
                                 "(tokenizer.json, tokenizer_config.json or tokenizer.model)")

    def files(self, plan, sp):
        s: TokenizerStage = sp.cfg
        return {"tokenizer-stage.json": to_json({
            "data": plain(plan.chain.data),
            "vocab_size": s.vocab_size,
            "existing": self._given(s),
        })}

    def template_vars(self, plan, sp):
        return {"given": self._given(sp.cfg)}


register(Tokenizer())
