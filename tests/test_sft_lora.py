"""The sft-lora recipe and the prepare stage kind.

One real chain (prepare -> 2-node DeepSpeed finetune -> merge -> evaluate) on the tiny Bloom of
`hpcjobs demo-assets --recipe sft-lora`, shared by the module; the rest are refusals before
submission and job-side checks of the prepare module on small files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import CLI, wait_chain


@pytest.fixture(scope="module")
def sft_assets(tmp_path_factory, hpcjobs_home):
    out = tmp_path_factory.mktemp("sft-demo")
    CLI()("demo-assets", "--recipe", "sft-lora", out, timeout=300)
    return out


@pytest.fixture(scope="module")
def sft_chain(devcluster, sft_assets):
    """`hpcjobs submit sft-lora --nodes 2 --profile local --config demo.yaml`, to its end, with
    BELLE's DeepSpeed setup: ZeRO-2 (the recipe's) with the optimizer offloaded to the CPU."""
    cli = CLI()
    sub = cli.json("submit", "sft-lora", "--nodes", "2", "--profile", "local",
                   "--config", sft_assets / "demo.yaml", "--name", "sft", "finetune.offload_optimizer=cpu")
    final = wait_chain(cli, sub["chain"], timeout=900)
    return sub, final


def _stage(final, name):
    return next(s for s in final["stages"] if s["name"] == name)


# ------------------------------------------------------------------ the real chain

@pytest.mark.cluster
@pytest.mark.train
@pytest.mark.slow
def test_chain_completes_and_eval_loss_drops(sft_chain):
    sub, final = sft_chain
    assert list(sub["jobs"]) == ["prepare", "finetune", "merge", "evaluate"]
    assert final["state"] == "COMPLETED", final
    run = Path(sub["run_dir"])
    report = json.loads((run / "eval" / "report.json").read_text())
    base, merged = report["eval_loss"]["base"], report["eval_loss"]["merged"]
    assert math.isfinite(base) and math.isfinite(merged)
    assert merged < base - 0.5, report["eval_loss"]   # ln(400) ~ 6 for the random model
    stats = json.loads((run / "prepared" / "prepare.json").read_text())
    # the held-out loss counts exactly the response tokens (+ EOS) of the prepared test split
    assert report["eval_tokens"] == stats["splits"]["test"]["trained_tokens"] - _first_token_labels(run)
    assert report["samples"] and all(s["reference"] for s in report["samples"])
    zero = json.loads((run / "stages/finetune/attempt-1/ds_config.json").read_text())["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["query_key_value"]     # chosen for Bloom on the login node
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 32


def _first_token_labels(run: Path) -> int:
    """Labels on position 0 predict nothing (the loss is shifted by one): counted out."""
    from hpcjobs.train.prepare import load_prepared

    test = load_prepared(run / "prepared")["test"]
    return sum(1 for labels in test["labels"] if labels[0] != -100)


@pytest.mark.cluster
@pytest.mark.train
@pytest.mark.slow
def test_labels_are_minus_100_exactly_on_the_prompt(sft_chain):
    """train_on_inputs false: the loss sees response tokens only, on a batch as finetune builds it."""
    from transformers import AutoTokenizer

    from hpcjobs.train.finetune import prepared_collator
    from hpcjobs.train.prepare import load_prepared

    sub, _ = sft_chain
    run = Path(sub["run_dir"])
    train = load_prepared(run / "prepared")["train"]
    tok = AutoTokenizer.from_pretrained(json.loads((run / "prepared" / "prepare.json").read_text())["tokenizer"])
    rows = [train[i] for i in range(8)]
    batch = prepared_collator(tok)([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[1] % 8 == 0                               # pad_to_multiple_of=8
    for i, r in enumerate(rows):
        n_prompt = len(tok(r["prompt"])["input_ids"])
        n_resp = len(tok(r["response"], add_special_tokens=False)["input_ids"])
        n = len(r["input_ids"])
        assert n == n_prompt + n_resp + 1 and int(mask[i].sum()) == n
        assert labels[i, :n_prompt].tolist() == [-100] * n_prompt
        assert labels[i, n_prompt:n].tolist() == ids[i, n_prompt:n].tolist()
        assert labels[i, n - 1].item() == tok.eos_token_id
        assert labels[i, n:].tolist() == [-100] * (ids.shape[1] - n)   # padding


@pytest.mark.cluster
@pytest.mark.train
@pytest.mark.slow
def test_prepare_on_cpu_and_finetune_did_not_tokenize(sft_chain):
    sub, final = sft_chain
    run = Path(sub["run_dir"])
    script = (run / "stages/prepare/attempt-1/job.sbatch").read_text()
    assert "--gpus-per-node" not in script                        # no GPU asked for
    stats = json.loads((run / "prepared" / "prepare.json").read_text())
    assert stats["splits"]["train"]["rows"] == 240 and stats["splits"]["train"]["truncated"] == 0
    assert stats["splits"]["train"]["longest"] <= 64
    log = Path(_stage(final, "finetune")["log"]).read_text()
    assert log.count(f"data: loaded prepared dataset {run / 'prepared'}") == 1, log[-3000:]
    # TRL's dataset preparation (EOS, tokenizing, truncating) never ran in the ranks
    for work in ("Tokenizing", "Adding EOS", "Truncating", "Building labels"):
        assert work not in log
    train_json = json.loads((run / "stages/finetune/attempt-1/train.json").read_text())
    assert train_json["prepared"] == str(run / "prepared")


# ------------------------------------------------------------------ refused before submission

def _tiny_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.cluster
@pytest.mark.train
def test_missing_column_is_refused_before_submission(devcluster, sft_assets, hpcjobs):
    proc = hpcjobs("submit", "sft-lora", "--nodes", "2", "--profile", "local", "--config",
                   sft_assets / "demo.yaml", "prepare.response={answer}", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "prepare.response" in proc.stderr and "'answer'" in proc.stderr and "'target'" in proc.stderr
    assert "nothing was submitted" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.cluster
@pytest.mark.train
def test_empty_split_is_refused_before_submission(devcluster, sft_assets, hpcjobs, tmp_path):
    data = _tiny_jsonl(tmp_path / "five.jsonl", [{"input": f"q{i}", "target": f"a{i}"} for i in range(5)])
    proc = hpcjobs("submit", "sft-lora", "--nodes", "2", "--profile", "local", "--config",
                   sft_assets / "demo.yaml", f"data.path={data}", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "data.split" in proc.stderr and "eval split empty" in proc.stderr and "5 rows" in proc.stderr
    assert "nothing was submitted" in proc.stderr


def test_lora_targets_by_architecture(hpcjobs, tmp_path):
    """finetune.lora.target_modules []: from config.json on the login node (no torch there)."""
    for model_type, want in (("qwen2", ["q_proj", "v_proj"]), ("bloom", ["query_key_value"]),
                             ("bert", ["query", "value"]), ("t5", ["q", "v"])):
        model = tmp_path / model_type
        model.mkdir()
        cfg = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
               "n_head": 4, "n_layer": 2, "intermediate_size": 128, "num_key_value_heads": 4, "vocab_size": 400,
               "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}
        (model / "config.json").write_text(json.dumps(cfg))
        (model / "tokenizer.json").write_text("{}")
        data = _tiny_jsonl(tmp_path / "d.jsonl", [{"input": f"q{i}", "target": f"a{i}"} for i in range(20)])
        j = hpcjobs.json("render", "sft-lora", "--nodes", "2", "--profile", "local", f"model.source={model}",
                         f"data.path={data}")
        ft = next(s for s in j["stages"] if s["name"] == "finetune")
        assert json.loads(ft["files"]["train.json"])["lora"]["target_modules"] == want
    (tmp_path / "gpt2" / "config.json").parent.mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    proc = hpcjobs("render", "sft-lora", "--profile", "local", f"model.source={tmp_path / 'gpt2'}",
                   f"data.path={data}", check=False)
    assert proc.returncode == 2 and "finetune.lora.target_modules" in proc.stderr, proc.stderr


@pytest.mark.train
def test_split_sizes_match_the_job_side_split():
    """The login node's row arithmetic is the datasets split the prepare job makes."""
    import datasets

    from hpcjobs.stages.prepare import split_sizes
    from hpcjobs.train.data import split_dataset

    for rows in (3, 5, 7, 10, 31, 100):
        for split in ([0.8, 0.1, 0.1], [0.9, 0.05, 0.05], [0.5, 0.5, 0.0], [0.6, 0.2, 0.2]):
            ds = datasets.Dataset.from_dict({"x": list(range(rows))})
            try:
                got = {k: len(v) for k, v in split_dataset(ds, split).items()}
            except ValueError:
                got = None
            want = split_sizes(rows, split)
            if got is None:   # datasets refuses a split with an empty part: so does the login node
                assert want["train"] == 0 or want["test"] == 0, (rows, split, want)
            else:
                assert got == want, (rows, split, got, want)


# ------------------------------------------------------------------ the prepare job on bad rows

@pytest.mark.train
def test_prepare_names_row_and_column(sft_assets, tmp_path):
    from hpcjobs.errors import HpcjobsError
    from hpcjobs.train.prepare import prepare

    rows = [{"input": f"What is {i}?", "target": f"It is {i}."} for i in range(12)]
    rows[6]["target"] = "  "
    data = _tiny_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = {"tokenizer": str(sft_assets / "bloom-tiny"), "prompt": "{input}\n", "response": "{target}",
           "train_on_inputs": False, "max_seq_length": 64,
           "data": {"path": str(data), "template": "{input}\n{target}", "split": [0.8, 0.1, 0.1], "seed": 42}}
    (tmp_path / "prepare.json").write_text(json.dumps(cfg))
    with pytest.raises(HpcjobsError, match=r"row 7, column 'target': empty response"):
        prepare(tmp_path / "prepare.json", tmp_path / "out")

    cfg["response"] = "{answer}"
    (tmp_path / "prepare.json").write_text(json.dumps(cfg))
    with pytest.raises(HpcjobsError, match=r"missing column\(s\) 'answer'.*template '\{answer\}'"):
        prepare(tmp_path / "prepare.json", tmp_path / "out")
