"""Predicted peak memory per GPU rank, and host memory per node, of a training setup.

Stdlib only (login node). Everything is in bytes. The numbers are a model, not a measurement;
each term and what it assumes is written next to it below.

Notation: Ψ = all parameters, T = trainable parameters (Ψ for a full finetune, the LoRA adapter
for LoRA), N = data-parallel world size, G = ranks per node, s = sequence length, b = micro
batch, h = hidden size, a = attention heads, L = transformer blocks, V = vocabulary,
w = bytes of the compute dtype (2 for bf16/fp16, 4 for fp32).

Model states (per rank)
  full finetune, mixed precision (Adam): 16-bit weights 2Ψ, 16-bit grads 2Ψ, fp32 master
  weights + momentum + variance 12Ψ, and DeepSpeed's fp32 gradient partition 4Ψ that the
  optimizer steps on (the "16Ψ" of the ZeRO paper, plus that fp32 gradient copy).
  full finetune, fp32: weights 4Ψ, grads 4Ψ, momentum + variance 8Ψ.
  LoRA / frozen base: base weights wΨ (no grads, no optimizer states); the adapter in fp32 as
  PEFT keeps it: weights 4T, grads 4T, momentum + variance 8T.
  ZeRO partitions over N: stage ≥1 the optimizer states (and the fp32 gradient partition),
  stage ≥2 the 16-bit gradients, stage 3 the weights. ZeRO-3 gathers one module at a time: its
  working set is DeepSpeed's "largest layer" (16-bit weights + grads of the biggest module,
  usually the embedding), as in ``estimate_zero3_model_states_mem_needs``.
  offload_optimizer=cpu moves the optimizer states and the fp32 gradients to host memory,
  offload_param=cpu (ZeRO-3) the weight partitions as well.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", no tensor/sequence parallelism): one transformer block stores s·b·h·(34 + 5·a·s/h)
bytes with 16-bit activations. The 5·a·s²·b term is the attention score matrix, its softmax
and dropout mask: with ``attention="sdpa"`` (PyTorch SDPA with the flash / memory-efficient
kernel, what transformers uses by default on GPU) it is not materialised and we drop it;
``attention="eager"`` keeps it. With full gradient checkpointing (one checkpoint per block, as
transformers does) each block keeps only its input, 2·s·b·h bytes, and one block is recomputed
during backward (its full activations once). fp32 activations double everything. The formula
is for a GPT-style block (4h MLP, dropout); Llama's SwiGLU MLP and no-dropout roughly cancel.

Logits and loss (decoder models): the lm_head output s·b·V·w, its fp32 upcast s·b·V·4 for the
loss, and cross-entropy's log-softmax copy s·b·V·4; in backward the fp32 gradient of the
logits s·b·V·4.

DeepSpeed buffers: the gradient reduction bucket (``reduce_bucket_size`` 16-bit elements,
twice with ``overlap_comm``: DeepSpeed double-buffers it), the ZeRO-1/2 all-gather bucket of the
updated weights after the step (``allgather_bucket_size``) and the ZeRO-3 prefetch bucket
(``stage3_prefetch_bucket_size``).

Framework overhead: a CUDA context with PyTorch's kernels and cuBLAS workspace
(:data:`CUDA_CONTEXT`, typically 0.5–0.8 GiB on A100/H100 with CUDA 12 lazy loading) and NCCL's
communicator buffers (:data:`NCCL_BUFFERS`, per-channel buffers of NCCL_BUFFSIZE = 4 MiB for
each ring/tree peer; a few hundred MiB on an 8-GPU node), none on the CPU accelerator.

Phases: the peak is the largest of
  forward/loss  weights + optimizer states + all stored activations + logits/loss
  backward      weights + optimizer states + gradients + all stored activations + fp32 logits
                gradient + reduction buckets (an upper bound: in reality activations are
                freed while gradients are produced)
  step          weights + optimizer states + gradients + all-gather bucket
Memory the PyTorch caching allocator holds but does not use (fragmentation) is not modelled:
that is what the headroom is for.

Host memory per node: G × (what each rank offloaded) during training, or, at load time,
G × the 16-bit (or fp32) weights each rank materialises from the checkpoint before DeepSpeed
moves them to the GPU, plus :data:`HOST_PER_RANK` for each process (Python, torch, CUDA host
allocations, data loader).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

from .params import ModelShape

GiB = 1 << 30
MiB = 1 << 20

CUDA_CONTEXT = 640 * MiB
"""CUDA context + PyTorch kernels + cuBLAS workspace on one GPU (observed 0.5-0.8 GiB)."""
NCCL_BUFFERS = 512 * MiB
"""NCCL communicator buffers per rank when the world has more than one rank."""
HOST_PER_RANK = 3 * GiB
"""Host memory of one training process besides the model (interpreter, torch, data loader)."""

DEFAULT_REDUCE_BUCKET = 200_000_000        # what hpcjobs/dsconfig.py generates
DEFAULT_ALLGATHER_BUCKET = 200_000_000
DEFAULT_PREFETCH_BUCKET = 50_000_000       # DeepSpeed's stage3_prefetch_bucket_size default

COMPONENTS = ("weights", "gradients", "optimizer states", "activations", "logits/loss",
              "DeepSpeed buffers", "framework overhead")
HOST_COMPONENTS = ("offloaded weights", "offloaded gradients", "offloaded optimizer states",
                   "loaded checkpoint", "processes")


@dataclass
class TrainSetup:
    shape: ModelShape
    world_size: int = 1
    ranks_per_node: int = 1
    micro_batch: int = 1
    seq_len: int = 512
    precision: str = "bf16"                # bf16, fp16 or fp32
    zero_stage: int = 2
    offload_optimizer: str = "none"        # none or cpu
    offload_param: str = "none"            # none or cpu (ZeRO-3)
    gradient_checkpointing: bool = True
    lora_r: Optional[int] = None           # None: full finetune
    lora_targets: Sequence[str] = ()
    attention: str = "sdpa"                # sdpa (flash / memory-efficient) or eager
    grad_accum: int = 1
    reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET
    allgather_bucket_size: int = DEFAULT_ALLGATHER_BUCKET
    prefetch_bucket_size: int = DEFAULT_PREFETCH_BUCKET
    overlap_comm: bool = True
    accelerator: str = "cuda"              # cpu: no CUDA context / NCCL

    @property
    def trainable(self) -> int:
        if self.lora_r is None:
            return self.shape.total
        return self.shape.lora_params(self.lora_r, list(self.lora_targets))

    @property
    def total(self) -> int:
        """All parameters of the model being trained (base + adapter)."""
        return self.shape.total + (self.trainable if self.lora_r is not None else 0)


@dataclass
class MemoryPlan:
    setup: TrainSetup
    gpu: Dict[str, int]                    # components at the peak phase
    gpu_phase: str
    phases: Dict[str, int]                 # total per phase
    host: Dict[str, int]                   # per node, at the host peak
    host_phase: str

    @property
    def gpu_peak(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())


@dataclass
class ModelStates:
    """Model-state bytes of one rank: on the GPU and offloaded to the host."""
    gpu_weights: int
    gpu_grads: int
    gpu_optimizer: int
    host_weights: int
    host_grads: int
    host_optimizer: int
    breakdown: Dict[str, int] = field(default_factory=dict)

    @property
    def gpu(self) -> int:
        return self.gpu_weights + self.gpu_grads + self.gpu_optimizer

    @property
    def host(self) -> int:
        return self.host_weights + self.host_grads + self.host_optimizer


def _w(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_states(t: TrainSetup) -> ModelStates:
    """Weights, gradients and optimizer states of one rank (see the module docstring)."""
    w = _w(t.precision)
    N = max(1, t.world_size)
    stage = t.zero_stage
    psi = t.shape.total
    if t.lora_r is None:
        T, frozen = psi, 0
        w_t = w
        if w == 2:
            g16, g32, opt = 2, 4, 12     # 16-bit grads, fp32 grad partition, master + m + v
        else:
            g16, g32, opt = 4, 0, 8
    else:
        T, frozen = t.trainable, psi
        w_t, g16, g32, opt = 4, 4, 0, 8  # fp32 adapter: weights, grads, m + v
    opt_div = N if stage >= 1 else 1
    grad_div = N if stage >= 2 else 1
    param_div = N if stage == 3 else 1

    weights = (frozen * w + T * w_t) / param_div
    grads16 = T * g16 / grad_div
    grads32 = T * g32 / opt_div
    optim = T * opt / opt_div
    gpu_w = weights
    gpu_g = grads16 + grads32
    gpu_o = optim
    host_w = host_g = host_o = 0.0
    if stage == 3:
        # the gathered working set: the largest module's 16-bit weights (+ its grads if trained)
        largest = t.shape.largest_layer
        gpu_w += largest * w
        gpu_g += largest * w if t.lora_r is None else 0
    if t.offload_optimizer == "cpu":
        # ZeRO-Offload: fp32 grads (or the partitioned grads) and optimizer states on the host;
        # the GPU keeps 16-bit grads only in the reduction buckets (and ZeRO-3's working set).
        host_o, gpu_o = optim, 0.0
        host_g = grads32 if g32 else grads16
        gpu_g -= grads16 + grads32
    if t.offload_param == "cpu" and stage == 3:
        host_w = weights
        gpu_w -= weights
    return ModelStates(int(gpu_w), int(gpu_g), int(gpu_o), int(host_w), int(host_g), int(host_o))


def activation_bytes(t: TrainSetup) -> int:
    """Stored activations of one micro batch (Korthikanti et al. 2022; see the module docstring)."""
    s, b, h, a, L = t.seq_len, t.micro_batch, t.shape.hidden, t.shape.heads, t.shape.layers
    scale = _w(t.precision) / 2
    per_layer = s * b * h * 34 + (5 * a * s * s * b if t.attention == "eager" else 0)
    if t.gradient_checkpointing:
        total = L * 2 * s * b * h + per_layer
    else:
        total = L * per_layer
    return int(total * scale)


def logits_bytes(t: TrainSetup) -> tuple[int, int]:
    """(forward/loss, backward) bytes of the logits: lm_head output, fp32 copy, log-softmax."""
    if not t.shape.decoder:
        return 0, 0
    sbv = t.seq_len * t.micro_batch * t.shape.vocab
    w = _w(t.precision)
    fwd = sbv * w + (sbv * 4 if w != 4 else 0) + sbv * 4
    return fwd, sbv * 4


def buffer_bytes(t: TrainSetup) -> tuple[int, int, int]:
    """(forward, backward, step) DeepSpeed buffer bytes (16-bit elements)."""
    reduce = t.reduce_bucket_size * 2 * (2 if t.overlap_comm else 1)
    if t.zero_stage == 3:
        prefetch = t.prefetch_bucket_size * 2
        return prefetch, reduce + prefetch, 0
    allgather = t.allgather_bucket_size * 2 if t.zero_stage in (1, 2) else 0
    return 0, reduce, allgather


def overhead_bytes(t: TrainSetup) -> int:
    if t.accelerator == "cpu":
        return 0
    return CUDA_CONTEXT + (NCCL_BUFFERS if t.world_size > 1 else 0)


def phase_components(t: TrainSetup) -> Dict[str, Dict[str, int]]:
    """The GPU components of each phase (forward/loss, backward, step)."""
    ms = model_states(t)
    act = activation_bytes(t)
    lg_fwd, lg_bwd = logits_bytes(t)
    buf_fwd, buf_bwd, buf_step = buffer_bytes(t)
    over = overhead_bytes(t)
    grads_fwd = ms.gpu_grads if t.grad_accum > 1 else 0
    phases_c = {
        "forward/loss": dict(zip(COMPONENTS, (ms.gpu_weights, grads_fwd, ms.gpu_optimizer, act, lg_fwd,
                                              buf_fwd, over))),
        "backward": dict(zip(COMPONENTS, (ms.gpu_weights, ms.gpu_grads, ms.gpu_optimizer, act, lg_bwd,
                                          buf_bwd, over))),
        "step": dict(zip(COMPONENTS, (ms.gpu_weights, ms.gpu_grads, ms.gpu_optimizer, 0, 0, buf_step, over))),
    }
    return phases_c


def plan_memory(t: TrainSetup) -> MemoryPlan:
    ms = model_states(t)
    phases_c = phase_components(t)
    phases = {k: sum(v.values()) for k, v in phases_c.items()}
    peak = max(phases, key=lambda k: phases[k])

    G = max(1, t.ranks_per_node)
    w = _w(t.precision)
    train_host = dict(zip(HOST_COMPONENTS, (G * ms.host_weights, G * ms.host_grads, G * ms.host_optimizer, 0,
                                            G * HOST_PER_RANK)))
    load_host = dict(zip(HOST_COMPONENTS, (0, 0, 0, G * t.shape.total * w, G * HOST_PER_RANK)))
    if sum(train_host.values()) >= sum(load_host.values()):
        host, host_phase = train_host, "training"
    else:
        host, host_phase = load_host, "model load"
    return MemoryPlan(t, phases_c[peak], peak, phases, host, host_phase)


def fmt_bytes(n: float) -> str:
    """Bytes as GiB with two decimals (MiB below 1 GiB)."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"
