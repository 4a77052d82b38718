"""The memory planner against a real GPU: predicted peak vs ``torch.cuda.max_memory_allocated``.

    .venv/bin/python bench/bench_memplan_gpu.py            # every case (a few minutes on one GPU)
    .venv/bin/python bench/bench_memplan_gpu.py --quick    # three cases
    .venv/bin/python bench/bench_memplan_gpu.py --smoke    # CPU, tiny model: the code path only

One GPU, no Slurm. Each case builds a Llama-style model from a config (about 125M and 350M
parameters, random weights), wraps it as the finetune stage does (bf16, PEFT LoRA on q_proj/v_proj
or full, gradient checkpointing on or off, DeepSpeed ZeRO-2 with the config hpcjobs/dsconfig.py
generates, world size 1, the HF Trainer's AdamW), runs one warm-up step (Adam's states exist from
then on, as in any later step), resets the peak statistics and runs one more step
(forward + loss, backward, optimizer step). The planner's GPU peak without its "framework
overhead" (the CUDA context and NCCL buffers are not allocations PyTorch counts) is compared with
``max_memory_allocated``. Exits 1 when a case is off by more than 15%, 0 otherwise; without CUDA it
says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpcjobs.memplan.estimate import TrainSetup, fmt_bytes, plan_memory  # noqa: E402
from hpcjobs.memplan.params import model_shape  # noqa: E402

TOLERANCE = 0.15
LLAMA_125M = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12,
              "num_key_value_heads": 12, "num_hidden_layers": 12, "vocab_size": 32000,
              "tie_word_embeddings": False, "max_position_embeddings": 4096}
LLAMA_350M = {**LLAMA_125M, "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
              "num_key_value_heads": 16, "num_hidden_layers": 24}
TINY = {**LLAMA_125M, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 500}
LORA_TARGETS = ["q_proj", "v_proj"]


def cases(quick: bool, smoke: bool):
    """(name, config, LoRA?, checkpointing?, micro batch, sequence length)."""
    if smoke:
        return [("tiny full", TINY, False, False, 2, 32), ("tiny lora ckpt", TINY, True, True, 2, 32)]
    out = []
    for name, cfg, seq in (("125M", LLAMA_125M, 1024), ("350M", LLAMA_350M, 1024)):
        for lora in (False, True):
            for ckpt in (False, True):
                for micro in (1, 4):
                    out.append((f"{name} {'lora' if lora else 'full'} {'ckpt' if ckpt else 'no-ckpt'} mb{micro}",
                                cfg, lora, ckpt, micro, seq))
    if quick:
        out = [c for c in out if c[0] in ("125M full no-ckpt mb1", "125M lora ckpt mb4", "350M full ckpt mb4")]
    return out


def setup_for(cfg, lora, ckpt, micro, seq, device):
    return TrainSetup(shape=model_shape(cfg), world_size=1, ranks_per_node=1, micro_batch=micro, seq_len=seq,
                      precision="bf16", zero_stage=2, gradient_checkpointing=ckpt,
                      lora_r=8 if lora else None, lora_targets=LORA_TARGETS if lora else (), lora_dropout=0.05,
                      attention="sdpa", accelerator="cuda" if device == "cuda" else "cpu")


def run_case(cfg, lora, ckpt, micro, seq, device):
    """Peak bytes allocated during one training step (after a warm-up step); None on CPU."""
    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpcjobs.dsconfig import build_ds_config

    # what earlier cases left allocated (nothing, unless a library keeps a reference) is not ours
    baseline = torch.cuda.memory_allocated() if device == "cuda" else 0
    c = dict(cfg)
    config = AutoConfig.for_model(c.pop("model_type"), **c)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)   # finetune loads in bf16
    model.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
    if ckpt:
        model.gradient_checkpointing_enable()
        if lora:
            model.enable_input_require_grads()      # the HF Trainer does this for PEFT + checkpointing
    model.train()
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([g for g in ({"params": decay, "weight_decay": 0.0},
                                         {"params": no_decay, "weight_decay": 0.0}) if g["params"]], lr=1e-5)
    ds = build_ds_config(precision="bf16", zero_stage=2, micro_batch_per_gpu=micro, gradient_accumulation_steps=1,
                         world_size=1, gradient_clipping=1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    gen = torch.Generator().manual_seed(1)

    def step():
        ids = torch.randint(0, cfg["vocab_size"], (micro, seq), generator=gen).to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    step()                                          # Adam's states are created in the first step
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        step()
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine, model, opt
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return peak


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="three cases instead of all sixteen")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: run the code path, compare nothing")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_memplan_gpu: torch is not installed (pip install 'hpcjobs[train]'); nothing measured")
        return 0
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_memplan_gpu: no CUDA device here; this benchmark needs one GPU. Nothing measured "
              "(exit 0). Run it on a GPU machine: .venv/bin/python bench/bench_memplan_gpu.py")
        return 0
    os.environ.setdefault("DS_ACCELERATOR", device)
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(k, v)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False)
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, deepspeed {deepspeed.__version__}")
    rows, worst = [], 0.0
    for name, cfg, lora, ckpt, micro, seq in cases(args.quick, args.smoke):
        t = setup_for(cfg, lora, ckpt, micro, seq, device)
        plan = plan_memory(t)
        predicted = plan.gpu_peak - plan.gpu["framework overhead"]
        measured = run_case(cfg, lora, ckpt, micro, seq, device)
        if measured is None:
            rows.append((name, predicted, None, None, plan.gpu_phase))
            continue
        ratio = predicted / measured
        worst = max(worst, abs(ratio - 1))
        rows.append((name, predicted, measured, ratio, plan.gpu_phase))
        print(f"{name:28s} predicted {fmt_bytes(predicted):>10s} ({plan.gpu_phase}) measured {fmt_bytes(measured):>10s}"
              f"  ratio {ratio:.3f}{'  OFF' if abs(ratio - 1) > TOLERANCE else ''}", flush=True)
    print()
    print(f"{'case':28s} {'predicted':>11s} {'measured':>11s} {'ratio':>7s}  peak phase (predicted)")
    for name, pred, meas, ratio, phase in rows:
        print(f"{name:28s} {fmt_bytes(pred):>11s} {fmt_bytes(meas) if meas else '-':>11s} "
              f"{f'{ratio:.3f}' if ratio else '-':>7s}  {phase}")
    if args.smoke:
        print("smoke run on CPU: code path only, no memory measured")
        return 0
    bad = [r for r in rows if abs(r[3] - 1) > TOLERANCE]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} cases within {TOLERANCE:.0%} (worst {worst:.1%})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
