"""The ``convert`` stage: a Meta Llama checkpoint → a Hugging Face ``LlamaForCausalLM`` directory.

transformers dropped ``convert_llama_weights_to_hf.py`` after 4.47, so hpcjobs does this itself.

    python -m hpcjobs.train.convert --input DIR --output DIR [--llama-version 1|2]
        [--dtype auto|float32|float16|bfloat16] [--max-position-embeddings N] [--max-shard-size 5GB]

Input: Meta's layout — ``consolidated.00.pth`` [``consolidated.01.pth`` …], ``params.json`` and
``tokenizer.model`` (looked up in DIR, then in DIR's parent, where Meta's download script puts it).
An input that is already in Hugging Face format (it has ``config.json``) is passed through:
the output directory gets symbolic links to the input's files, nothing is copied.

Output: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json`` above ``--max-shard-size``),
and the tokenizer: ``tokenizer.json`` + ``tokenizer_config.json`` (+ the original
``tokenizer.model``). The output is written to a temporary sibling directory and renamed into
place at the end, so a failed run leaves no half-written output behind.

What the conversion does:

* merges model-parallel shards: wq/wk/wv/w1/w3/output are split along dim 0, wo/w2 and
  tok_embeddings along dim 1, norms are replicated (with grouped-query attention every shard
  holds n_kv_heads/num_shards key/value heads, which the dim-0 concatenation puts in order);
* permutes the rows of wq/wk from Meta's rotary layout (interleaved pairs (2i, 2i+1) rotated as
  complex numbers) to Hugging Face's ``rotate_half`` layout (pairs (i, i + head_dim/2));
* intermediate size from ``multiple_of``/``ffn_dim_multiplier`` exactly as Meta's FeedForward;
* Llama 1 vs 2: default context length 2048 vs 4096, ``norm_eps`` from params.json (defaults
  1e-6 vs 1e-5); ``vocab_size: -1`` means the tokenizer's size;
* the tokenizer is rebuilt from ``tokenizer.model`` as a ``tokenizers`` BPE with byte fallback
  that encodes exactly like sentencepiece (dummy prefix included), prepends BOS and appends no
  EOS. It has no pad token (Llama has none); callers choose one (TRL's SFTTrainer uses EOS).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from hpcjobs.errors import HpcjobsError

log = logging.getLogger("hpcjobs.train.convert")

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_MAX_SHARD_SIZE = "5GB"
CONTEXT_LENGTH = {1: 2048, 2: 4096}
DEFAULT_NORM_EPS = {1: 1e-6, 2: 1e-5}
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# Meta model-parallel layout: the dim a weight is split along; absent = replicated.
_CAT_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "wo": 1,
    "w1": 0,
    "w3": 0,
    "w2": 1,
}


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------

def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' → bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise HpcjobsError(f"cannot read size {text!r}", hint="write it like 5GB, 500MB or 2GiB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(num * base ** " KMGT".index(unit or " "))


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward hidden size: int(2/3 * 4*dim), times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def permute_rotary(w, n_heads: int):
    """Reorder the rows of a q/k projection from Meta's interleaved rotary layout to HF's rotate_half.

    Within each head, Meta rotates row pairs (2i, 2i+1); HF rotates (i, i + head_dim/2).
    New row i (first half) is old row 2i, new row head_dim/2 + i is old row 2i + 1.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _dir_is_nonempty(p: Path) -> bool:
    return p.exists() and (not p.is_dir() or any(p.iterdir()))


# --------------------------------------------------------------------------------------
# input discovery
# --------------------------------------------------------------------------------------

@dataclass
class MetaCheckpoint:
    root: Path
    params: dict
    shards: list[Path]
    tokenizer_model: Path


def find_meta_checkpoint(input_dir: Path) -> MetaCheckpoint:
    """Locate params.json, consolidated.*.pth and tokenizer.model; raise HpcjobsError if any is missing."""
    params_path = input_dir / "params.json"
    if not params_path.is_file():
        raise HpcjobsError(
            f"{input_dir}: no params.json — not a Meta Llama checkpoint directory",
            hint="point --input at the folder holding params.json and consolidated.00.pth "
            "(e.g. llama-2-7b/), or at a Hugging Face folder with config.json",
        )
    try:
        params = json.loads(params_path.read_text())
    except (OSError, ValueError) as e:
        raise HpcjobsError(f"{params_path}: cannot read params.json: {e}") from e
    if not isinstance(params, dict):
        raise HpcjobsError(f"{params_path}: expected a JSON object, got {type(params).__name__}")
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise HpcjobsError(f"{params_path}: missing key {key!r}")

    found = []
    for p in input_dir.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    if not found:
        raise HpcjobsError(
            f"{input_dir}: no consolidated.*.pth weight files",
            hint="a Meta checkpoint has consolidated.00.pth (and .01, .02, … for model-parallel shards)",
        )
    found.sort()
    indices = [i for i, _ in found]
    if indices != list(range(len(found))):
        raise HpcjobsError(
            f"{input_dir}: shard files are not numbered 00..{len(found) - 1:02d}: "
            + ", ".join(p.name for _, p in found),
            hint="a shard is missing or an extra file was copied in",
        )

    tok = input_dir / "tokenizer.model"
    if not tok.is_file():
        parent_tok = input_dir.parent / "tokenizer.model"
        if parent_tok.is_file():
            tok = parent_tok
        else:
            raise HpcjobsError(
                f"{input_dir}: no tokenizer.model (looked in {input_dir} and {input_dir.parent})",
                hint="copy Meta's tokenizer.model next to params.json",
            )
    return MetaCheckpoint(input_dir, params, [p for _, p in found], tok)


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------

def _load_sp_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # pragma: no cover - sentencepiece is in the train extra
        raise HpcjobsError("the convert stage needs sentencepiece (pip install 'hpcjobs[train]')") from e
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:
        raise HpcjobsError(f"{path}: not a sentencepiece model: {e}") from e
    if not proto.pieces:
        raise HpcjobsError(f"{path}: not a sentencepiece model (no pieces)")
    return proto


def build_tokenizer(tokenizer_model: str | Path, *, model_max_length: int | None = None):
    """A transformers tokenizer (``TokenizersBackend``) that encodes exactly like ``tokenizer.model``.

    sentencepiece BPE → ``tokenizers`` BPE with byte fallback; merges ranked by piece id (sentencepiece
    BPE scores are -id); normalizer = prepend "▁" then spaces → "▁" (sentencepiece's dummy prefix and
    whitespace escaping); post-processor prepends BOS, no EOS. No pad token.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import TokenizersBackend

    path = Path(tokenizer_model)
    proto = _load_sp_proto(path)
    spec, nspec = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != 2:  # 1 unigram, 2 BPE, 3 word, 4 char
        raise HpcjobsError(
            f"{path}: sentencepiece model type {spec.model_type} is not BPE; Llama tokenizers are BPE "
            "and only those are supported"
        )
    if nspec.remove_extra_whitespaces or (nspec.name not in ("identity", "") and nspec.precompiled_charsmap):
        log.warning(
            "tokenizer.model normalizes text (rule %r, remove_extra_whitespaces=%s); Llama's does not. "
            "The converted tokenizer keeps whitespace and does not apply the rule, so it may differ "
            "from sentencepiece on such text", nspec.name, nspec.remove_extra_whitespaces,
        )

    NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # sentencepiece piece types (BYTE is 6)
    vocab: dict[str, int] = {}
    for i, piece in enumerate(proto.pieces):
        vocab[piece.piece] = i
    mergeable = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (NORMAL, USER_DEFINED)}
    merges: list[tuple[str, str]] = []
    for i, piece in enumerate(proto.pieces):
        if piece.type != NORMAL or len(piece.piece) < 2:
            continue
        s = piece.piece
        splits = [(s[:k], s[k:]) for k in range(1, len(s)) if s[:k] in mergeable and s[k:] in mergeable]
        splits.sort(key=lambda lr: (mergeable[lr[0]], mergeable[lr[1]]))
        merges.extend(splits)

    unk = spec.unk_piece or "<unk>"
    bos = spec.bos_piece or "<s>"
    eos = spec.eos_piece or "</s>"
    if spec.bos_id < 0 or spec.eos_id < 0:
        raise HpcjobsError(f"{path}: tokenizer has no BOS/EOS pieces (bos_id={spec.bos_id}, eos_id={spec.eos_id})")

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                        byte_fallback=bool(spec.byte_fallback), dropout=None))
    norm = [normalizers.Replace(" ", "▁")]
    if nspec.add_dummy_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = None
    dec = [decoders.Replace("▁", " ")]
    if spec.byte_fallback:
        dec += [decoders.ByteFallback()]
    dec += [decoders.Fuse()]
    if nspec.add_dummy_prefix:
        dec += [decoders.Strip(content=" ", left=1, right=0)]
    tok.decoder = decoders.Sequence(dec)
    specials = [AddedToken(p.piece, special=True, normalized=False)
                for p in proto.pieces if p.type in (UNKNOWN, CONTROL)]
    tok.add_special_tokens(specials)
    user = [AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces if p.type == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, spec.bos_id)],
    )
    kwargs = {}
    if model_max_length:
        kwargs["model_max_length"] = int(model_max_length)
    hf = TokenizersBackend(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        vocab_file=str(path),
        **kwargs,
    )
    return hf


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------

class ShardSet:
    """The model-parallel shards of a Meta checkpoint, memory-mapped; merges one weight at a time."""

    def __init__(self, paths: Sequence[Path]):
        import torch

        self.paths = list(paths)
        self.sds = []
        for p in self.paths:
            try:
                sd = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise HpcjobsError(f"{p}: cannot load shard: {e}") from e
            if not isinstance(sd, dict):
                raise HpcjobsError(f"{p}: expected a state dict, got {type(sd).__name__}")
            self.sds.append(sd)
        keys0 = set(self.sds[0])
        for p, sd in zip(self.paths[1:], self.sds[1:]):
            if set(sd) != keys0:
                diff = sorted(set(sd) ^ keys0)[:5]
                raise HpcjobsError(
                    f"shards disagree on their weights: {self.paths[0].name} and {p.name} differ in {diff}"
                )
        for k in sorted(keys0):
            shapes = [tuple(sd[k].shape) for sd in self.sds]
            if len(set(shapes)) != 1:
                detail = ", ".join(f"{p.name}: {list(s)}" for p, s in zip(self.paths, shapes))
                raise HpcjobsError(f"shard shapes disagree for {k}: {detail}")
        self.keys = keys0

    @property
    def dtype(self):
        return self.sds[0]["tok_embeddings.weight"].dtype if "tok_embeddings.weight" in self.keys else None

    @staticmethod
    def cat_dim(key: str) -> int | None:
        parts = key.split(".")
        name = parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else parts[0]
        if parts[0] in ("tok_embeddings", "output"):
            name = parts[0]
        return _CAT_DIM.get(name)

    def merged_shape(self, key: str) -> tuple[int, ...]:
        shape = list(self.sds[0][key].shape)
        d = self.cat_dim(key)
        if d is not None:
            shape[d] *= len(self.sds)
        return tuple(shape)

    def get(self, key: str):
        import torch

        if key not in self.keys:
            raise HpcjobsError(f"checkpoint has no weight {key!r}")
        d = self.cat_dim(key)
        if d is None or len(self.sds) == 1:
            return self.sds[0][key]
        return torch.cat([sd[key] for sd in self.sds], dim=d)


@dataclass
class ModelDims:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int


def _dims(params: dict, *, tokenizer_vocab: int, llama_version: int, max_pos: int | None) -> ModelDims:
    dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    n_kv = int(params.get("n_kv_heads") or n_heads)
    if dim % n_heads:
        raise HpcjobsError(f"params.json: dim {dim} is not a multiple of n_heads {n_heads}")
    if n_heads % n_kv:
        raise HpcjobsError(f"params.json: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}")
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:
        vocab = tokenizer_vocab
    multiple_of = int(params.get("multiple_of", 256))
    ffn_mult = params.get("ffn_dim_multiplier")
    return ModelDims(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=dim // n_heads,
        hidden_dim=intermediate_size(dim, multiple_of, float(ffn_mult) if ffn_mult is not None else None),
        vocab_size=vocab,
        norm_eps=float(params.get("norm_eps", DEFAULT_NORM_EPS[llama_version])),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        max_position_embeddings=int(max_pos or CONTEXT_LENGTH[llama_version]),
    )


def _plan(d: ModelDims, shards: ShardSet) -> list[tuple[str, str, tuple[int, ...], Callable]]:
    """(hf_name, meta_name, expected_shape, transform) in file order; checks every shape first."""
    ident = lambda t: t  # noqa: E731
    qperm = lambda t: permute_rotary(t, d.n_heads)  # noqa: E731
    kperm = lambda t: permute_rotary(t, d.n_kv_heads)  # noqa: E731
    kv = d.n_kv_heads * d.head_dim
    plan = [("model.embed_tokens.weight", "tok_embeddings.weight", (d.vocab_size, d.dim), ident)]
    for i in range(d.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        plan += [
            (h + "self_attn.q_proj.weight", m + "attention.wq.weight", (d.n_heads * d.head_dim, d.dim), qperm),
            (h + "self_attn.k_proj.weight", m + "attention.wk.weight", (kv, d.dim), kperm),
            (h + "self_attn.v_proj.weight", m + "attention.wv.weight", (kv, d.dim), ident),
            (h + "self_attn.o_proj.weight", m + "attention.wo.weight", (d.dim, d.n_heads * d.head_dim), ident),
            (h + "mlp.gate_proj.weight", m + "feed_forward.w1.weight", (d.hidden_dim, d.dim), ident),
            (h + "mlp.down_proj.weight", m + "feed_forward.w2.weight", (d.dim, d.hidden_dim), ident),
            (h + "mlp.up_proj.weight", m + "feed_forward.w3.weight", (d.hidden_dim, d.dim), ident),
            (h + "input_layernorm.weight", m + "attention_norm.weight", (d.dim,), ident),
            (h + "post_attention_layernorm.weight", m + "ffn_norm.weight", (d.dim,), ident),
        ]
    plan += [
        ("model.norm.weight", "norm.weight", (d.dim,), ident),
        ("lm_head.weight", "output.weight", (d.vocab_size, d.dim), ident),
    ]
    for hf_name, meta_name, want, _ in plan:
        if meta_name not in shards.keys:
            raise HpcjobsError(
                f"checkpoint has no weight {meta_name!r} (params.json says n_layers={d.n_layers})"
            )
        got = shards.merged_shape(meta_name)
        if got != want:
            hint = None
            if meta_name.endswith(("w1.weight", "w3.weight", "w2.weight")):
                hint = "intermediate size comes from params.json's multiple_of and ffn_dim_multiplier"
            elif meta_name in ("tok_embeddings.weight", "output.weight"):
                hint = "vocab size comes from params.json's vocab_size, or the tokenizer when it is -1"
            raise HpcjobsError(
                f"{meta_name}: merged shape {list(got)} does not match params.json (expected {list(want)}; "
                f"{len(shards.sds)} shard(s) of {list(shards.sds[0][meta_name].shape)})",
                hint=hint,
            )
    extra = sorted(k for k in shards.keys - {m for _, m, _, _ in plan} if k != "rope.freqs")
    if extra:
        log.warning("ignoring %d unexpected weight(s) in the checkpoint: %s", len(extra), extra[:5])
    return plan


def _write_weights(plan, shards: ShardSet, out: Path, dtype, max_shard_bytes: int) -> tuple[int, int]:
    """Write the plan as safetensors files of at most max_shard_bytes; returns (n_files, total bytes)."""
    import math

    import torch
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list] = [[]]
    size = 0
    total = 0
    for entry in plan:
        n = math.prod(entry[2]) * itemsize
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
        total += n
    nfiles = len(groups)
    weight_map = {}
    for gi, group in enumerate(groups, start=1):
        fname = "model.safetensors" if nfiles == 1 else f"model-{gi:05d}-of-{nfiles:05d}.safetensors"
        t0 = time.perf_counter()
        tensors = {}
        for hf_name, meta_name, _, fn in group:
            tensors[hf_name] = fn(shards.get(meta_name)).to(dtype).contiguous()
            weight_map[hf_name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        log.info("wrote %s: %d tensors, %s in %.1fs", fname, len(group), _human(nbytes), time.perf_counter() - t0)
    if nfiles > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return nfiles, total


def _apply_umask(root: Path) -> None:
    """mkdtemp makes a 0700 directory; give the output the permissions a plain mkdir would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for p in root.iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o666 & ~mask)


# --------------------------------------------------------------------------------------
# pass-through
# --------------------------------------------------------------------------------------

def link_hf_checkpoint(input_dir: Path, output_dir: Path) -> list[Path]:
    """Make output_dir hold symbolic links to every entry of a Hugging Face input directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    links = []
    for src in sorted(input_dir.iterdir()):
        dst = output_dir / src.name
        os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
        links.append(dst)
    return links


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------

def convert_checkpoint(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    llama_version: int = 2,
    dtype: str = "auto",
    max_position_embeddings: int | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Convert a Meta checkpoint directory (or pass a Hugging Face one through); returns ``output_dir``.

    ``dtype``: ``auto`` keeps the checkpoint's storage dtype (bfloat16 for Meta's releases).
    Raises :class:`HpcjobsError` with an actionable message on bad input.
    """
    t_start = time.perf_counter()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if llama_version not in (1, 2):
        raise HpcjobsError(f"--llama-version must be 1 or 2, not {llama_version!r}")
    if dtype not in DTYPES:
        raise HpcjobsError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if max_position_embeddings is not None and max_position_embeddings <= 0:
        raise HpcjobsError(f"--max-position-embeddings must be positive, not {max_position_embeddings}")
    max_shard_bytes = parse_size(max_shard_size)
    if not input_dir.is_dir():
        raise HpcjobsError(f"input {input_dir} is not a directory")
    if _dir_is_nonempty(output_dir):
        raise HpcjobsError(
            f"output {output_dir} is not empty",
            hint="choose a new --output directory or remove the old one; convert never overwrites",
        )
    if output_dir.resolve() == input_dir.resolve():
        raise HpcjobsError("--output must differ from --input")

    if (input_dir / "config.json").is_file():
        links = link_hf_checkpoint(input_dir, output_dir)
        log.info(
            "input %s is already in Hugging Face format (config.json found): linked %d entries into %s "
            "instead of converting (no copy)", input_dir, len(links), output_dir,
        )
        if dtype != "auto" or max_position_embeddings is not None:
            log.info("pass-through ignores --dtype/--max-position-embeddings")
        return output_dir

    import torch
    from transformers import GenerationConfig, LlamaConfig

    ckpt = find_meta_checkpoint(input_dir)
    log.info("input: Meta checkpoint %s, %d shard(s): %s", input_dir, len(ckpt.shards),
             ", ".join(p.name for p in ckpt.shards))
    log.info("params.json: %s", json.dumps(ckpt.params, sort_keys=True))

    proto = _load_sp_proto(ckpt.tokenizer_model)
    tok_vocab = len(proto.pieces)
    log.info("tokenizer: %s (%d pieces, bos=%d eos=%d unk=%d)", ckpt.tokenizer_model, tok_vocab,
             proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.unk_id)
    d = _dims(ckpt.params, tokenizer_vocab=tok_vocab, llama_version=llama_version, max_pos=max_position_embeddings)
    if int(ckpt.params.get("vocab_size", -1)) > 0 and d.vocab_size != tok_vocab:
        log.warning("params.json vocab_size %d differs from the tokenizer's %d pieces", d.vocab_size, tok_vocab)

    t0 = time.perf_counter()
    shards = ShardSet(ckpt.shards)
    if d.n_heads % len(ckpt.shards) or d.n_kv_heads % len(ckpt.shards):
        raise HpcjobsError(
            f"{len(ckpt.shards)} shards cannot split n_heads={d.n_heads} / n_kv_heads={d.n_kv_heads} evenly"
        )
    plan = _plan(d, shards)
    src_dtype = shards.dtype or torch.float32
    out_dtype = src_dtype if dtype == "auto" else getattr(torch, dtype)
    log.info(
        "model: Llama %d, dim=%d layers=%d heads=%d kv_heads=%d head_dim=%d intermediate=%d vocab=%d "
        "norm_eps=%g rope_theta=%g context=%d",
        llama_version, d.dim, d.n_layers, d.n_heads, d.n_kv_heads, d.head_dim, d.hidden_dim, d.vocab_size,
        d.norm_eps, d.rope_theta, d.max_position_embeddings,
    )
    log.info("dtype: %s → %s; shards opened (mmap) in %.1fs", str(src_dtype).removeprefix("torch."),
             str(out_dtype).removeprefix("torch."), time.perf_counter() - t0)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        nfiles, total = _write_weights(plan, shards, tmp, out_dtype, max_shard_bytes)
        config = LlamaConfig(
            vocab_size=d.vocab_size,
            hidden_size=d.dim,
            intermediate_size=d.hidden_dim,
            num_hidden_layers=d.n_layers,
            num_attention_heads=d.n_heads,
            num_key_value_heads=d.n_kv_heads,
            head_dim=d.head_dim,
            hidden_act="silu",
            max_position_embeddings=d.max_position_embeddings,
            rms_norm_eps=d.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta},
            tie_word_embeddings=False,
            bos_token_id=proto.trainer_spec.bos_id,
            eos_token_id=proto.trainer_spec.eos_id,
            pad_token_id=None,
            attention_bias=False,
            mlp_bias=False,
            architectures=["LlamaForCausalLM"],
            dtype=str(out_dtype).removeprefix("torch."),
        )
        config.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=proto.trainer_spec.bos_id, eos_token_id=proto.trainer_spec.eos_id
        ).save_pretrained(tmp)
        tokenizer = build_tokenizer(ckpt.tokenizer_model, model_max_length=d.max_position_embeddings)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "tokenizer.model").exists():
            shutil.copyfile(ckpt.tokenizer_model, tmp / "tokenizer.model")
        del shards
        _apply_umask(tmp)
        if output_dir.exists():
            output_dir.rmdir()  # checked empty above
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "wrote %s: %d weight file(s), %s, tokenizer + config in %.1fs total",
        output_dir, nfiles, _human(total), time.perf_counter() - t_start,
    )
    return output_dir


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hpcjobs.train.convert",
        description="Convert a Meta Llama checkpoint (consolidated.*.pth, params.json, tokenizer.model) "
        "to a Hugging Face LlamaForCausalLM directory. A Hugging Face input is linked through.",
    )
    ap.add_argument("--input", required=True, type=Path, help="Meta checkpoint directory (or a HF one)")
    ap.add_argument("--output", required=True, type=Path, help="new or empty output directory")
    ap.add_argument("--llama-version", type=int, choices=(1, 2), default=2,
                    help="sets the default context length (2048 / 4096) and norm eps; default 2")
    ap.add_argument("--dtype", choices=DTYPES, default="auto",
                    help="weight dtype of the output; auto keeps the checkpoint's (default)")
    ap.add_argument("--max-position-embeddings", type=int, default=None,
                    help="context length written to config.json (default by --llama-version)")
    ap.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                    help=f"largest safetensors file (default {DEFAULT_MAX_SHARD_SIZE})")
    args = ap.parse_args(argv)

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s convert: %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        convert_checkpoint(
            args.input, args.output, llama_version=args.llama_version, dtype=args.dtype,
            max_position_embeddings=args.max_position_embeddings, max_shard_size=args.max_shard_size,
        )
    except HpcjobsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
