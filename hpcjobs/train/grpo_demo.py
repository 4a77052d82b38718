"""Demo assets of the ``qwen2-grpo`` recipe (``hpcjobs demo-assets --recipe qwen2-grpo DIR``).

Nothing is downloaded. Writes::

    DIR/qwen2-tiny/      a tiny Qwen2ForCausalLM (hidden 64, 2 layers, GQA 4/2 heads) with a byte-level
                         BPE tokenizer trained here; HF layout (config.json, model.safetensors, tokenizer)
    DIR/prompts.jsonl    TL;DR-style prompts: columns ``prompt`` and ``answer`` (a short reference)
    DIR/demo.yaml        settings for a run of a minute or two on CPU

A model with random weights almost never samples its end-of-sequence token, so every completion
of a group would have the same length and GRPO's advantages would all be zero. The model is
therefore taught briefly (a plain next-token loop, a few seconds on CPU) to answer each prompt
with a few words and then end, after 8 to 16 tokens at random: like an instruct model, it ends
its answers, at lengths the length reward can then move.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_TOPICS = ["the weather", "a football match", "the new library", "a train delay", "the city budget",
           "a cooking contest", "the school trip", "a lost dog", "the river cleanup", "a music festival",
           "the power cut", "a bakery opening", "the chess club", "a road closure", "the science fair"]
_EVENTS = ["was cancelled", "went well", "drew a big crowd", "was postponed", "surprised everyone",
           "ended early", "raised money", "caused long queues", "made the news", "was a success"]
_WORDS = ["good", "news", "today", "people", "were", "happy", "it", "rained", "again", "and", "then",
          "the", "team", "won", "late", "fine", "all", "day", "short", "story"]

DEMO_YAML = """\
# Inputs made by `hpcjobs demo-assets --recipe qwen2-grpo`; small settings for CPU training:
# the length reward aims at 4 tokens, completions are cut at 16.
model:
  source: {model}
data:
  path: {dataset}
grpo:
  reward:
    functions: [target_length]
    target_length: 4
    length_unit: tokens
  max_completion_length: 16
  micro_batch_size: 4
  grad_accum: 2
  num_generations: 8
  lr: 3.0e-3
  beta: 0.02          # a KL penalty keeps the policy near the model it started from
  max_steps: 20       # 40 steps at this lr without KL drove the greedy answers into a loop
  logging_steps: 2
  save_steps: 10
evaluate:
  max_new_tokens: 16
  reward_prompts: 16
"""


def make_prompt_rows(rows: int = 240, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(f"grpo-prompts-{seed}")
    out = []
    for i in range(rows):
        topic, event = rng.choice(_TOPICS), rng.choice(_EVENTS)
        post = f"Post {i}: yesterday {topic} {event}, and {rng.choice(_TOPICS)} {rng.choice(_EVENTS)}."
        out.append({"prompt": f"{post}\nTL;DR:", "answer": f"{topic} {event}"})
    return out


def _warm_up(model, tok, prompts: list[str], seed: int, steps: int = 60) -> None:
    """Teach the random model to end its answers after 8-16 tokens (see the module docstring)."""
    import torch

    rng = random.Random(f"grpo-warmup-{seed}")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    # one thread: for a model this small more threads only wait on each other (on a busy
    # 2-core machine 20x slower)
    torch.set_num_threads(1)
    try:
        _warm_up_steps(model, tok, prompts, rng, eos, pad, opt, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()


def _warm_up_steps(model, tok, prompts, rng, eos, pad, opt, steps) -> None:
    import torch

    for _ in range(steps):
        seqs, masks = [], []
        for p in rng.sample(prompts, 16):
            ids = tok(p)["input_ids"]
            n = rng.randint(8, 16)
            ans: list[int] = []
            while len(ans) < n:
                ans += tok(" " + rng.choice(_WORDS))["input_ids"]
            ans = ans[:n] + [eos]
            seqs.append(ids + ans)
            masks.append([0] * len(ids) + [1] * len(ans))   # the loss is on the answer only
        width = max(map(len, seqs))
        inp = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        lab = torch.tensor([[t if m else -100 for t, m in zip(s, k)] + [-100] * (width - len(s))
                            for s, k in zip(seqs, masks)])
        att = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        loss = model(input_ids=inp, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def make_tiny_qwen2(out_dir: str | Path, texts: list[str], *, seed: int = 0, hidden: int = 64, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, warm_up: bool = True, init_range: float = 0.02) -> Path:
    """A tiny Qwen2ForCausalLM with a locally trained byte-level BPE tokenizer, in ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from hpcjobs.train.demo_assets import train_bpe_tokenizer

    out = Path(out_dir)
    corpus = list(texts) + [" ".join(_WORDS)] * 4
    train_bpe_tokenizer(corpus, out, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(str(out))
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True, initializer_range=init_range)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if warm_up:
        _warm_up(model, tok, [t for t in texts if t.endswith("TL;DR:")], seed)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def make_grpo_demo_assets(outdir: str | Path, seed: int = 0, rows: int = 240) -> dict[str, Path]:
    """``qwen2-tiny/``, ``prompts.jsonl`` and ``demo.yaml`` under ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    data = make_prompt_rows(rows, seed)
    model = make_tiny_qwen2(outdir / "qwen2-tiny", [r["prompt"] for r in data] + [r["answer"] for r in data],
                            seed=seed)
    dataset = outdir / "prompts.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    demo = outdir / "demo.yaml"
    demo.write_text(DEMO_YAML.format(model=json.dumps(str(model)), dataset=json.dumps(str(dataset))))
    return {"model": model, "dataset": dataset, "config": demo}
