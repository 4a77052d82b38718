"""finetune.packing: whole prepared examples packed into rows, each attending only to itself.

The exactness checks are the reason the login node allows packing for some architectures and
refuses it for others (``PACKING_ARCHS``): per architecture, a packed micro batch must give the
same loss and the same per-example logits as the padded one. Then one real sft-lora chain with
packing on a tiny Qwen2 on two nodes, and the refusals before submission.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import CLI, wait_chain

VOCAB = 50
# (input_ids length, prompt tokens whose labels are -100)
EXAMPLES = [(7, 3), (5, 2), (9, 4), (4, 1), (6, 0)]


def _examples():
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in EXAMPLES:
        ids = torch.randint(4, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _model(arch: str, attn: str):
    import torch
    from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, MistralConfig, Qwen2Config

    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, initializer_range=0.5)
    config = {"llama": lambda: LlamaConfig(**small), "mistral": lambda: MistralConfig(**small, sliding_window=None),
              "qwen2": lambda: Qwen2Config(**small),
              "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0,
                                           initializer_range=0.5)}[arch]()
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.use_cache = False   # as the finetune job sets it: a cache turns packed-row detection off
    return model


def _padded_and_packed(examples):
    """The examples padded one per row (the prepared collator), and packed two rows of several."""
    from hpcjobs.train.packing import PackedCollator
    from hpcjobs.train.prepare import collator

    padded = collator(_TinyTokenizer())([{**e, "attention_mask": [1] * len(e["input_ids"])} for e in examples])
    rows = [examples[:2], examples[2:]]
    packed = PackedCollator(pad_token_id=0)([{
        "input_ids": sum((e["input_ids"] for e in row), []), "labels": sum((e["labels"] for e in row), []),
        "seq_lengths": [len(e["input_ids"]) for e in row]} for row in rows])
    return padded, packed, rows


def _TinyTokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t1")), pad_token="t0")
    tok.padding_side = "right"
    return tok


@pytest.mark.train
@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"),
                                       ("qwen2", "sdpa"), ("qwen2", "eager")])
def test_packed_rows_give_the_padded_loss_and_logits(arch, attn):
    """The architectures finetune.packing allows (mistral is memplan's llama)."""
    import torch

    from hpcjobs.stages.finetune import PACKING_ARCHS

    assert {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[arch] in PACKING_ARCHS
    examples = _examples()
    model = _model(arch, attn)
    padded, packed, rows = _padded_and_packed(examples)
    assert "attention_mask" not in packed
    with torch.no_grad():
        out_padded = model(**padded)
        out_packed = model(**packed)
    # the same label tokens, the same mean: the loss is the same to float rounding
    assert math.isclose(out_padded.loss.item(), out_packed.loss.item(), rel_tol=1e-5), \
        (out_padded.loss.item(), out_packed.loss.item())
    i = 0
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e["input_ids"])
            torch.testing.assert_close(out_packed.logits[r, start:start + n], out_padded.logits[i, :n],
                                       rtol=1e-4, atol=1e-4)
            start += n
            i += 1


@pytest.mark.train
def test_bloom_packed_rows_attend_across_examples():
    """Why packing is refused for Bloom: its ALiBi attention ignores position_ids, so the second
    example of a packed row sees the first and its logits change."""
    import torch

    from hpcjobs.stages.finetune import PACKING_ARCHS

    assert "bloom" not in PACKING_ARCHS
    model = _model("bloom", "eager")
    padded, packed, rows = _padded_and_packed(_examples())
    with torch.no_grad():
        first = len(rows[0][0]["input_ids"])
        second = model(**packed).logits[0, first:first + len(rows[0][1]["input_ids"])]
        alone = model(**padded).logits[1, :len(rows[0][1]["input_ids"])]
    assert (second - alone).abs().max().item() > 1e-2


def test_collator_positions_and_labels():
    from hpcjobs.train.packing import PackedCollator

    batch = PackedCollator(pad_token_id=9, pad_to_multiple_of=4)([
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "seq_lengths": [3, 2]},
        {"input_ids": [6, 7], "labels": [6, 7], "seq_lengths": [2]},   # an eval row (packing.single)
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9], [6, 7, 9, 9, 9, 9, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    # each example's first label is never predicted (from the previous example's last token)
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100, -100],
                                        [-100, 7, -100, -100, -100, -100, -100, -100]]
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    with pytest.raises(KeyError, match="seq_lengths"):   # a dropped column must not go unnoticed
        PackedCollator(pad_token_id=9)([{"input_ids": [1, 2], "labels": [1, 2]}])


@pytest.mark.train
def test_pack_keeps_whole_examples_within_the_length():
    import datasets

    from hpcjobs.train import packing

    lengths = [3, 7, 2, 8, 5, 1, 6, 4, 8, 2]
    ds = datasets.Dataset.from_dict({"input_ids": [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)],
                                     "labels": [[-100] + list(range(1, n)) for n in lengths],
                                     "attention_mask": [[1] * n for n in lengths]})
    packed = packing.pack(ds, 8, seed=0)
    assert all(len(r) <= 8 for r in packed["input_ids"])
    assert sorted(n for s in packed["seq_lengths"] for n in s) == sorted(lengths)   # nothing cut or lost
    assert all(sum(s) == len(r) for s, r in zip(packed["seq_lengths"], packed["input_ids"]))
    # each example is contiguous and whole: it starts at a multiple of 100 and counts up
    for row, segs in zip(packed["input_ids"], packed["seq_lengths"]):
        start = 0
        for n in segs:
            assert row[start] % 100 == 0 and row[start:start + n] == list(range(row[start], row[start] + n))
            start += n
    st = packing.stats(len(ds), packed)
    assert st["examples"] == 10 and st["rows"] == len(packed) < 10 and st["tokens"] == sum(lengths)


# ------------------------------------------------------------------ on the devcluster

@pytest.fixture(scope="module")
def qwen2_assets(tmp_path_factory, hpcjobs_home):
    out = tmp_path_factory.mktemp("sft-qwen2")
    CLI()("demo-assets", "--recipe", "sft-lora", "--arch", "qwen2", out, timeout=300)
    return out


@pytest.mark.cluster
@pytest.mark.train
@pytest.mark.slow
def test_sft_lora_packed_on_two_nodes(devcluster, qwen2_assets):
    """`hpcjobs submit sft-lora ... finetune.packing=true` on a tiny Qwen2, to its end."""
    cli = CLI()
    sub = cli.json("submit", "sft-lora", "--nodes", "2", "--profile", "local", "--config",
                   qwen2_assets / "demo.yaml", "--name", "packed", "finetune.packing=true")
    final = wait_chain(cli, sub["chain"], timeout=900)
    assert final["state"] == "COMPLETED", final
    run = Path(sub["run_dir"])
    attempt = run / "stages/finetune/attempt-1"
    assert json.loads((attempt / "train.json").read_text())["train"]["packing"] is True
    start = next(json.loads(line) for line in (attempt / "progress.jsonl").read_text().splitlines()
                 if '"event": "start"' in line)
    stats = json.loads((run / "prepared" / "prepare.json").read_text())
    p = start["packing"]
    assert p["examples"] == stats["splits"]["train"]["rows"]
    assert p["tokens"] == stats["splits"]["train"]["tokens"]   # every token kept
    assert p["rows"] < p["examples"] / 2, p                     # short examples: several per row
    report = json.loads((run / "eval" / "report.json").read_text())
    base, merged = report["eval_loss"]["base"], report["eval_loss"]["merged"]
    assert merged < base - 1.5, report["eval_loss"]   # ln(400) ~ 6 for the random model


@pytest.mark.cluster
@pytest.mark.train
def test_packing_refusals_before_submission(devcluster, hpcjobs, qwen2_assets, tmp_path):
    bloom = tmp_path / "bloom"
    bloom.mkdir()
    (bloom / "config.json").write_text(json.dumps({"model_type": "bloom", "hidden_size": 64, "n_head": 4,
                                                   "n_layer": 2, "vocab_size": 400}))
    (bloom / "tokenizer.json").write_text("{}")
    demo = ("submit", "sft-lora", "--nodes", "2", "--profile", "local", "--config", qwen2_assets / "demo.yaml")
    for overrides, words in (
            ((f"model.source={bloom}", "finetune.packing=true"), ("finetune.packing", "bloom", "position ids")),
            (("finetune.packing=true", "finetune.prepared=null"), ("finetune.packing", "prepare stage")),
            (("finetune.packing=maybe",), ("finetune.packing",))):
        proc = hpcjobs(*demo, *overrides, check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert all(w in proc.stderr for w in words), proc.stderr
        assert "nothing was submitted" in proc.stderr and "Traceback" not in proc.stderr
    proc = hpcjobs("render", "seq-classification", "--profile", "local", "finetune.packing=true",
                   "model.source=/nonexistent", "data.path=/nonexistent.jsonl", check=False)
    assert proc.returncode == 2 and "finetune.packing" in proc.stderr and "causal-lm" in proc.stderr, proc.stderr
