"""`hpcjobs plan`: the memory planner through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LLAMA2_7B_PARAMS = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                    "vocab_size": -1}


@pytest.fixture
def llama7b(tmp_path):
    """A Meta Llama-2-7B directory with the real params.json and placeholder weight/tokenizer files."""
    d = tmp_path / "llama-2-7b"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(LLAMA2_7B_PARAMS))
    (d / "consolidated.00.pth").write_bytes(b"")
    (d / "tokenizer.model").write_bytes(b"")
    data = tmp_path / "d.parquet"
    data.write_bytes(b"")
    return d, data


def test_plan_llama2_7b_lora_a800(hpcjobs, llama7b):
    d, data = llama7b
    out = hpcjobs("plan", "llama2-lora", "--profile", "a800", "--nodes", "2", f"model.source={d}",
                  f"data.path={data}").stdout
    assert "6,738,415,616 parameters" in out
    assert "4,194,304 trainable (LoRA r=8 on q_proj, v_proj)" in out
    assert "world size 16 (8 per node)" in out and "ZeRO-2" in out
    for c in ("weights", "gradients", "optimizer states", "activations", "logits/loss", "DeepSpeed buffers",
              "framework overhead"):
        assert c in out
    assert "of 80.00 GiB: fits, headroom" in out
    assert "per node" in out and "of 1000.00 GiB: fits" in out


def test_plan_json_and_settings_follow_overrides(hpcjobs, llama7b):
    d, data = llama7b
    j = hpcjobs.json("plan", "llama2-lora", "--profile", "a100", "--nodes", "1", f"model.source={d}",
                     f"data.path={data}", "finetune.zero_stage=3", "finetune.micro_batch_size=4")
    (st,) = j["stages"]
    assert st["stage"] == "finetune" and st["params"] == 6_738_415_616 and st["trainable"] == 4_194_304
    assert st["setup"]["zero_stage"] == 3 and st["setup"]["world_size"] == 8 and st["setup"]["micro_batch"] == 4
    assert st["gpu"]["capacity"] == 40 * 2**30
    assert st["gpu"]["peak"] == sum(st["gpu"]["components"].values())
    assert st["gpu"]["fits"] is True and st["gpu"]["headroom"] == st["gpu"]["capacity"] - st["gpu"]["peak"]
    # ZeRO-3 partitions the frozen base over the 8 ranks: far below the 12.5 GiB of 16-bit weights
    assert st["gpu"]["components"]["weights"] < 3 * 2**30


def test_plan_does_not_fit(hpcjobs, llama7b):
    d, data = llama7b
    proc = hpcjobs("plan", "llama2-lora", "--profile", "a100", "--nodes", "2", f"model.source={d}",
                   f"data.path={data}", "finetune.micro_batch_size=64", "finetune.max_seq_length=4096",
                   "finetune.gradient_checkpointing=false")
    assert "DOES NOT FIT, short by" in proc.stdout
    assert proc.returncode == 0      # a prediction, not a refusal (not built yet)


def test_plan_without_model_config_is_a_config_error(hpcjobs, tmp_path):
    proc = hpcjobs("plan", "llama2-lora", "--profile", "a800", f"model.source={tmp_path}",
                   f"data.path={tmp_path}/d.parquet", check=False)
    assert proc.returncode == 2
    assert "finetune.model" in proc.stderr and "neither config.json nor params.json" in proc.stderr


def test_plan_does_not_import_torch(llama7b):
    d, data = llama7b
    code = ("import sys\nfrom hpcjobs.cli import main\n"
            "try:\n    main(['plan', 'llama2-lora', '--profile', 'a800', 'model.source=%s', 'data.path=%s'])\n"
            "except SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules]\n"
            "assert not bad, bad\n") % (d, data)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.train
def test_plan_demo_checkpoint_count_is_exact(hpcjobs, demo_assets):
    """The demo's tiny Meta checkpoint: our count from params.json + tokenizer.model equals the
    tensors in consolidated.00.pth."""
    import torch

    ckpt, data = demo_assets / "llama-2-tiny", demo_assets / "dialogues.parquet"
    j = hpcjobs.json("plan", "llama2-lora", "--profile", "a800", "--nodes", "2", f"model.source={ckpt}",
                     f"data.path={data}")
    (st,) = j["stages"]
    sd = torch.load(ckpt / "consolidated.00.pth", map_location="meta", weights_only=True)
    assert st["params"] == sum(t.numel() for k, t in sd.items() if k != "rope.freqs")
    assert st["model_config"] == str(ckpt / "params.json")
    sentencepiece = pytest.importorskip("sentencepiece")
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model")).vocab_size()
    assert sd["tok_embeddings.weight"].shape[0] == vocab
    assert st["gpu"]["fits"] is True
    out = hpcjobs("plan", "llama2-lora", "--profile", "local", "--nodes", "2", f"model.source={ckpt}",
                  f"data.path={data}").stdout
    assert "world size 2 (1 per node)" in out and "of 2.00 GiB" in out


QWEN2_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
             "num_hidden_layers": 24, "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 151936}


def test_plan_hf_directory_finetune_only(hpcjobs, tmp_path):
    from conftest import FIXTURES

    (tmp_path / "config.json").write_text(json.dumps(QWEN2_05B))
    j = hpcjobs.json("plan", FIXTURES / "finetune-only.yaml", "--profile", "a800", f"finetune.model={tmp_path}",
                     f"data.path={tmp_path / 'd.parquet'}", "finetune.lora.target_modules=[q_proj,v_proj]")
    (st,) = j["stages"]
    assert st["arch"] == "qwen2" and st["params"] == 494_032_768
    # q: 896 -> 896, v: 896 -> 2 kv heads x 64 = 128; r=8 over 24 layers
    assert st["trainable"] == 24 * 8 * ((896 + 896) + (896 + 128))


def test_plan_bad_config_json_is_one_error_line(hpcjobs, tmp_path):
    from conftest import FIXTURES

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": [1]}))
    proc = hpcjobs("plan", FIXTURES / "finetune-only.yaml", "--profile", "a800", f"finetune.model={tmp_path}",
                   f"data.path={tmp_path / 'd.parquet'}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "finetune.model" in proc.stderr and "Traceback" not in proc.stderr
