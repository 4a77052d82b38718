#!/usr/bin/env python3
"""Real (non-padding) tokens per second of sft-lora's finetune stage: with a prepare stage and
without one (every rank tokenizing the data set itself, as finetune did before prepare), and
with the prepared examples packed (``finetune.packing``) or padded per batch.

    python bench/bench_prepare.py [--rows 20000] [--steps 20] [--ranks 2] [--micro-batch 8]

On the tiny Qwen2 of `hpcjobs demo-assets --recipe sft-lora --arch qwen2` (an architecture
that can pack) with ``--rows`` synthetic prompt/response rows, it runs the finetune module
under ``torchrun --nproc_per_node RANKS`` (plain DDP, CPU, gloo; no Slurm) three times:

* **with prepare**: ``python -m hpcjobs.train.prepare`` once (timed on its own), then finetune
  with ``prepared`` set: the ranks load the Arrow files;
* **with prepare and packing**: the same, with ``train.packing``: whole examples binned into
  rows of up to ``max_seq_length`` tokens (hpcjobs.train.packing);
* **without**: finetune with the same data block and no ``prepared``: each rank builds the
  texts (``data.template``) and TRL's SFTTrainer tokenizes them (whole-text loss: the
  pre-prepare path).

Real tokens are the Trainer's ``num_input_tokens_seen`` (``non_padding``: attention-mask sums,
or the tokens that are not the pad token when packed rows carry no mask; all ranks); the rate
is over the finetune process's wall time (start to exit: imports, loading, tokenizing,
training), which is what a chain waits for, and over the training loop alone (the Trainer's
``train_runtime``), where packing shows. Every run takes the same number of steps, so the
packed run sees more examples. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _train_json(work: Path, name: str, model: Path, data: Path, prepared: Path | None, packing: bool,
                a) -> Path:
    run = work / name
    run.mkdir()
    cfg = {
        "model_path": str(model), "output_dir": str(run / "adapter"), "checkpoint_dir": str(run / "ckpt"),
        "progress_file": str(run / "progress.jsonl"), "deepspeed_config": None, "resume": "never",
        "device": "cpu", "world_size": a.ranks,
        "data": {"path": str(data), "columns": [], "template": "{input}\n{target}", "split": [0.8, 0.1, 0.1],
                 "seed": 42},
        "prepared": str(prepared) if prepared else None,
        "lora": {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "bias": "none"},
        "train": {"micro_batch_size": a.micro_batch, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
                  "max_steps": a.steps, "warmup_steps": 2, "lr_scheduler_type": "cosine", "max_seq_length": 64,
                  "packing": packing,
                  "gradient_checkpointing": False, "precision": "fp32", "max_grad_norm": 1.0,
                  "logging_steps": a.steps, "save_steps": 10 * a.steps, "save_total_limit": 1, "eval_steps": None,
                  "seed": 42, "optim": "adamw_torch", "report_to": []},
    }
    path = run / "train.json"
    path.write_text(json.dumps(cfg))
    return path


def _finetune(config: Path, ranks: int) -> tuple[float, int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={ranks}", "-m", "hpcjobs.train.finetune", "--config", str(config)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"finetune failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    progress = Path(json.loads(config.read_text())["progress_file"])
    end = [json.loads(line) for line in progress.read_text().splitlines() if '"event": "end"' in line][-1]
    return seconds, int(end["num_input_tokens_seen"]), float(end["train_runtime"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()

    from hpcjobs.train.demo_assets import make_sft_demo_assets

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        made = make_sft_demo_assets(work / "assets", rows=a.rows, arch="qwen2")
        prep_cfg = work / "prepare.json"
        prep_cfg.write_text(json.dumps({
            "tokenizer": str(made["model"]), "prompt": "{input}\n", "response": "{target}",
            "train_on_inputs": False, "max_seq_length": 64,
            "data": {"path": str(made["dataset"]), "template": "{input}\n{target}", "split": [0.8, 0.1, 0.1],
                     "seed": 42}}))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hpcjobs.train.prepare", "--config", str(prep_cfg), "--output",
                        str(work / "prepared")], check=True, capture_output=True, cwd=REPO)
        prep_s = time.perf_counter() - t0

        rows = []
        runs = (("with prepare", "padded", work / "prepared", False),
                ("with prepare, packed", "packed", work / "prepared", True),
                ("without (each rank tokenizes)", "without", None, False))
        for name, dirname, prepared, packing in runs:
            cfg = _train_json(work, dirname, made["model"], made["dataset"], prepared, packing, a)
            rows.append((name, *_finetune(cfg, a.ranks)))
        print(f"sft-lora finetune, tiny Qwen2, {a.rows} rows, {a.steps} steps x {a.ranks} ranks x micro batch "
              f"{a.micro_batch} (torchrun, CPU); prepare alone: {prep_s:.1f} s\n")
        print("| finetune | wall time | real tokens | real tokens/s (wall) | training loop | real tokens/s (loop) |")
        print("|---|---|---|---|---|---|")
        for name, seconds, tokens, loop in rows:
            print(f"| {name} | {seconds:.1f} s | {tokens:,} | {tokens / seconds:,.0f} | {loop:.1f} s | "
                  f"{tokens / loop:,.0f} |")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"\nwork directory: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
