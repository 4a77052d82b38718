"""hpcjobs.train.evaluate: before/after report with eval losses and greedy samples."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.train

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

try:
    from tinymodels import make_dialogue_parquet, make_tiny_llama
except ImportError:  # tests/ imported as a package
    from tests.tinymodels import make_dialogue_parquet, make_tiny_llama

from hpcjobs.errors import HpcjobsError  # noqa: E402
from hpcjobs.train import evaluate as E  # noqa: E402
from hpcjobs.train import merge as M  # noqa: E402

TEMPLATE = "Description: {Description} Patient: {Patient} Doctor: {Doctor}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval")
    base = make_tiny_llama(root / "base")
    data = make_dialogue_parquet(root / "data.parquet", n=60)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(str(root / "adapter"))
    merged = M.merge(str(root / "adapter"), str(root / "merged"), dtype="float32")
    config = root / "train.json"
    config.write_text(json.dumps({
        "model_path": str(base),
        "output_dir": str(root / "adapter"),
        "data": {"path": str(data), "columns": ["Description", "Patient", "Doctor"], "template": TEMPLATE,
                 "split": [0.8, 0.1, 0.1], "seed": 42},
        "train": {"max_seq_length": 64},
    }))
    return root, base, merged, config


def test_evaluate_writes_reports(setup, tmp_path):
    root, base, merged, config = setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "Description: Q. What should I do about fever? Patient: I have fever. Doctor:\n"
        "\n   \n"
        "  Description: Q. What should I do about rash? Patient: I have a rash. Doctor:  \n"
    )
    out = tmp_path / "eval"
    rc = E.main(["--config", str(config), "--base", str(base), "--merged", str(merged), "--prompts", str(prompts),
                 "--output", str(out), "--max-new-tokens", "8"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    losses = report["eval_loss"]
    assert set(losses) == {"base", "merged"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses.values())
    assert abs(losses["base"] - losses["merged"]) > 1e-4
    assert report["eval_examples"] == 6 and report["eval_tokens"] > 0  # 10% of 60 rows
    assert [s["prompt"] for s in report["samples"]] == [
        "Description: Q. What should I do about fever? Patient: I have fever. Doctor:",
        "Description: Q. What should I do about rash? Patient: I have a rash. Doctor:",
    ]
    for s in report["samples"]:
        assert isinstance(s["base"], str) and isinstance(s["merged"], str)
    md = (out / "report.md").read_text()
    assert "| base |" in md and "| merged |" in md and "## Samples" in md
    assert "What should I do about rash?" in md


def test_evaluate_default_prompts_from_test_split(setup, tmp_path):
    root, base, merged, config = setup
    report = E.evaluate(str(config), str(base), str(merged), str(tmp_path / "eval"), max_new_tokens=4,
                        num_test_prompts=3, max_eval_samples=2, batch_size=2)
    assert len(report["samples"]) == 3 and report["eval_examples"] == 2
    for s in report["samples"]:
        assert s["prompt"].endswith("Doctor:") and s["reference"].startswith("Hello. For")
    assert all(math.isfinite(v) for v in report["eval_loss"].values())


def test_eval_loss_is_token_mean_and_padding_invariant(setup):
    root, base, merged, config = setup
    model, tok = E.load_model(str(base), "cpu", "float32")
    texts = ["Description: a Patient: b Doctor: c", "Description: a much longer question here Patient: yes Doctor: no"]
    one, n1 = E.eval_loss(model, tok, texts[:1], 64, 1, "cpu")
    ids = tok(texts[0] + tok.eos_token, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss.item()
    assert abs(one - ref) < 1e-5 and n1 == ids.shape[1] - 1
    batched, nb = E.eval_loss(model, tok, texts, 64, 2, "cpu")
    single, ns = E.eval_loss(model, tok, texts, 64, 1, "cpu")
    assert nb == ns and abs(batched - single) < 1e-5


def test_prompts_file_errors(tmp_path):
    with pytest.raises(HpcjobsError, match="not found"):
        E.read_prompts(tmp_path / "missing.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(HpcjobsError, match="no prompts"):
        E.read_prompts(blank)
    assert E.prompt_split_point(TEMPLATE) == " Doctor: "
