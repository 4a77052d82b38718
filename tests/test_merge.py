"""hpcjobs.train.merge: merged logits == base+adapter logits, tokenizer copied, errors."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.train

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

try:
    from tinymodels import make_tiny_llama
except ImportError:  # tests/ imported as a package
    from tests.tinymodels import make_tiny_llama

from hpcjobs.errors import HpcjobsError  # noqa: E402
from hpcjobs.train import merge as M  # noqa: E402


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """Tiny Llama + a LoRA adapter (q_proj, v_proj) whose B matrices are non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merge")
    base = make_tiny_llama(root / "base")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none",
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter = root / "adapter"
    peft_model.save_pretrained(str(adapter))
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(base)  # absolute: loaded from an absolute path
    return base, adapter


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merge_matches_peft_logits(base_and_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    assert M.main(["--adapter", str(adapter), "--output", str(out), "--dtype", "float32"]) == 0

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok(["Description: fever Patient: Hi doctor, I have had fever. Doctor: take rest"],
              return_tensors="pt")["input_ids"]

    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    base_logits = _logits(base_model, ids)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)
    ).eval()
    peft_logits = _logits(peft_model, ids)
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    merged_logits = _logits(merged, ids)

    assert (merged_logits - peft_logits).abs().max().item() <= 1e-5
    assert (merged_logits - base_logits).abs().max().item() > 1e-3  # the adapter does something
    # a standalone model: no LoRA modules left
    assert not any("lora" in n for n, _ in merged.named_parameters())

    # tokenizer copied verbatim from the base
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    info = json.loads((out / "merge_info.json").read_text())
    assert info["base"] == str(base) and info["dtype"] == "float32"
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob("merged.tmp-*"))


def test_merge_dtype_and_overwrite(base_and_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier attempt")
    M.merge(str(adapter), str(out), dtype="bfloat16")
    assert not (out / "stale.txt").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    m = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(m.parameters()).dtype == torch.bfloat16
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_merge_base_resolution_errors(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    # relative base path in the adapter config -> clear error with a hint; --base fixes it
    rel = tmp_path / "rel_adapter"
    rel.mkdir()
    for f in adapter.iterdir():
        (rel / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((rel / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "models/llama"
    (rel / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(HpcjobsError, match="not an absolute path") as ei:
        M.resolve_base(rel, None)
    assert "--base" in str(ei.value)
    assert M.resolve_base(rel, str(base)) == str(base)
    with pytest.raises(HpcjobsError, match="no adapter_config.json"):
        M.resolve_base(tmp_path, None)
    with pytest.raises(HpcjobsError, match="base model not found"):
        M.resolve_base(adapter, str(tmp_path / "missing"))
    assert M.main(["--adapter", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
