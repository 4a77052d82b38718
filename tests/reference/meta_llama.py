"""A from-the-math reference of Meta's original Llama forward pass, on Meta's own state dict.

Deliberately independent of ``hpcjobs.train.convert``: it reads the ``consolidated.*.pth`` shards
itself, merges them with its own table, and keeps Meta's conventions throughout — weight names
``layers.N.attention.wq`` etc., rotary embeddings as complex rotations of *interleaved* pairs
``(x[2i], x[2i+1])`` (``torch.view_as_complex``), key/value heads repeated for grouped-query
attention, SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``, RMSNorm, all in float32. No rotary
permutation happens here, so comparing its logits with a converted Hugging Face model checks
the conversion's permutation, merge and config end to end.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# How Meta's model-parallel layers shard their weights. ColumnParallelLinear splits the output
# features (rows, dim 0), RowParallelLinear the input features (columns, dim 1), and
# ParallelEmbedding splits the embedding dimension (dim 1). Everything else is replicated.
_COLUMN_PARALLEL = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.", "feed_forward.w3.")
_ROW_PARALLEL = ("attention.wo.", "feed_forward.w2.")


def _concat_dim(name: str) -> int | None:
    if name.startswith("tok_embeddings."):
        return 1
    if name.startswith("output."):
        return 0
    if any(tag in name for tag in _COLUMN_PARALLEL):
        return 0
    if any(tag in name for tag in _ROW_PARALLEL):
        return 1
    return None


def load_meta_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Read every consolidated.NN.pth of a Meta checkpoint and merge them into one fp32 state dict."""
    ckpt_dir = Path(ckpt_dir)
    files = sorted(ckpt_dir.glob("consolidated.*.pth"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    merged = {}
    for name in parts[0]:
        d = _concat_dim(name)
        if d is None or len(parts) == 1:
            merged[name] = parts[0][name].float()
        else:
            merged[name] = torch.cat([p[name].float() for p in parts], dim=d)
    return merged


@dataclass
class MetaArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float
    rope_theta: float = 10000.0

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, state_dict: dict[str, torch.Tensor]) -> "MetaArgs":
        p = json.loads((Path(ckpt_dir) / "params.json").read_text())
        return cls(
            dim=p["dim"],
            n_layers=p["n_layers"],
            n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
            vocab_size=state_dict["tok_embeddings.weight"].shape[0],
            norm_eps=p["norm_eps"],
            rope_theta=p.get("rope_theta", 10000.0),
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rotary_frequencies(head_dim: int, seq_len: int, theta: float) -> torch.Tensor:
    """Complex unit rotations e^{i * t * theta^(-2k/head_dim)}: shape (seq_len, head_dim // 2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def rotate_interleaved(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); pairs (2i, 2i+1) are read as complex numbers and rotated."""
    b, t, h, d = x.shape
    xc = torch.view_as_complex(x.float().reshape(b, t, h, d // 2, 2).contiguous())
    out = torch.view_as_real(xc * rot.view(1, t, 1, d // 2))
    return out.reshape(b, t, h, d)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, seq, kv_heads, head_dim) → (batch, seq, kv_heads * n_rep, head_dim), each kv head repeated."""
    if n_rep == 1:
        return x
    b, t, h, d = x.shape
    return x[:, :, :, None, :].expand(b, t, h, n_rep, d).reshape(b, t, h * n_rep, d)


def attention(x: torch.Tensor, sd: dict, prefix: str, args: MetaArgs, rot: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    hd = args.dim // args.n_heads
    q = (x @ sd[prefix + "attention.wq.weight"].T).view(b, t, args.n_heads, hd)
    k = (x @ sd[prefix + "attention.wk.weight"].T).view(b, t, args.n_kv_heads, hd)
    v = (x @ sd[prefix + "attention.wv.weight"].T).view(b, t, args.n_kv_heads, hd)
    q, k = rotate_interleaved(q, rot), rotate_interleaved(k, rot)
    rep = args.n_heads // args.n_kv_heads
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.full((t, t), float("-inf")).triu(1)
    probs = F.softmax(scores + causal, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, t, args.n_heads * hd)
    return out @ sd[prefix + "attention.wo.weight"].T


def feed_forward(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    w1, w2, w3 = (sd[prefix + f"feed_forward.{w}.weight"] for w in ("w1", "w2", "w3"))
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


@torch.no_grad()
def forward(tokens: torch.Tensor, sd: dict[str, torch.Tensor], args: MetaArgs) -> torch.Tensor:
    """Logits (batch, seq, vocab) for ``tokens`` (batch, seq), positions starting at 0, no cache."""
    h = sd["tok_embeddings.weight"][tokens]
    rot = rotary_frequencies(args.dim // args.n_heads, tokens.shape[1], args.rope_theta)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        h = h + attention(rms_norm(h, sd[p + "attention_norm.weight"], args.norm_eps), sd, p, args, rot)
        h = h + feed_forward(rms_norm(h, sd[p + "ffn_norm.weight"], args.norm_eps), sd, p)
    h = rms_norm(h, sd["norm.weight"], args.norm_eps)
    return h @ sd["output.weight"].T


def reference_logits(ckpt_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """Load a Meta checkpoint directory and run :func:`forward` on ``tokens``."""
    sd = load_meta_state_dict(ckpt_dir)
    return forward(tokens, sd, MetaArgs.from_checkpoint(ckpt_dir, sd))
