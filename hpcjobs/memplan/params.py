"""Exact parameter counts from a model configuration, without weights and without torch.

Input: the dict of a Hugging Face ``config.json`` or of a Meta ``params.json``. The counts are
those of ``sum(p.numel() for p in model.parameters())`` (shared tensors counted once) of the
model class a training run builds: ``*ForCausalLM`` for decoder-only models (Llama, Qwen2,
Bloom), ``T5ForConditionalGeneration`` for T5, ``BertModel`` (with pooler) for BERT-style
encoders. ``tests/test_memplan_params.py`` checks them against transformers on the meta device.

Besides the total, :class:`ModelShape` keeps the linear layers of one block (name -> (in, out))
so that LoRA's adapter size for any ``target_modules`` is exact too, and the dimensions the
activation estimate needs (hidden size, layers, heads, vocabulary, intermediate size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

__all__ = ["ModelShape", "UnsupportedModel", "model_shape", "meta_intermediate_size", "load_config",
           "sentencepiece_vocab_size"]


class UnsupportedModel(ValueError):
    """A configuration this module cannot count (unknown architecture or missing key)."""


@dataclass
class ModelShape:
    arch: str                       # llama, qwen2, bloom, t5, bert
    hidden: int
    layers: int                     # transformer blocks (encoder + decoder for T5)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    total: int                      # every parameter, shared ones once
    embedding: int                  # input embeddings (incl. position / token type)
    lm_head: int                    # output projection when not tied (0 when tied or absent)
    tied: bool
    # Linear layers per block: (name, in_features, out_features, count over the whole model).
    linears: List[Tuple[str, int, int, int]] = field(default_factory=list)
    decoder: bool = True            # has a vocabulary-sized output (logits)
    # Every parameter tensor: (elements, how many such tensors); sums to ``total``. ZeRO-3 keeps
    # tensors below its persistence threshold whole on every rank (:meth:`persistent_params`).
    tensors: List[Tuple[int, int]] = field(default_factory=list)

    def lora_params(self, r: int, targets: List[str]) -> int:
        """Trainable parameters PEFT's LoRA adds: r*(in+out) per targeted linear (lora_A, lora_B).

        PEFT matches a target name against the end of each module's name; so do we, on the last
        component.
        """
        return sum(r * (i + o) * n for name, i, o, n in self.linears
                   if any(_matches(name, t) for t in targets))

    def lora_targets_found(self, targets: List[str]) -> List[str]:
        return [t for t in targets if any(_matches(name, t) for name, *_ in self.linears)]

    def persistent_params(self, threshold: int) -> int:
        """Elements in tensors smaller than ``threshold``: what ZeRO-3 does not partition
        (``stage3_param_persistence_threshold``, DeepSpeed's default 1e5)."""
        return sum(n * c for n, c in self.tensors if n < threshold)

    def lora_tensors(self, r: int, targets: List[str]) -> List[Tuple[int, int]]:
        """The adapter's tensors, (elements, count): lora_A (r x in) and lora_B (out x r)."""
        out: List[Tuple[int, int]] = []
        for name, i, o, n in self.linears:
            if any(_matches(name, t) for t in targets):
                out += [(r * i, n), (r * o, n)]
        return out

    @property
    def largest_layer(self) -> int:
        """Parameters of the largest single module (DeepSpeed's ``largest_layer_params``)."""
        return max([self.vocab * self.hidden] + [i * o for _, i, o, _ in self.linears])


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a plain target name: the module's name is it or ends with ``.target``."""
    return name == target or name.endswith("." + target)


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """Meta's FeedForward hidden size (as hpcjobs/train/convert.py computes it)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _need(cfg: Mapping, *keys: str, default=None):
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    if default is not None:
        return default
    raise UnsupportedModel(f"config has none of {', '.join(keys)}")


def _is_meta(cfg: Mapping) -> bool:
    return "dim" in cfg and "n_layers" in cfg and "n_heads" in cfg


def model_shape(cfg: Mapping, vocab_size: Optional[int] = None) -> ModelShape:
    """The shape and exact parameter count of the model ``cfg`` describes.

    ``vocab_size`` replaces a missing or ``-1`` vocabulary (Meta's params.json says -1: the
    tokenizer's size).
    """
    if _is_meta(cfg):
        return _meta_llama(cfg, vocab_size)
    mt = str(cfg.get("model_type") or "").lower()
    archs = " ".join(cfg.get("architectures") or []).lower()
    if mt in ("llama", "mistral") or (not mt and "llama" in archs):
        return _llama(cfg, "llama", qkv_bias=bool(cfg.get("attention_bias", False)),
                      o_bias=bool(cfg.get("attention_bias", False)), vocab_size=vocab_size)
    if mt == "qwen2" or (not mt and "qwen2" in archs):
        return _llama(cfg, "qwen2", qkv_bias=True, o_bias=False, vocab_size=vocab_size)
    if mt == "bloom" or (not mt and "bloom" in archs):
        return _bloom(cfg, vocab_size)
    if mt in ("t5", "mt5") or (not mt and "t5" in archs):
        return _t5(cfg, vocab_size)
    if mt in ("bert", "roberta") or (not mt and ("bert" in archs)):
        return _bert(cfg, vocab_size)
    raise UnsupportedModel(f"model_type {mt or '(none)'!r} is not known to the memory planner "
                           "(known: llama, qwen2, bloom, t5, bert; or a Meta params.json)")


def _vocab(cfg: Mapping, override: Optional[int]) -> int:
    v = cfg.get("vocab_size")
    if v is None or int(v) <= 0:
        if override is None:
            raise UnsupportedModel("vocab_size is missing or -1 and no tokenizer size was given")
        return int(override)
    return int(v)


def _meta_llama(p: Mapping, vocab_size: Optional[int]) -> ModelShape:
    dim, n_layers, n_heads = int(p["dim"]), int(p["n_layers"]), int(p["n_heads"])
    hf = {
        "model_type": "llama",
        "hidden_size": dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(p.get("n_kv_heads") or n_heads),
        "intermediate_size": meta_intermediate_size(dim, int(p.get("multiple_of", 256)),
                                                    p.get("ffn_dim_multiplier")),
        "vocab_size": p.get("vocab_size", -1),
        "tie_word_embeddings": False,   # Meta's output.weight is its own tensor
    }
    return _llama(hf, "llama", qkv_bias=False, o_bias=False, vocab_size=vocab_size)


def _llama(c: Mapping, arch: str, qkv_bias: bool, o_bias: bool, vocab_size: Optional[int]) -> ModelShape:
    h = int(_need(c, "hidden_size"))
    L = int(_need(c, "num_hidden_layers"))
    a = int(_need(c, "num_attention_heads"))
    kv = int(c.get("num_key_value_heads") or a)
    hd = int(c.get("head_dim") or h // a)
    inter = int(_need(c, "intermediate_size"))
    V = _vocab(c, vocab_size)
    tied = bool(c.get("tie_word_embeddings", False))
    mlp_bias = bool(c.get("mlp_bias", False))
    q, k = a * hd, kv * hd
    per_layer = (h * q + (q if qkv_bias else 0)
                 + 2 * (h * k + (k if qkv_bias else 0))
                 + q * h + (h if o_bias else 0)
                 + 3 * h * inter + (2 * inter + h if mlp_bias else 0)
                 + 2 * h)                                   # input / post-attention RMSNorm
    emb = V * h
    head = 0 if tied else V * h
    total = emb + L * per_layer + h + head
    linears = [("q_proj", h, q, L), ("k_proj", h, k, L), ("v_proj", h, k, L), ("o_proj", q, h, L),
               ("gate_proj", h, inter, L), ("up_proj", h, inter, L), ("down_proj", inter, h, L),
               ("lm_head", h, V, 1)]
    tensors = [(emb, 1), (h * q, L), (h * k, 2 * L), (q * h, L), (h * inter, 2 * L), (inter * h, L),
               (h, 2 * L + 1)]
    tensors += [(q, L), (k, 2 * L)] if qkv_bias else []
    tensors += [(h, L)] if o_bias else []
    tensors += [(inter, 2 * L), (h, L)] if mlp_bias else []
    tensors += [(head, 1)] if head else []
    return ModelShape(arch, h, L, a, kv, hd, V, inter, total, emb, head, tied, linears, tensors=tensors)


def _bloom(c: Mapping, vocab_size: Optional[int]) -> ModelShape:
    h = int(_need(c, "hidden_size", "n_embed"))
    L = int(_need(c, "n_layer", "num_hidden_layers"))
    a = int(_need(c, "n_head", "num_attention_heads"))
    V = _vocab(c, vocab_size)
    tied = bool(c.get("tie_word_embeddings", True))
    per_layer = (2 * h                       # input_layernorm
                 + h * 3 * h + 3 * h          # query_key_value
                 + h * h + h                  # dense
                 + 2 * h                      # post_attention_layernorm
                 + h * 4 * h + 4 * h          # dense_h_to_4h
                 + 4 * h * h + h)             # dense_4h_to_h
    emb = V * h + 2 * h                       # word_embeddings + word_embeddings_layernorm
    head = 0 if tied else V * h
    total = emb + L * per_layer + 2 * h + head
    linears = [("query_key_value", h, 3 * h, L), ("dense", h, h, L),
               ("dense_h_to_4h", h, 4 * h, L), ("dense_4h_to_h", 4 * h, h, L), ("lm_head", h, V, 1)]
    tensors = [(V * h, 1), (h, 2), (h, 2)]                              # embeddings + LN, final LN
    tensors += [(h, 4 * L), (3 * h * h, L), (3 * h, L), (h * h, L), (h, L), (4 * h * h, 2 * L), (4 * h, L),
                (h, L)]
    tensors += [(head, 1)] if head else []
    return ModelShape("bloom", h, L, a, a, h // a, V, 4 * h, total, emb, head, tied, linears, tensors=tensors)


def _t5(c: Mapping, vocab_size: Optional[int]) -> ModelShape:
    d = int(_need(c, "d_model"))
    dkv = int(_need(c, "d_kv"))
    dff = int(_need(c, "d_ff"))
    a = int(_need(c, "num_heads"))
    Le = int(_need(c, "num_layers"))
    Ld = int(c.get("num_decoder_layers") or Le)
    buckets = int(c.get("relative_attention_num_buckets", 32))
    V = _vocab(c, vocab_size)
    tied = bool(c.get("tie_word_embeddings", True))
    gated = str(c.get("feed_forward_proj", "relu")).startswith("gated")
    inner = a * dkv
    attn = 4 * d * inner + d                  # q, k, v, o (no bias) + its layer norm
    ff = (3 if gated else 2) * d * dff + d    # wi (wi_0, wi_1 when gated), wo + layer norm
    enc = Le * (attn + ff) + buckets * a + d  # relative bias in block 0, final_layer_norm
    dec = Ld * (2 * attn + ff) + buckets * a + d
    emb = V * d                               # shared, used by encoder and decoder
    head = 0 if tied else V * d
    total = emb + enc + dec + head
    n_attn = Le + 2 * Ld
    linears = [("q", d, inner, n_attn), ("k", d, inner, n_attn), ("v", d, inner, n_attn),
               ("o", inner, d, n_attn), ("wo", dff, d, Le + Ld)]
    linears += ([("wi_0", d, dff, Le + Ld), ("wi_1", d, dff, Le + Ld)] if gated else [("wi", d, dff, Le + Ld)])
    linears.append(("lm_head", d, V, 1))
    n_ff = (3 if gated else 2) * (Le + Ld)
    tensors = [(emb, 1), (d * inner, 4 * n_attn), (d, n_attn + (Le + Ld) + 2), (d * dff, n_ff),
               (buckets * a, 2)] + ([(head, 1)] if head else [])
    return ModelShape("t5", d, Le + Ld, a, a, dkv, V, dff, total, emb, head, tied, linears, tensors=tensors)


def _bert(c: Mapping, vocab_size: Optional[int]) -> ModelShape:
    h = int(_need(c, "hidden_size"))
    L = int(_need(c, "num_hidden_layers"))
    a = int(_need(c, "num_attention_heads"))
    inter = int(_need(c, "intermediate_size"))
    V = _vocab(c, vocab_size)
    pos = int(c.get("max_position_embeddings", 512))
    types = int(c.get("type_vocab_size", 2))
    per_layer = (3 * (h * h + h) + (h * h + h) + 2 * h     # query, key, value, attention.output.dense, LN
                 + h * inter + inter + inter * h + h + 2 * h)  # intermediate.dense, output.dense, LN
    emb = V * h + pos * h + types * h + 2 * h
    pooler = h * h + h
    total = emb + L * per_layer + pooler
    linears = [("query", h, h, L), ("key", h, h, L), ("value", h, h, L), ("attention.output.dense", h, h, L),
               ("intermediate.dense", h, inter, L), ("output.dense", inter, h, L), ("pooler.dense", h, h, 1)]
    tensors = [(V * h, 1), (pos * h, 1), (types * h, 1), (h, 2), (h * h, 4 * L + 1), (h, 4 * L + 1),
               (h, 4 * L), (h * inter, 2 * L), (inter, L), (h, L)]
    return ModelShape("bert", h, L, a, a, h // a, V, inter, total, emb, 0, False, linears, decoder=False,
                      tensors=tensors)


# ---------------------------------------------------------------- reading from a directory

def sentencepiece_vocab_size(path: Path) -> Optional[int]:
    """Number of pieces in a sentencepiece ``tokenizer.model`` (protobuf ModelProto, field 1).

    A minimal wire-format walk, so no sentencepiece/protobuf import is needed; None when the
    file is not such a protobuf (e.g. an empty placeholder).
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    i, n, count = 0, len(data), 0

    def varint(j):
        shift = val = 0
        while True:
            if j >= n:
                raise ValueError
            b = data[j]
            val |= (b & 0x7F) << shift
            j += 1
            if not b & 0x80:
                return val, j
            shift += 7

    try:
        while i < n:
            key, i = varint(i)
            fnum, wt = key >> 3, key & 7
            if wt == 0:
                _, i = varint(i)
            elif wt == 2:
                ln, i = varint(i)
                i += ln
                if i > n:
                    return None
                if fnum == 1:
                    count += 1
            elif wt == 1:
                i += 8
            elif wt == 5:
                i += 4
            else:
                return None
    except ValueError:
        return None
    return count or None


def load_config(directory: Path, vocab_size: Optional[int] = None) -> Tuple[ModelShape, Path]:
    """The shape of the model in ``directory``: an HF ``config.json`` or a Meta ``params.json``.

    For Meta's ``vocab_size: -1``, the size comes from ``vocab_size`` or the directory's
    ``tokenizer.model``; 32000 (Llama 1/2's tokenizer) when neither says.
    """
    d = Path(directory)
    for name in ("config.json", "params.json"):
        p = d / name
        if p.is_file():
            cfg = json.loads(p.read_text())
            if not isinstance(cfg, dict):
                raise UnsupportedModel(f"{p}: expected a JSON object")
            v = vocab_size
            if v is None and int(cfg.get("vocab_size", -1) or -1) <= 0:
                v = sentencepiece_vocab_size(d / "tokenizer.model") or 32000
            return model_shape(cfg, v), p
    raise UnsupportedModel(f"{d}: neither config.json nor params.json")
