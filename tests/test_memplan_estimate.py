"""The memory breakdown of hpcjobs/memplan/estimate.py.

Checked against hand-computed values from the formulas in its docstring, and against
DeepSpeed's own ``estimate_zero2_model_states_mem_needs`` /
``estimate_zero3_model_states_mem_needs`` where they model the same thing (full finetune,
mixed precision, Adam). Where we deliberately differ:

* ZeRO-3 without offload: DeepSpeed's 18Ψ/N leaves out the 16-bit gradient partition that
  stage 3 keeps between backward and step; we count it (20Ψ/N).
* ZeRO-3's working set: DeepSpeed counts the largest layer's 16-bit weights and gradients
  (4 bytes per parameter); we count its weights, and its gathered gradient only where it is larger
  than the fp32 gradient partition (they never coexist: one lives in backward, the other in the
  step), plus the tensors under ``stage3_param_persistence_threshold`` that stay whole on every
  rank. All three measured in tests/test_memplan_accuracy.py.
* ZeRO-3 with offload_optimizer: the 16-bit gradient partition lives on the host too (+2Ψ/N).
* host memory: DeepSpeed multiplies by ``additional_buffer_factor`` (1.5) and, for ZeRO-2 and
  ZeRO-3 without ``zero_init``, by a load-time term; we report the offloaded states themselves
  (and the load-time peak as its own phase), so we compare with the factor taken out.
"""

from __future__ import annotations

import pytest

from hpcjobs.memplan.estimate import (CUDA_CONTEXT, HOST_PER_RANK, NCCL_BUFFERS, TrainSetup, activation_bytes,
                                      buffer_bytes, logits_bytes, model_states, plan_memory)
from hpcjobs.memplan.params import model_shape

LLAMA2_7B_META = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                  "vocab_size": -1}
SHAPE = model_shape(LLAMA2_7B_META, vocab_size=32000)
PSI = 6_738_415_616


def test_full_mixed_precision_no_zero_is_16_psi_plus_fp32_grads():
    ms = model_states(TrainSetup(SHAPE, world_size=8, ranks_per_node=8, zero_stage=0))
    assert (ms.gpu_weights, ms.gpu_grads, ms.gpu_optimizer) == (2 * PSI, 6 * PSI, 12 * PSI)
    assert ms.host == 0


@pytest.mark.parametrize("stage,weights,grads,opt", [
    # DeepSpeed (0.19) reduces stage-1 gradients during backward into buckets as stage 2 does
    (1, 2 * PSI, 6 * PSI // 16, 12 * PSI // 16),
    (2, 2 * PSI, 6 * PSI // 16, 12 * PSI // 16),
])
def test_zero_partitioning(stage, weights, grads, opt):
    ms = model_states(TrainSetup(SHAPE, world_size=16, ranks_per_node=8, zero_stage=stage))
    assert (ms.gpu_weights, ms.gpu_grads, ms.gpu_optimizer) == (weights, grads, opt)


def test_zero3_partitions_weights_and_gathers_largest_layer():
    ms = model_states(TrainSetup(SHAPE, world_size=16, ranks_per_node=8, zero_stage=3))
    largest = 32000 * 4096
    assert SHAPE.largest_layer == largest
    persistent = 2 * (65 * 4096)             # 2 RMSNorm weights per block + the final one
    assert ms.gpu_weights == 2 * PSI // 16 + persistent + 2 * largest
    assert ms.gpu_grads == 6 * PSI // 16        # > the gathered 2 * largest


def test_lora_adapter_mixed_precision_base_frozen():
    # DeepSpeed casts the whole module, PEFT's fp32 adapter included, to bf16
    t = TrainSetup(SHAPE, world_size=16, ranks_per_node=8, zero_stage=2, lora_r=8, lora_targets=["q_proj", "v_proj"])
    assert t.trainable == 4_194_304
    ms = model_states(t)
    assert ms.gpu_weights == 2 * PSI + 2 * 4_194_304
    assert ms.gpu_grads == 6 * 4_194_304 // 16
    assert ms.gpu_optimizer == 12 * 4_194_304 // 16


def test_offload_host_memory_counts_every_local_rank():
    t = TrainSetup(SHAPE, world_size=16, ranks_per_node=8, zero_stage=3, offload_optimizer="cpu", offload_param="cpu")
    ms = model_states(t)
    assert (ms.host_weights, ms.host_grads, ms.host_optimizer) == (2 * PSI // 16, 6 * PSI // 16, 12 * PSI // 16)
    p = plan_memory(t)
    # 8 ranks each materialising the 16-bit checkpoint (16Ψ) outweigh the offloaded 8 × 20Ψ/16 = 10Ψ
    assert p.host_phase == "model load"
    assert p.host["loaded checkpoint"] == 8 * 2 * PSI
    assert p.host["processes"] == 8 * HOST_PER_RANK
    t.world_size = 2     # 8 × 20Ψ/2 = 80Ψ offloaded: training is the host peak
    p = plan_memory(t)
    assert p.host_phase == "training"
    assert p.host["offloaded optimizer states"] == 8 * (12 * PSI // 2)


def test_activations_llama_block():
    # per token and block (bf16): 2 RMSNorms 2*(4+2)h, q/k/v and gate/up inputs 2*2h,
    # SDPA q/k/v/out 2*(4h) + fp32 logsumexp 4a, SwiGLU 4*2*i, rsqrt 2*4; final norm + lm_head input 8h
    s, b, h, a, L, i = 512, 16, 4096, 32, 32, 11008
    block = 12 * h + 4 * h + 8 * h + 4 * a + 8 * i + 8
    head = s * b * 8 * h
    t = TrainSetup(SHAPE, micro_batch=b, seq_len=s, gradient_checkpointing=False, attention="sdpa")
    assert activation_bytes(t) == L * s * b * block + head
    t.attention = "eager"     # + fp32 softmax and its bf16 copy, no logsumexp
    assert activation_bytes(t) == L * s * b * (block - 4 * a + 6 * a * s) + head
    t.attention, t.gradient_checkpointing = "sdpa", True
    assert activation_bytes(t) == L * 2 * s * b * h + s * b * block + head
    t.precision = "fp32"      # 2 norms 2*(4+4)h, inputs 2*4h, SDPA 4*4h, SwiGLU 4*4*i; head 12h
    assert activation_bytes(t) == L * 4 * s * b * h + s * b * (16 * h + 8 * h + 16 * h + 4 * a + 16 * i + 8) \
        + s * b * 12 * h


def test_activations_korthikanti_for_other_blocks():
    bloom = model_shape({"model_type": "bloom", "hidden_size": 1024, "n_head": 16, "n_layer": 4, "vocab_size": 1000})
    s, b, h, a, L = 256, 2, 1024, 16, 4
    t = TrainSetup(bloom, micro_batch=b, seq_len=s, gradient_checkpointing=False, attention="eager")
    assert activation_bytes(t) == L * s * b * h * (34 + 5 * a * s // h)
    t.attention = "sdpa"
    assert activation_bytes(t) == L * s * b * h * 34


def test_logits_and_buffers():
    t = TrainSetup(SHAPE, micro_batch=4, seq_len=1024)
    sbv = 4 * 1024 * 32000
    assert logits_bytes(t) == (2 * sbv + 4 * sbv + 4 * sbv, 4 * sbv)
    t.zero_stage, t.reduce_bucket_size, t.allgather_bucket_size = 2, 5 * 10**8, 10**8
    assert buffer_bytes(t) == (0, 2 * 2 * 5 * 10**8, 2 * 10**8)
    t.overlap_comm = False
    assert buffer_bytes(t)[1] == 2 * 5 * 10**8


def test_peak_phase_and_overhead():
    # LoRA with a long sequence: the fp32 logits make forward/loss the peak.
    t = TrainSetup(SHAPE, world_size=16, ranks_per_node=8, micro_batch=16, seq_len=4096, lora_r=8,
                   lora_targets=["q_proj", "v_proj"])
    p = plan_memory(t)
    assert p.gpu_phase == "forward/loss"
    assert p.gpu["framework overhead"] == CUDA_CONTEXT + NCCL_BUFFERS
    assert p.gpu_peak == max(p.phases.values())
    # Full finetune: gradients and optimizer states make backward the peak.
    assert plan_memory(TrainSetup(SHAPE, world_size=16, ranks_per_node=8)).gpu_phase == "backward"
    # The CPU accelerator has no CUDA context.
    assert plan_memory(TrainSetup(SHAPE, accelerator="cpu")).gpu["framework overhead"] == 0


# ------------------------------------------------------------------ against DeepSpeed's estimators

NODES_GPUS = [(1, 8), (2, 8), (4, 4)]


@pytest.mark.train
@pytest.mark.parametrize("nodes,gpus", NODES_GPUS)
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_equal_deepspeed(nodes, gpus, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(PSI, num_gpus_per_node=gpus, num_nodes=nodes,
                                                     cpu_offload=offload, additional_buffer_factor=1.0)
    ms = model_states(TrainSetup(SHAPE, world_size=nodes * gpus, ranks_per_node=gpus, zero_stage=2,
                                 offload_optimizer="cpu" if offload else "none"))
    assert ms.gpu == pytest.approx(gpu, abs=4)
    if offload:
        # DeepSpeed: Ψ·max(4·N, 16) on the host (the larger of every rank loading fp32 weights and
        # the offloaded 16Ψ); ours: the offloaded 16Ψ/N per rank for each local rank.
        assert ms.host * gpus == pytest.approx(16 * PSI * gpus / (nodes * gpus), abs=16)
        assert cpu >= ms.host * gpus


@pytest.mark.train
@pytest.mark.parametrize("nodes,gpus", NODES_GPUS)
@pytest.mark.parametrize("offload_opt,offload_param", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_against_deepspeed(nodes, gpus, offload_opt, offload_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    N = nodes * gpus
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(PSI, SHAPE.largest_layer, num_gpus_per_node=gpus,
                                                     num_nodes=nodes, cpu_offload=offload_opt,
                                                     cpu_offload_params=offload_param, zero_init=True,
                                                     additional_buffer_factor=1.0)
    ms = model_states(TrainSetup(SHAPE, world_size=N, ranks_per_node=gpus, zero_stage=3,
                                 offload_optimizer="cpu" if offload_opt else "none",
                                 offload_param="cpu" if offload_param else "none"))
    largest, persistent = SHAPE.largest_layer, SHAPE.persistent_params(100_000)
    # DeepSpeed's working set is 4 bytes x largest layer (16-bit weights + gradients); ours is its
    # weights, the persistent small tensors, and the gathered gradient only where no larger fp32
    # gradient partition is on the device (with offload_optimizer)
    ours_ws = 2 * largest + 2 * persistent + (2 * largest if offload_opt else 0)
    if not offload_opt:
        # we also count the 16-bit gradient partition stage 3 keeps until the step
        assert ms.gpu == pytest.approx(gpu - 4 * largest + ours_ws + 2 * PSI / N, abs=8)
    else:
        assert ms.gpu == pytest.approx(gpu - 4 * largest + ours_ws, abs=8)
        # ... and its 16-bit gradient partition is on the host
        assert ms.host * gpus == pytest.approx(cpu + 2 * PSI / N * gpus, rel=1e-9, abs=64)
