"""``convert``: a Meta Llama checkpoint to Hugging Face format (job side:
:mod:`hpcjobs.train.convert`); a Hugging Face directory passes through."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..constraints import choice
from ..schema import DTYPES, LLAMA_VERSIONS, StageCfg
from . import register
from .base import StageKind, torch_dtype


@dataclass
class ConvertStage(StageCfg):
    input: str = "${model.source}"
    """Meta checkpoint or Hugging Face directory; a Hugging Face one passes through."""
    output: str = "${run.dir}/hf-model"
    llama_version: int = choice(*LLAMA_VERSIONS, default=2)
    dtype: str = choice(*DTYPES, default="auto")
    """float32, float16, bfloat16 or auto (from profile.precision)."""


def _meta_or_hf(path: Path) -> str:
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        if not (path / "tokenizer.model").is_file():
            return "meta-no-tokenizer"
        return "meta"
    return ""


class Convert(StageKind):
    name = "convert"
    summary = "Meta checkpoint -> Hugging Face (an HF directory passes through)"
    settings = ConvertStage
    entry_point = "hpcjobs.train.convert"
    sections = ("model",)
    path_keys = ("input", "output")

    def preflight(self, plan, sp, composed, produced):
        src = Path(sp.cfg.input)
        key = f"{sp.name}.input"
        if not src.is_dir():
            raise composed.error(key, f"{src} is not a directory")
        found = _meta_or_hf(src)
        if found == "meta-no-tokenizer":
            raise composed.error(key, f"{src} has a Meta checkpoint but no tokenizer.model "
                                 "(Meta ships it beside the llama-2-* folders: copy it in)")
        if not found:
            raise composed.error(key, f"{src} is neither a Meta checkpoint (params.json, consolidated.*.pth, "
                                 "tokenizer.model) nor a Hugging Face model (config.json)")

    def template_vars(self, plan, sp):
        return {"dtype": torch_dtype(sp.cfg.dtype, plan.chain.profile.precision)}


register(Convert())
