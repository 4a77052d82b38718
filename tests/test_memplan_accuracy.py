"""The memory planner (hpcjobs/memplan/estimate.py) against what real PyTorch and DeepSpeed hold.

* Model states: one 2-rank job on the devcluster (``hpcjobs run hpcjobs.memplan.measure -m``,
  torchrun over node1 and node2, gloo) wraps a small Llama with ``deepspeed.initialize`` and the
  config hpcjobs generates, for ZeRO 1, 2, 3, with and without optimizer offload (and parameter
  offload under ZeRO-3), LoRA and full, in fp32 (what the local profile's finetune runs) and, for
  ZeRO-2 and ZeRO-3 with both offloads, in bf16 (what GPUs run); it counts every tensor
  DeepSpeed holds on each rank (:func:`hpcjobs.memplan.measure.model_state_bytes`). Weights,
  gradients and optimizer states (fp32 master + Adam moments) must be within 5% of the planner's,
  on the device and offloaded.
* Activations: in-process, the bytes autograd saves for backward in one forward + loss
  (``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded) against
  the planner's "activations" plus the part of "logits/loss" kept for backward (the fp32
  log-softmax, ``saved_logits_bytes``; the bf16 logits and their fp32 upcast are transient),
  within 10%, for Llama and Qwen2 blocks: SDPA and eager, checkpointing on and off, LoRA and full.
"""

from __future__ import annotations

import json

import pytest

from hpcjobs.memplan.estimate import TrainSetup, activation_bytes, logits_bytes, model_states
from hpcjobs.memplan.params import model_shape

# ------------------------------------------------------------------ tensor sizes (no cluster)

TINY_CFGS = [
    {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
     "num_hidden_layers": 3, "num_key_value_heads": 2, "vocab_size": 503, "tie_word_embeddings": False},
    {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
     "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 400, "tie_word_embeddings": True},
    {"model_type": "llama", "hidden_size": 48, "intermediate_size": 80, "num_attention_heads": 4,
     "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 16, "attention_bias": True, "mlp_bias": True,
     "vocab_size": 211},
    {"model_type": "bloom", "hidden_size": 64, "n_head": 4, "n_layer": 3, "vocab_size": 250},
    {"model_type": "t5", "d_model": 32, "d_ff": 80, "d_kv": 16, "num_heads": 3, "num_layers": 2,
     "num_decoder_layers": 3, "vocab_size": 99, "feed_forward_proj": "gated-gelu"},
    {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
     "num_hidden_layers": 2, "max_position_embeddings": 40, "type_vocab_size": 3, "vocab_size": 99},
]


def _from_config(cfg, device=None):
    import torch
    import transformers
    from transformers import AutoConfig

    c = dict(cfg)
    mt = c.pop("model_type")
    config = AutoConfig.for_model(mt, **c)
    with torch.device(device or "cpu"):
        if mt == "t5":
            return transformers.T5ForConditionalGeneration(config)
        if mt == "bert":
            return transformers.BertModel(config)
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.train
@pytest.mark.parametrize("cfg", TINY_CFGS, ids=[f"{c['model_type']}{i}" for i, c in enumerate(TINY_CFGS)])
def test_tensor_sizes_equal_the_model(cfg):
    """ZeRO-3 keeps tensors under its persistence threshold whole: the planner needs each size."""
    model = _from_config(cfg, "meta")
    real = sorted(p.numel() for p in model.parameters())
    ours = sorted(n for n, c in model_shape(cfg).tensors for _ in range(c))
    assert ours == real


# ------------------------------------------------------------------ model states (2 ranks, DeepSpeed)

COMPONENTS = ("weights", "gradients", "optimizer states")


def _setup(case, cfg, world, lora_r, lora_targets):
    return TrainSetup(shape=model_shape(cfg), world_size=world, ranks_per_node=1, micro_batch=1, seq_len=16,
                   precision=case["precision"], zero_stage=case["zero_stage"],
                   offload_optimizer=case["offload_optimizer"], offload_param=case["offload_param"],
                   lora_r=lora_r if case["lora"] else None, lora_targets=lora_targets if case["lora"] else (),
                   accelerator="cpu")


def predicted_states(case, cfg, world, lora_r, lora_targets):
    """The planner's model states; ZeRO-3's weights without the gathered working set (checked apart)."""
    ms = model_states(_setup(case, cfg, world, lora_r, lora_targets))
    return {"weights": (ms.gpu_weights - ms.breakdown["gathered"], ms.host_weights),
            "gradients": (ms.gpu_grads, ms.host_grads),
            "optimizer states": (ms.gpu_optimizer, ms.host_optimizer)}


def measured_states(rank, stage):
    """Each component at its own peak over the counts taken during the second step (end of
    backward before the final reduction, after it, and at each parameter group's optimizer step).

    Weights: what stays on the rank (under ZeRO-3 the gathered working set is checked apart).
    Gradients: the reduced gradient buffers at their peak plus the fp32 gradient the optimizer
    steps on (created from them inside the step; at that instant both exist, between two of our
    counts); under ZeRO-3 the fp32 one or the full-size gradient autograd produces for one
    gathered parameter during backward, whichever is larger (the planner's rule).
    """
    snaps = [v for k, v in rank.items() if isinstance(v, dict) and k != "forward"]

    def peak(loc, *cats):
        return max(sum(s[loc][c] for c in cats) for s in snaps)

    gathered = rank["largest_grad"] if stage == 3 else 0
    # ZeRO-3: the resident weights (partitions + persistent tensors) once backward has released
    # what it gathered; ZeRO-1/2 hold the same weights throughout
    weights = (rank["reduced"]["device"]["weights"], rank["reduced"]["host"]["weights"])
    return {
        "weights": weights,
        "gradients": (peak("device", "gradients") + max(peak("device", "gradients32"), gathered),
                      peak("host", "gradients") + peak("host", "gradients32")),
        "optimizer states": (peak("device", "master", "optimizer"), peak("host", "master", "optimizer")),
    }


def _tag(case):
    off = "" if case["offload_optimizer"] == "none" else "+opt-offload"
    off += "" if case["offload_param"] == "none" else "+param-offload"
    return f"ZeRO-{case['zero_stage']}{off} {'LoRA' if case['lora'] else 'full'} {case['precision']}"


@pytest.fixture(scope="module")
def deepspeed_counts(devcluster, tmp_path_factory):
    from conftest import CLI, wait_chain

    hpcjobs = CLI()
    out = tmp_path_factory.mktemp("memplan") / "states.json"
    sub = json.loads(hpcjobs("run", "hpcjobs.memplan.measure", "-m", "--nodes", "2", "--launcher", "torchrun",
                             "--name", "memplan-measure", "--json", "--", "--out", out,
                             "--precision", "fp32,bf16:core").stdout)
    final = wait_chain(hpcjobs, sub["chain"], timeout=600)
    assert final["state"] == "COMPLETED", hpcjobs("logs", sub["chain"], check=False).stdout[-4000:]
    return json.loads(out.read_text())


@pytest.mark.cluster
@pytest.mark.train
def test_model_states_match_deepspeed_on_two_ranks(deepspeed_counts):
    data = deepspeed_counts
    assert data["world_size"] == 2 and len(data["results"]) == 18
    rows, bad = [], []
    for r in data["results"]:
        case = r["case"]
        pred = predicted_states(case, data["model"], data["world_size"], data["lora_r"], data["lora_targets"])
        assert len(r["ranks"]) == 2
        for rank_no, rank in enumerate(r["ranks"]):
            meas = measured_states(rank, case["zero_stage"])
            for comp in COMPONENTS:
                (pd, ph), (md, mh) = pred[comp], meas[comp]
                err = (abs(pd - md) + abs(ph - mh)) / max(1, md + mh)
                rows.append(f"{_tag(case):38s} rank {rank_no} {comp:16s} predicted {pd:>10,}+{ph:>10,} "
                            f"measured {md:>10,}+{mh:>10,} (device+host)  {err:6.2%}")
                if err > 0.05:
                    bad.append(rows[-1])
    print("\n" + "\n".join(rows))
    assert not bad, "\n".join(bad)


@pytest.mark.cluster
@pytest.mark.train
def test_zero3_gathered_weights_within_the_working_set_and_prefetch(deepspeed_counts):
    """What ZeRO-3 gathers around a module's forward: at least the largest layer (the planner's
    working set in "weights"), at most that plus the prefetch bucket (its "DeepSpeed buffers")."""
    from hpcjobs.memplan.estimate import buffer_bytes

    data = deepspeed_counts
    n = 0
    for r in data["results"]:
        case = r["case"]
        if case["zero_stage"] != 3:
            continue
        t = _setup(case, data["model"], data["world_size"], data["lora_r"], data["lora_targets"])
        ms = model_states(t)
        prefetch = t.prefetch_bucket_size * (4 if case["precision"] == "fp32" else 2)
        assert buffer_bytes(t)[0] >= prefetch
        for rank in r["ranks"]:
            gathered = rank["forward"]["device"]["weights"] - rank["reduced"]["device"]["weights"]
            assert ms.breakdown["gathered"] <= gathered <= ms.breakdown["gathered"] + prefetch, (_tag(case), gathered)
            n += 1
    assert n == 2 * 8


@pytest.mark.cluster
@pytest.mark.train
def test_counts_see_what_each_setup_moves(deepspeed_counts):
    """The counting itself: offload really moved states to the host buffers, ZeRO-3 really partitioned."""
    by = {(_tag(r["case"])): r["ranks"][0] for r in deepspeed_counts["results"]}
    z2 = by["ZeRO-2 full fp32"]
    assert max(s["host"]["optimizer"] for k, s in z2.items() if isinstance(s, dict) and k != "forward") == 0
    z2off = by["ZeRO-2+opt-offload full fp32"]
    assert all(s["device"]["optimizer"] == 0 and s["host"]["optimizer"] > 0
               for k, s in z2off.items() if isinstance(s, dict) and k != "forward")
    z3 = by["ZeRO-3+opt-offload+param-offload full bf16"]
    snaps = [s for k, s in z3.items() if isinstance(s, dict) and k != "forward"]
    psi = model_shape(deepspeed_counts["model"]).total
    assert max(s["host"]["weights"] for s in snaps) == pytest.approx(2 * psi / 2, rel=0.01)   # bf16 halves


# ------------------------------------------------------------------ activations (in-process)

ACT_LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512, "tie_word_embeddings": False,
             "max_position_embeddings": 256}
ACT_QWEN2 = {**ACT_LLAMA, "model_type": "qwen2", "tie_word_embeddings": True}
QV = ["q_proj", "v_proj"]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, MICRO = 64, 2

ACT_CASES = [
    # (id, config, precision, attention, checkpointing, LoRA targets, LoRA dropout)
    ("bf16-sdpa-full", ACT_LLAMA, "bf16", "sdpa", False, None, 0.0),
    ("bf16-eager-full", ACT_LLAMA, "bf16", "eager", False, None, 0.0),
    ("bf16-sdpa-full-ckpt", ACT_LLAMA, "bf16", "sdpa", True, None, 0.0),
    ("fp32-sdpa-full", ACT_LLAMA, "fp32", "sdpa", False, None, 0.0),
    ("bf16-sdpa-lora-qv", ACT_LLAMA, "bf16", "sdpa", False, QV, 0.05),
    ("bf16-sdpa-lora-qv-nodropout", ACT_LLAMA, "bf16", "sdpa", False, QV, 0.0),
    ("bf16-eager-lora-all", ACT_LLAMA, "bf16", "eager", False, ALL7, 0.05),
    ("bf16-sdpa-lora-qv-ckpt", ACT_LLAMA, "bf16", "sdpa", True, QV, 0.05),
    ("fp32-sdpa-lora-qv", ACT_LLAMA, "fp32", "sdpa", False, QV, 0.05),
    ("qwen2-bf16-sdpa-lora-all-ckpt", ACT_QWEN2, "bf16", "sdpa", True, ALL7, 0.05),
]


_SAVED: dict = {}


def _saved_bytes(cfg, precision, attention, ckpt, targets, dropout, layers):
    """Bytes autograd saves in one forward + loss (each storage once, parameters left out)."""
    key = json.dumps([cfg, precision, attention, ckpt, targets, dropout, layers])
    if key not in _SAVED:
        _SAVED[key] = _measure_saved(cfg, precision, attention, ckpt, targets, dropout, layers)
    return _SAVED[key]


def _measure_saved(cfg, precision, attention, ckpt, targets, dropout, layers):
    import torch

    from hpcjobs.memplan.measure import SavedActivations

    torch.manual_seed(0)
    model = _from_config({**cfg, "num_hidden_layers": layers, "attn_implementation": attention})
    model.config.use_cache = False
    if targets:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    # as DeepSpeed does: the whole module, PEFT's fp32 adapter included, in the compute dtype
    model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[precision])
    if ckpt:
        model.gradient_checkpointing_enable()
        if targets:
            model.enable_input_require_grads()     # what the HF Trainer does for PEFT + checkpointing
    model.train()
    ids = torch.randint(0, cfg["vocab_size"], (MICRO, SEQ), generator=torch.Generator().manual_seed(1))
    with SavedActivations(model) as saved:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return saved.bytes


@pytest.mark.train
@pytest.mark.parametrize("name,cfg,precision,attention,ckpt,targets,dropout", ACT_CASES, ids=[c[0] for c in ACT_CASES])
def test_activations_match_saved_tensors(name, cfg, precision, attention, ckpt, targets, dropout):
    """Planner's activations + the loss's saved log-softmax = what autograd keeps for backward.

    With checkpointing the forward keeps each block's input; backward then recomputes one block
    at a time, which saves what a block saves without checkpointing: measured as the difference
    between the model with L and with L - 1 blocks, without checkpointing.
    """
    from hpcjobs.memplan.estimate import saved_logits_bytes

    L = cfg["num_hidden_layers"]
    measured = _saved_bytes(cfg, precision, attention, ckpt, targets, dropout, L)
    if ckpt:
        measured += (_saved_bytes(cfg, precision, attention, False, targets, dropout, L)
                     - _saved_bytes(cfg, precision, attention, False, targets, dropout, L - 1))
    t = TrainSetup(shape=model_shape(cfg), micro_batch=MICRO, seq_len=SEQ, precision=precision, attention=attention,
                   gradient_checkpointing=ckpt, lora_r=8 if targets else None, lora_targets=targets or (),
                   lora_dropout=dropout, accelerator="cpu")
    predicted = activation_bytes(t) + saved_logits_bytes(t)
    print(f"\n{name}: predicted {predicted:,} measured {measured:,} ({predicted / measured - 1:+.1%})")
    assert predicted == pytest.approx(measured, rel=0.10)
