"""Exact parameter counts from config.json / params.json (hpcjobs/memplan/params.py).

The published configurations below are written here as data (the fields that matter for the
count, as in the models' config.json on the Hub); nothing is downloaded. The ``train`` tests
build each model with transformers on PyTorch's meta device (no memory, no weights) and compare
``sum(p.numel() for p in model.parameters())`` with our count.
"""

from __future__ import annotations

import json

import pytest

from hpcjobs.memplan.params import (UnsupportedModel, load_config, meta_intermediate_size, model_shape,
                                    sentencepiece_vocab_size)

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "hidden_act": "silu", "tie_word_embeddings": False, "vocab_size": 32000,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
LLAMA2_7B_META = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                  "vocab_size": -1}
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "max_position_embeddings": 131072, "max_window_layers": 24,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
    "bos_token_id": 151643, "eos_token_id": 151643,
}
BLOOM_7B1 = {
    "architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": 4096, "n_head": 32,
    "n_layer": 30, "vocab_size": 250880, "layer_norm_epsilon": 1e-05, "apply_residual_connection_post_layernorm": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
}
T5_BASE = {
    "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 768, "d_ff": 3072,
    "d_kv": 64, "num_heads": 12, "num_layers": 12, "vocab_size": 32128, "relative_attention_num_buckets": 32,
    "feed_forward_proj": "relu", "dropout_rate": 0.1, "layer_norm_epsilon": 1e-06,
    "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
}
BERT_LARGE = {
    "architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 1024, "intermediate_size": 4096,
    "num_attention_heads": 16, "num_hidden_layers": 24, "max_position_embeddings": 512, "type_vocab_size": 2,
    "vocab_size": 30522, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
}

# Published totals (model cards / papers), which our counts must equal exactly.
PUBLISHED = [
    ("llama2-7b", LLAMA2_7B, 6_738_415_616),
    ("qwen2-0.5b", QWEN2_05B, 494_032_768),
    ("bloom-7b1", BLOOM_7B1, 7_069_016_064),
    ("t5-base", T5_BASE, 222_903_552),
    ("bert-large", BERT_LARGE, 335_141_888),
]

TINY = [
    ("llama", {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
               "num_hidden_layers": 3, "num_key_value_heads": 4, "vocab_size": 503, "tie_word_embeddings": False}),
    ("llama-gqa-tied", {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8,
                        "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 300,
                        "tie_word_embeddings": True}),
    ("llama-bias-headdim", {"model_type": "llama", "hidden_size": 48, "intermediate_size": 80,
                            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
                            "head_dim": 16, "attention_bias": True, "mlp_bias": True, "vocab_size": 211}),
    ("qwen2-tied", {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                    "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 400,
                    "tie_word_embeddings": True}),
    ("qwen2-untied", {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                      "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 1,
                      "vocab_size": 400, "tie_word_embeddings": False}),
    ("bloom", {"model_type": "bloom", "hidden_size": 64, "n_head": 4, "n_layer": 3, "vocab_size": 250}),
    ("t5", {"model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2,
            "num_decoder_layers": 3, "vocab_size": 128, "relative_attention_num_buckets": 16}),
    ("t5-v1_1-untied-gated", {"model_type": "t5", "d_model": 32, "d_ff": 80, "d_kv": 16, "num_heads": 3,
                              "num_layers": 2, "vocab_size": 99, "feed_forward_proj": "gated-gelu",
                              "tie_word_embeddings": False}),
    ("bert", {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_hidden_layers": 2, "max_position_embeddings": 40, "type_vocab_size": 3, "vocab_size": 99}),
]

ALL = [(n, c) for n, c, _ in PUBLISHED] + TINY


@pytest.mark.parametrize("name,cfg,total", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_totals(name, cfg, total):
    assert model_shape(cfg).total == total


def test_meta_params_json_llama2_7b():
    assert meta_intermediate_size(4096, 256) == 11008
    s = model_shape(LLAMA2_7B_META, vocab_size=32000)
    assert s.total == 6_738_415_616
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate, s.vocab) == (4096, 32, 32, 32, 11008, 32000)
    assert s.total == model_shape(LLAMA2_7B).total
    with pytest.raises(UnsupportedModel, match="vocab_size"):
        model_shape(LLAMA2_7B_META)


def test_meta_params_json_llama2_70b_gqa():
    # Llama-2-70B's params.json: GQA with 8 kv heads, ffn_dim_multiplier 1.3 -> 28672.
    p = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
         "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
    s = model_shape(p, vocab_size=32000)
    assert s.intermediate == 28672
    assert s.total == 68_976_648_192


def test_lora_llama2_7b_q_v():
    s = model_shape(LLAMA2_7B)
    assert s.lora_params(8, ["q_proj", "v_proj"]) == 4_194_304
    assert s.lora_targets_found(["q_proj", "nope"]) == ["q_proj"]


def test_unknown_model_type():
    with pytest.raises(UnsupportedModel, match="gpt_neox"):
        model_shape({"model_type": "gpt_neox", "hidden_size": 8})


def test_load_config_dir(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(LLAMA2_7B_META))
    (tmp_path / "tokenizer.model").write_bytes(b"")
    s, src = load_config(tmp_path)
    assert src.name == "params.json" and s.vocab == 32000 and s.total == 6_738_415_616
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(QWEN2_05B))
    assert load_config(hf)[0].total == 494_032_768


def test_sentencepiece_vocab_size(tmp_path):
    # ModelProto { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2; }
    def piece(text: bytes) -> bytes:
        inner = b"\x0a" + bytes([len(text)]) + text + b"\x15\x00\x00\x00\x00"   # piece, score (float)
        return b"\x0a" + bytes([len(inner)]) + inner
    data = b"".join(piece(b"p%d" % i) for i in range(7)) + b"\x12\x02\x08\x01"
    (tmp_path / "t.model").write_bytes(data)
    assert sentencepiece_vocab_size(tmp_path / "t.model") == 7
    (tmp_path / "empty").write_bytes(b"")
    assert sentencepiece_vocab_size(tmp_path / "empty") is None


# ------------------------------------------------------------------ against transformers

def _meta_model(cfg):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers import AutoConfig

    c = dict(cfg)
    mt = c.pop("model_type")
    c.pop("architectures", None)
    config = AutoConfig.for_model(mt, **c)
    with torch.device("meta"):
        if mt == "t5":
            return transformers.T5ForConditionalGeneration(config)
        if mt == "bert":
            return transformers.BertModel(config)
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.train
@pytest.mark.parametrize("name,cfg", ALL, ids=[n for n, _ in ALL])
def test_count_equals_transformers_meta_model(name, cfg):
    model = _meta_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    if cfg["model_type"] == "t5" and cfg.get("tie_word_embeddings") is False \
            and model.lm_head.weight is model.shared.weight:
        # transformers 5 ties T5's lm_head always (T5Config forces tie_word_embeddings=True and
        # keeps the flag only for output scaling); T5 v1.1 checkpoints, and transformers 4, have a
        # separate lm_head.weight, which is what we count.
        n += model.lm_head.weight.numel()
    assert model_shape(cfg).total == n


@pytest.mark.train
def test_meta_checkpoint_equals_converted_config():
    """params.json -> the HF config hpcjobs' convert writes -> the same count."""
    from hpcjobs.train.convert import intermediate_size

    assert intermediate_size(8192, 4096, 1.3) == meta_intermediate_size(8192, 4096, 1.3)
    assert intermediate_size(4096, 256) == meta_intermediate_size(4096, 256)


@pytest.mark.train
@pytest.mark.parametrize("name,cfg,targets", [
    ("llama", TINY[1][1], ["q_proj", "v_proj"]),
    ("llama-all", TINY[0][1], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("bloom", TINY[5][1], ["query_key_value"]),
    ("t5", TINY[6][1], ["q", "v"]),
    ("bert-dense", TINY[8][1], ["dense"]),
    ("qwen2-mlp", TINY[4][1], ["gate_proj", "up_proj", "down_proj"]),
    ("llama-lm-head", TINY[0][1], ["q_proj", "lm_head"]),
])
def test_lora_count_equals_peft(name, cfg, targets):
    peft = pytest.importorskip("peft")
    model = _meta_model(cfg)
    lm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    assert model_shape(cfg).lora_params(4, targets) == trainable


def test_lora_suffix_matching_bert():
    s = model_shape(BERT_LARGE)
    h, inter, L = 1024, 4096, 24
    # "dense" ends attention.output.dense, intermediate.dense and output.dense (PEFT's suffix rule).
    # ... and the pooler's dense
    assert s.lora_params(2, ["dense"]) == 2 * L * ((h + h) + (h + inter) + (inter + h)) + 2 * (h + h)
    assert s.lora_params(2, ["query", "value"]) == 2 * L * 2 * (h + h)
