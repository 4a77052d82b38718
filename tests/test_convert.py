"""The convert stage (Meta Llama checkpoint → Hugging Face) and the demo assets.

The converted model is checked against an independent reference of Meta's forward pass
(tests/reference/meta_llama.py) run on the *original* Meta weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.train

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from hpcjobs.errors import HpcjobsError  # noqa: E402
from hpcjobs.train import convert as conv  # noqa: E402
from hpcjobs.train import demo_assets as demo  # noqa: E402

try:
    from reference.meta_llama import reference_logits
except ImportError:  # tests/ imported as a package
    from tests.reference.meta_llama import reference_logits


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    """The demo tokenizer (sentencepiece BPE, byte fallback), trained once for the module."""
    return demo.default_tokenizer_model(seed=0, rows=120)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sp_model):
    """A 1-shard checkpoint and its fp32 conversion, shared by the tokenizer/loading tests."""
    root = tmp_path_factory.mktemp("conv")
    ckpt = demo.make_meta_checkpoint(root / "meta", tokenizer_model=sp_model, seed=3)
    out = conv.convert_checkpoint(ckpt, root / "hf", dtype="float32")
    return ckpt, out


def _tokens(vocab: int, seed: int = 0, shape=(2, 17)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)


def _hf_logits(out: Path, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


CASES = {
    "1-shard": dict(shards=1),
    "2-shard": dict(shards=2),
    "gqa-2-shard": dict(shards=2, n_heads=8, n_kv_heads=4, ffn_dim_multiplier=1.3, multiple_of=16),
    "mqa-llama1": dict(shards=1, n_kv_heads=1, llama_version=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_meta_reference(tmp_path, sp_model, case):
    kw = dict(CASES[case])
    version = kw.get("llama_version", 2)
    ckpt = demo.make_meta_checkpoint(tmp_path / "meta", tokenizer_model=sp_model, seed=11, **kw)
    out = conv.convert_checkpoint(ckpt, tmp_path / "hf", dtype="float32", llama_version=version)

    cfg = json.loads((out / "config.json").read_text())
    params = json.loads((ckpt / "params.json").read_text())
    assert cfg["num_attention_heads"] == params["n_heads"]
    assert cfg["num_key_value_heads"] == params.get("n_kv_heads", params["n_heads"])
    assert cfg["intermediate_size"] == demo.meta_intermediate_size(
        params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier"))
    assert cfg["max_position_embeddings"] == (2048 if version == 1 else 4096)
    assert cfg["rms_norm_eps"] == (1e-6 if version == 1 else 1e-5)
    assert cfg["vocab_size"] == 512 and params["vocab_size"] == -1

    tokens = _tokens(cfg["vocab_size"])
    ref = reference_logits(ckpt, tokens)
    got = _hf_logits(out, tokens)
    assert got.shape == ref.shape
    assert ref.abs().max() > 1.0  # logits are not trivially small
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff}"


def test_sharding_does_not_change_the_model(tmp_path, sp_model):
    from safetensors.torch import load_file

    outs = []
    for shards in (1, 2):
        ckpt = demo.make_meta_checkpoint(tmp_path / f"m{shards}", tokenizer_model=sp_model, seed=5,
                                         n_kv_heads=2, shards=shards)
        outs.append(load_file(conv.convert_checkpoint(ckpt, tmp_path / f"h{shards}") / "model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_permute_rotary_maps_pairs_to_halves():
    head_dim, n_heads = 8, 2
    w = torch.arange(n_heads * head_dim, dtype=torch.float32)[:, None].expand(-1, 3)
    p = conv.permute_rotary(w, n_heads)[:, 0].tolist()
    assert p == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]


def test_multi_file_safetensors_and_bf16(tmp_path, converted):
    ckpt, single = converted
    out = conv.convert_checkpoint(ckpt, tmp_path / "multi", dtype="float32", max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert not (out / "model.safetensors").exists()
    tokens = _tokens(512, seed=1)
    assert torch.equal(_hf_logits(out, tokens), _hf_logits(single, tokens))

    from safetensors.torch import load_file

    bf = conv.convert_checkpoint(ckpt, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(bf / "model.safetensors").values()} == {torch.bfloat16}


def test_tokenizer_matches_sentencepiece(converted):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    ckpt, out = converted
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.bos_token_id == sp.bos_id() == 1
    assert tok.eos_token_id == sp.eos_id() == 2
    assert tok.unk_token_id == sp.unk_id() == 0
    assert tok.pad_token is None  # Llama has no pad token; callers choose one
    assert len(tok) == sp.vocab_size()

    texts = [demo.format_example(r) for r in demo.make_dialogues(40, seed=9)]
    texts += [
        "Hello doctor, I am 34.", " leading space", "  two leading", "a  b   c ", "trailing ", "",
        "tab\there\nnew line", "emoji 😀🩺 and 中文 / 日本語 text", "Ünïcödé façade naïve",
        "12345 67.89", "▁already▁escaped", "zero\u200bwidth", "x" * 40, "Description: Q. Patient: Doctor:",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:])
        if "▁" not in text:  # sentencepiece itself decodes a literal ▁ as a space
            assert sp.decode(ids[1:]) == text
    # unseen characters go through byte fallback, not <unk>
    ids = tok("😀中")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert tok.unk_token_id not in ids
    assert "<0xF0>" in pieces and "<0xE4>" in pieces
    assert ids[-1] != tok.eos_token_id


def test_converted_model_loads_and_generates(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = converted
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    prompt = demo.make_prompts(1, seed=0)[0]
    enc = tok(prompt, return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 4
    assert isinstance(tok.decode(gen[0, enc["input_ids"].shape[1]:]), str)
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg["bos_token_id"] == 1 and gen_cfg["eos_token_id"] == 2


def test_hf_input_is_linked_not_copied(tmp_path, converted, caplog):
    _, hf_dir = converted
    caplog.set_level(logging.INFO, logger="hpcjobs.train.convert")
    out = conv.convert_checkpoint(hf_dir, tmp_path / "linked")
    entries = sorted(out.iterdir())
    assert [e.name for e in entries] == sorted(p.name for p in hf_dir.iterdir())
    assert all(e.is_symlink() and e.resolve() == (hf_dir / e.name).resolve() for e in entries)
    assert "already in Hugging Face format" in caplog.text
    tokens = _tokens(512, seed=2)
    assert torch.equal(_hf_logits(out, tokens), _hf_logits(hf_dir, tokens))


def test_tokenizer_model_found_in_parent_dir(tmp_path, sp_model):
    ckpt = demo.make_meta_checkpoint(tmp_path / "llama-2-7b", tokenizer_model=sp_model)
    os.replace(ckpt / "tokenizer.model", tmp_path / "tokenizer.model")  # Meta's download layout
    out = conv.convert_checkpoint(ckpt, tmp_path / "hf")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()


# ---------------------------------------------------------------------------------- errors

@pytest.fixture
def meta_ckpt(tmp_path, sp_model):
    return demo.make_meta_checkpoint(tmp_path / "ck" / "meta", tokenizer_model=sp_model, shards=2)


def test_error_missing_params(meta_ckpt, tmp_path):
    (meta_ckpt / "params.json").unlink()
    with pytest.raises(HpcjobsError, match="no params.json"):
        conv.convert_checkpoint(meta_ckpt, tmp_path / "out")


def test_error_no_shards(meta_ckpt, tmp_path):
    for p in meta_ckpt.glob("consolidated.*.pth"):
        p.unlink()
    with pytest.raises(HpcjobsError, match=r"no consolidated\.\*\.pth"):
        conv.convert_checkpoint(meta_ckpt, tmp_path / "out")


def test_error_missing_shard_in_sequence(meta_ckpt, tmp_path):
    os.replace(meta_ckpt / "consolidated.01.pth", meta_ckpt / "consolidated.02.pth")
    with pytest.raises(HpcjobsError, match="not numbered"):
        conv.convert_checkpoint(meta_ckpt, tmp_path / "out")


def test_error_missing_tokenizer(meta_ckpt, tmp_path):
    (meta_ckpt / "tokenizer.model").unlink()
    with pytest.raises(HpcjobsError, match="no tokenizer.model"):
        conv.convert_checkpoint(meta_ckpt, tmp_path / "out")


def test_error_shard_shapes_disagree(meta_ckpt, tmp_path):
    shard = meta_ckpt / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    sd["layers.1.attention.wq.weight"] = sd["layers.1.attention.wq.weight"][:-4]
    torch.save(sd, shard)
    with pytest.raises(HpcjobsError, match=r"shard shapes disagree for layers\.1\.attention\.wq\.weight"):
        conv.convert_checkpoint(meta_ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_error_params_disagree_with_weights(meta_ckpt, tmp_path):
    params = json.loads((meta_ckpt / "params.json").read_text())
    params["ffn_dim_multiplier"] = 1.5  # intermediate 256 instead of the weights' 192
    (meta_ckpt / "params.json").write_text(json.dumps(params))
    with pytest.raises(HpcjobsError, match="does not match params.json") as e:
        conv.convert_checkpoint(meta_ckpt, tmp_path / "out")
    assert "multiple_of" in str(e.value)


def test_error_output_not_empty(meta_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(HpcjobsError, match="not empty"):
        conv.convert_checkpoint(meta_ckpt, out)


def test_cli_logs_and_errors(meta_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert conv.main(["--input", str(meta_ckpt), "--output", str(out), "--dtype", "float32"]) == 0
    logged = capsys.readouterr().out
    assert "2 shard(s)" in logged and "dim=64" in logged and "float32" in logged and "total" in logged
    assert (out / "config.json").is_file()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]  # temp dir renamed away
    assert conv.main(["--input", str(meta_ckpt), "--output", str(out)]) == 1
    assert "error: output" in capsys.readouterr().err


# ----------------------------------------------------------------------------- demo assets

def test_demo_assets_deterministic(tmp_path):
    import pyarrow.parquet as pq

    a = demo.make_demo_assets(tmp_path / "a", seed=4, rows=60)
    demo.make_demo_assets(tmp_path / "b", seed=4, rows=60)
    c = demo.make_demo_assets(tmp_path / "c", seed=5, rows=60)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert a["dataset"].read_bytes() != c["dataset"].read_bytes()

    table = pq.read_table(a["dataset"])
    assert table.column_names == ["Description", "Patient", "Doctor"]
    assert table.num_rows == 60
    assert all(str(t) == "string" for t in table.schema.types)
    rows = table.to_pylist()
    assert len({r["Patient"] for r in rows}) > 50  # varied

    prompts = demo.read_prompts(a["prompts"])
    assert len(prompts) >= 3
    for p in prompts:
        assert p.startswith("Description: ") and " Patient: " in p and p.endswith(" Doctor:")

    params = json.loads((a["checkpoint"] / "params.json").read_text())
    assert params["vocab_size"] == -1 and params["dim"] == 64
    assert (a["checkpoint"] / "consolidated.00.pth").is_file()


def test_demo_assets_cli_sharded_gqa(tmp_path, capsys):
    assert demo.main([str(tmp_path), "--shards", "2", "--n-kv-heads", "2", "--rows", "30"]) == 0
    ck = tmp_path / "llama-2-tiny"
    assert sorted(p.name for p in ck.iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    assert json.loads((ck / "params.json").read_text())["n_kv_heads"] == 2
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ck / "tokenizer.model"))
    assert sp.vocab_size() >= 330
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert "demo_assets: done" in capsys.readouterr().out
