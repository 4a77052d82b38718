"""Predicted peak memory per GPU rank, and host memory per node, of a training setup.

Stdlib only (login node). Everything is in bytes. The numbers are a model, not a measurement;
each term and what it assumes is written next to it below.

Notation: Ψ = all parameters, T = trainable parameters (Ψ for a full finetune, the LoRA adapter
for LoRA), N = data-parallel world size, G = ranks per node, s = sequence length, b = micro
batch, h = hidden size, a = attention heads, L = transformer blocks, V = vocabulary,
w = bytes of the compute dtype (2 for bf16/fp16, 4 for fp32).

Model states (per rank); measured against a real DeepSpeed engine (0.19, 2 ranks, ZeRO 1-3, with
and without offload, LoRA and full, fp32 and bf16) in tests/test_memplan_accuracy.py, where the
predictions equal the tensor bytes DeepSpeed holds to within 0.1%:
  full finetune, mixed precision (Adam): 16-bit weights 2Ψ, 16-bit grads 2Ψ, fp32 master
  weights + momentum + variance 12Ψ, and DeepSpeed's fp32 gradient partition 4Ψ that the
  optimizer steps on (the "16Ψ" of the ZeRO paper, plus that fp32 gradient copy).
  fp32 under ZeRO: the same with 4-byte weights and grads: the ZeRO optimizer clones its fp32
  partition (master) and converts the flattened gradient partition into a separate fp32 tensor
  even when the model already is fp32. fp32 without ZeRO: weights 4Ψ, grads 4Ψ, moments 8Ψ.
  LoRA / frozen base: base weights wΨ, no grads, no optimizer states; the adapter like a full
  finetune of T parameters. PEFT creates it in fp32, but DeepSpeed casts the whole module to the
  compute dtype, adapter included (bf16: 2T weights, 2T + 4T grads, 12T states).
  ZeRO partitions over N: stage ≥1 the optimizer states, the fp32 gradient and the 16-bit
  gradients (DeepSpeed reduces stage-1 gradients into its buckets during backward too, so the
  full 16-bit gradients never exist at once), stage 3 the weights. The fp32 gradient exists
  inside the step only, one parameter group at a time (the largest group is nearly all of T).
  ZeRO-3 keeps tensors under ``stage3_param_persistence_threshold`` (1e5 elements) whole on
  every rank, besides their partition (norm weights, small projections), and gathers one module
  at a time: the working set is the largest layer's 16-bit weights (more is prefetched within
  the prefetch bucket, counted as a buffer), and during backward that module's full 16-bit
  gradient, which never coexists with the fp32 gradient of the step: we count the larger.
  offload_optimizer=cpu moves master weights, moments and the fp32 gradients to host memory
  (ZeRO-3 its 16-bit gradient partition too); offload_param=cpu (ZeRO-3) the weight partitions.
  Partitions are padded to a multiple of N (and alignment): a few elements, not modelled.

Activations: what one micro batch saves for backward, derived for Llama/Qwen2 blocks (RMSNorm,
RoPE, SwiGLU, no dropout) from what autograd saves and checked against
``saved_tensors_hooks`` within 10% (tests/test_memplan_accuracy.py, in practice ~1%). Per token
and block, full finetune: each RMSNorm its fp32 input and its normalised input in the compute
dtype, 2·(4 + w)·h; the inputs of q/k/v and of gate/up, 2·w·h; attention (SDPA, flash or
memory-efficient) q, k, v and the output, w·d·(2a + 2kv) for head size d and kv heads, and an
fp32 logsumexp per head; eager attention instead keeps k and v repeated to a heads and the fp32
softmax output and its w-byte copy, (4 + w)·a·s; SwiGLU four s·i tensors, 4·w·i. That is
≈ 24·h + 8·i bytes in bf16 for multi-head attention, instead of Korthikanti et al.'s 34·h for
a GPT block with dropout and a 4h MLP. LoRA on a frozen base: a frozen linear keeps no input,
so RMSNorm keeps only its fp32 input (4h), SwiGLU three tensors (3·w·i), and each adapter its
dropout mask (bool on CUDA, w-byte noise on the CPU) and dropped input, (1 or w + w)·in, and
lora_A's output w·r (without dropout: the input, once per shared input); the first block's input
needs no gradient without checkpointing (the Trainer makes it require one for checkpointing):
its input norm and q/k/v masks keep nothing. With full gradient checkpointing (one checkpoint
per block, as transformers does) each block keeps only its input, w·s·b·h bytes, and one block
is recomputed during backward (its activations once). The final RMSNorm and lm_head's input
count here too. Other architectures (Bloom, T5, BERT) keep Korthikanti's 34·s·b·h + 5·a·s²·b
(eager) per block, scaled by w/2.

Logits and loss (decoder models): the lm_head output s·b·V·w, its fp32 upcast s·b·V·4 for the
loss, and cross-entropy's log-softmax s·b·V·4 (the one of the three saved for backward,
:func:`saved_logits_bytes`; the other two are transient peaks of the loss); in backward the fp32
gradient of the logits s·b·V·4.

DeepSpeed buffers (w-byte elements, as allocated by DeepSpeed 0.19): ZeRO-1/2 the gradient
reduction bucket (``reduce_bucket_size``, twice with ``overlap_comm``: double-buffered),
allocated for backward; the all-gather bucket of the updated weights after the step
(``allgather_bucket_size``); with offload_optimizer, the device copy of the rank's updated
16-bit partition and two staging buffers of the largest parameter. ZeRO-3: one reduction bucket,
allocated with the optimizer and kept throughout, and the prefetch bucket
(``stage3_prefetch_bucket_size``) of gathered parameters in forward and backward.

Framework overhead: a CUDA context with PyTorch's kernels and cuBLAS workspace
(:data:`CUDA_CONTEXT`, typically 0.5–0.8 GiB on A100/H100 with CUDA 12 lazy loading) and NCCL's
communicator buffers (:data:`NCCL_BUFFERS`, per-channel buffers of NCCL_BUFFSIZE = 4 MiB for
each ring/tree peer; a few hundred MiB on an 8-GPU node), none on the CPU accelerator.

GRPO (TRL 1.16 GRPOTrainer, generation with the policy's own ``generate``); every term below is
zero, and absent from the breakdown, unless the setup asks for it:
  reference model (``ref_model``): TRL loads a frozen copy of the model when ``beta`` > 0 and the
  policy is not a PEFT model (with LoRA the adapter-disabled policy is the reference), in the
  policy's dtype, w·Ψ; DeepSpeed prepares it for inference keeping ZeRO-3 (partitioned, w·Ψ/N;
  its persistent small tensors and the one module gathered while it scores are not counted) and
  turning stages 1-2 into 0 (whole, w·Ψ); with offload_param=cpu under ZeRO-3 its partition is on
  the host. Resident in every phase.
  generation (``generation_batch`` sequences a rank generates at once, TRL's
  per_device_train_batch_size × steps_per_generation, of ``generation_tokens`` = prompt +
  completion tokens): the KV cache 2 (K and V) × L × kv heads × head size × tokens × batch × w;
  under ZeRO-3 TRL gathers the whole policy for ``generate`` (``ds3_gather_for_generation``),
  w·Ψ on every rank besides its partition; the logits of one decoding step, batch × V × (w + 4 +
  4 + 4) (the last position only, its fp32 copy, the processed logits and the sampling
  probabilities); and the prefill's transient tensors of one block, batch × tokens × (4·h + 3·i)
  × w (an upper bound: the prefill covers the prompt only). Gradients as in forward/loss.
  fused log-probs (``fused_logprobs``): the loss pass over prompt + completion with the training
  micro batch never materialises the logits: TRL's chunked head keeps one tile of
  min(b·s, 4096) × min(V, 32768) elements in w and a few fp32 statistics per token (8·4 bytes:
  log-prob, entropy, the online log-sum-exp state, the old/reference log-probs, advantages); in
  backward the tile again, the fp32 gradient accumulator of lm_head (V·h·4) and of its input
  (b·s·h·4). The activations are those of a training micro batch over prompt + completion.

Phases: the peak is the largest of
  generation    (GRPO only) weights (whole under ZeRO-3) + optimizer states + reference model +
                KV cache + prefill activations + decoding logits
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
allocations, data loader). With a reference model, its offloaded partition counts in training and
its weights are loaded too (both copies exist on the host before DeepSpeed moves them).
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
DEFAULT_PERSISTENCE_THRESHOLD = 100_000    # DeepSpeed's stage3_param_persistence_threshold default

COMPONENTS = ("weights", "gradients", "optimizer states", "activations", "logits/loss",
              "DeepSpeed buffers", "framework overhead")
EXTRA_COMPONENTS = ("reference model", "KV cache")
"""GRPO's components: "reference model" is in a breakdown only with a reference model, "KV cache" only
with a generation phase."""
ALL_COMPONENTS = COMPONENTS + EXTRA_COMPONENTS
FUSED_TOKEN_CHUNK = 4096                   # TRL 1.16 kernels/chunked_logprob.py TOKEN_CHUNK_SIZE
FUSED_VOCAB_CHUNK = 32768                  # TRL 1.16 trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE
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
    lora_dropout: float = 0.05             # PEFT's dropout before each adapter (finetune's default)
    attention: str = "sdpa"                # sdpa (flash / memory-efficient) or eager
    grad_accum: int = 1
    reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET
    allgather_bucket_size: int = DEFAULT_ALLGATHER_BUCKET
    prefetch_bucket_size: int = DEFAULT_PREFETCH_BUCKET
    persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD   # ZeRO-3: smaller tensors stay whole
    overlap_comm: bool = True
    accelerator: str = "cuda"              # cpu: no CUDA context / NCCL
    # GRPO (see the module docstring); the defaults leave every other plan unchanged
    ref_model: bool = False                # a frozen reference copy of the model (beta > 0, not LoRA)
    generation_batch: int = 0              # sequences one rank generates at once (0: no generation phase)
    generation_tokens: int = 0             # prompt + completion tokens of each generated sequence
    fused_logprobs: bool = False           # per-token log-probs by TRL's chunked head (no full logits)

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
    lora = t.lora_r is not None
    T = t.trainable
    frozen = psi if lora else 0
    # bytes per trainable parameter: weights, gradients as reduced, the fp32 gradient the
    # optimizer steps on, fp32 master + Adam's two moments
    if stage == 0 and w == 4:
        g32, opt = 0, 8                  # a plain fp32 optimizer: no copies
    else:
        # mixed precision, and fp32 under ZeRO too: the ZeRO optimizer always keeps its own fp32
        # partition (a clone even when the model is fp32) and converts the flattened gradient
        # partition into a separate fp32 tensor to step on
        g32, opt = 4, 12
    opt_div = N if stage >= 1 else 1
    grad_div = N if stage >= 1 else 1   # stage 1 reduces into buckets during backward as stage 2 does
    param_div = N if stage == 3 else 1

    weights = (frozen + T) * w / param_div
    grads16 = T * w / grad_div
    grads32 = T * g32 / opt_div
    master = T * (4 if opt == 12 else 0) / opt_div
    adam = T * 8 / opt_div
    persistent = gathered = grads_gathered = 0.0
    if stage == 3:
        # tensors under the persistence threshold stay whole on every rank (besides their
        # partition), and one module at a time is gathered: DeepSpeed's "largest layer"
        small = t.shape.persistent_params(t.persistence_threshold)
        if lora:
            small += sum(n * c for n, c in t.shape.lora_tensors(t.lora_r, list(t.lora_targets))
                         if n < t.persistence_threshold)
        persistent = small * w
        gathered = t.shape.largest_layer * w
        trained = t.shape.lora_tensors(t.lora_r, list(t.lora_targets)) if lora else t.shape.tensors
        grads_gathered = max([n for n, _ in trained] + [0]) * w
    gpu_w = weights + persistent + gathered
    # the fp32 gradient exists only inside the step, the gathered full-size gradient only in
    # backward: ZeRO-3 needs the larger of the two, not both
    gpu_g = grads16 + (max(grads32, grads_gathered) if stage == 3 else grads32)
    gpu_o = master + adam
    host_w = host_g = host_o = 0.0
    if t.offload_optimizer == "cpu" and stage >= 1:
        # ZeRO-Offload: master weights, moments and the fp32 gradients live on the host; ZeRO-1/2
        # reduce straight from the bucket into them, ZeRO-3 keeps its 16-bit gradient
        # partition on the host as well. The device keeps the buckets (buffers) and, under
        # ZeRO-3, the gathered gradient of one module during backward.
        host_o, gpu_o = master + adam, 0.0
        host_g = grads32 + (grads16 if stage == 3 else 0)
        gpu_g = grads_gathered
    if t.offload_param == "cpu" and stage == 3:
        host_w = weights
        gpu_w -= weights
    bd = {"weights": weights, "persistent": persistent, "gathered": gathered, "grads16": grads16,
          "grads32": grads32, "grads_gathered": grads_gathered, "master": master, "adam": adam}
    return ModelStates(int(gpu_w), int(gpu_g), int(gpu_o), int(host_w), int(host_g), int(host_o),
                       {k: int(v) for k, v in bd.items()})


def _llama_block_per_token(t: TrainSetup) -> float:
    """Bytes one Llama/Qwen2 block saves for backward per token (derived from what autograd saves;
    see the module docstring and tests/test_memplan_accuracy.py)."""
    sh, w, s = t.shape, _w(t.precision), t.seq_len
    h, a, kv, hd, i = sh.hidden, sh.heads, sh.kv_heads, sh.head_dim, sh.intermediate
    if t.attention == "eager":
        # q, k and v repeated to all heads, the output; fp32 softmax output and its cast to w
        attn = w * hd * 4 * a + (4 + (w if w != 4 else 0)) * a * s
    else:
        attn = w * hd * (2 * a + 2 * kv) + 4 * a          # q, k, v, output; fp32 logsumexp
    rsqrt = 2 * 4
    if t.lora_r is None:
        # 2 RMSNorms: fp32 input + normalised input in w; the inputs of q/k/v and of gate/up;
        # SwiGLU: gate output, SiLU output, up output, their product (down's input)
        return 2 * (4 + w) * h + 2 * w * h + attn + 4 * w * i + rsqrt
    # frozen base: a frozen linear keeps no input; RMSNorm keeps only its fp32 input, SwiGLU
    # three of its four tensors (down's input only if down is adapted, below)
    r = t.lora_r
    targets = list(t.lora_targets)
    ins = {name: i_ for name, i_, _, _ in sh.linears if name != "lm_head"}
    adapted = [n for n in ins if any(_target(n, x) for x in targets)]
    mask = 1 if t.accelerator == "cuda" else w     # dropout mask: bool on CUDA, w-byte noise on CPU
    if t.lora_dropout > 0:
        lora = sum((mask + w) * ins[n] for n in adapted)   # mask and dropped input, per adapter
    else:                                                  # the shared input, once per group
        groups = {"qkv" if n in ("q_proj", "k_proj", "v_proj") else "gu" if n in ("gate_proj", "up_proj") else n
                  for n in adapted}
        lora = sum(w * (h if g in ("qkv", "gu") else ins[g]) for g in groups)
    lora += w * r * len(adapted)                           # lora_A's output
    return 2 * 4 * h + attn + 3 * w * i + lora + rsqrt


def _target(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def activation_bytes(t: TrainSetup) -> int:
    """What one micro batch saves for backward in the blocks and the final norm / lm_head input
    (the saved log-softmax of the loss is part of "logits/loss"); see the module docstring."""
    s, b, h, a, L = t.seq_len, t.micro_batch, t.shape.hidden, t.shape.heads, t.shape.layers
    w = _w(t.precision)
    if t.shape.arch in ("llama", "qwen2"):
        per_layer = s * b * _llama_block_per_token(t)
        # final RMSNorm (fp32 input, + its w-byte output and lm_head's input when trained)
        head = s * b * h * (4 + (2 * w if t.lora_r is None else 0))
    else:
        # Korthikanti et al.'s GPT block (4h MLP, dropout), for 16-bit activations
        per_layer = (s * b * h * 34 + (5 * a * s * s * b if t.attention == "eager" else 0)) * w / 2
        head = 0
    if t.gradient_checkpointing:
        # every block keeps its input; during backward one block is recomputed at a time
        total = L * w * s * b * h + per_layer
    else:
        total = L * per_layer - s * b * _first_block_savings(t)
    return int(total + head)


def _first_block_savings(t: TrainSetup) -> float:
    """LoRA without checkpointing: the first block's input does not require grad (the embedding
    is frozen; the HF Trainer makes it require grad only for checkpointing), so its input
    RMSNorm keeps nothing, nor do the dropout masks of the adapters on q/k/v; and without any
    adapter on q/k/v, nothing in its attention needs a gradient."""
    if t.lora_r is None or t.shape.arch not in ("llama", "qwen2"):
        return 0.0
    sh, w = t.shape, _w(t.precision)
    qkv = [n for n in ("q_proj", "k_proj", "v_proj") if any(_target(n, x) for x in t.lora_targets)]
    mask = (1 if t.accelerator == "cuda" else w) if t.lora_dropout > 0 else 0
    saved = 4 * sh.hidden + mask * sh.hidden * len(qkv)
    if not qkv:
        saved += w * sh.head_dim * (2 * sh.heads + 2 * sh.kv_heads) + 4 * sh.heads
    return saved


def saved_logits_bytes(t: TrainSetup) -> int:
    """The fp32 log-softmax cross-entropy keeps for backward (part of "logits/loss" forward)."""
    return t.seq_len * t.micro_batch * t.shape.vocab * 4 if t.shape.decoder else 0


def logits_bytes(t: TrainSetup) -> tuple[int, int]:
    """(forward/loss, backward) bytes of the logits: lm_head output, fp32 copy, log-softmax."""
    if not t.shape.decoder:
        return 0, 0
    if t.fused_logprobs:
        return fused_logprobs_bytes(t)
    sbv = t.seq_len * t.micro_batch * t.shape.vocab
    w = _w(t.precision)
    fwd = sbv * w + (sbv * 4 if w != 4 else 0) + sbv * 4
    return fwd, sbv * 4


def buffer_bytes(t: TrainSetup) -> tuple[int, int, int]:
    """(forward, backward, step) DeepSpeed buffer bytes (elements of the compute dtype)."""
    w = _w(t.precision)
    if t.zero_stage == 3:
        # one reduction bucket, allocated with the optimizer and kept; the prefetch bucket
        reduce = t.reduce_bucket_size * w
        prefetch = t.prefetch_bucket_size * w
        return reduce + prefetch, reduce + prefetch, reduce
    reduce = t.reduce_bucket_size * w * (2 if t.overlap_comm else 1)
    allgather = t.allgather_bucket_size * w if t.zero_stage in (1, 2) else 0
    staging = 0
    if t.offload_optimizer == "cpu" and t.zero_stage in (1, 2):
        # the device copy of this rank's updated 16-bit partition, and two staging buffers of
        # the largest parameter for gradients on their way to the host
        staging = int(t.trainable * w / max(1, t.world_size)) + 2 * t.shape.largest_layer * w
    return staging, reduce + staging, allgather + staging


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
    if not (t.ref_model or t.generation_batch > 0):
        return phases_c
    ref_gpu, _ = reference_model_bytes(t)
    extra = {**({"reference model": ref_gpu} if t.ref_model else {}),
             **({"KV cache": 0} if t.generation_batch > 0 else {})}
    for comps in phases_c.values():
        comps.update(extra)
    if t.generation_batch <= 0:
        return phases_c
    w = _w(t.precision)
    gathered = (t.total * w - ms.breakdown["gathered"]) if t.zero_stage == 3 else 0
    gen = dict(zip(COMPONENTS, (ms.gpu_weights + gathered, grads_fwd, ms.gpu_optimizer,
                                generation_activation_bytes(t), generation_logits_bytes(t), 0, over)))
    gen.update({**extra, "KV cache": kv_cache_bytes(t)})
    return {"generation": gen, **phases_c}


def reference_model_bytes(t: TrainSetup) -> tuple[int, int]:
    """(GPU, host) bytes of one rank's reference model (GRPO with beta > 0, not LoRA)."""
    if not t.ref_model:
        return 0, 0
    n = t.shape.total * _w(t.precision)
    if t.zero_stage == 3:
        part = n // max(1, t.world_size)
        return (0, part) if t.offload_param == "cpu" else (part, 0)
    return n, 0


def kv_cache_bytes(t: TrainSetup) -> int:
    """The KV cache of one rank's generation batch: 2 × L × kv heads × head size × tokens × batch × w."""
    sh = t.shape
    return 2 * sh.layers * sh.kv_heads * sh.head_dim * t.generation_tokens * t.generation_batch * _w(t.precision)


def generation_logits_bytes(t: TrainSetup) -> int:
    """One decoding step's logits: the last position (w), its fp32 copy, processed logits, probabilities."""
    if not t.shape.decoder:
        return 0
    return t.generation_batch * t.shape.vocab * (_w(t.precision) + 12)


def generation_activation_bytes(t: TrainSetup) -> int:
    """The prefill's transient tensors of one block (upper bound over prompt + completion tokens)."""
    sh = t.shape
    return t.generation_batch * t.generation_tokens * (4 * sh.hidden + 3 * sh.intermediate) * _w(t.precision)


def fused_logprobs_bytes(t: TrainSetup) -> tuple[int, int]:
    """(forward/loss, backward) bytes of TRL's chunked log-prob head over b·s tokens."""
    n = t.seq_len * t.micro_batch
    tile = min(n, FUSED_TOKEN_CHUNK) * min(t.shape.vocab, FUSED_VOCAB_CHUNK) * _w(t.precision)
    return tile + n * 4 * 8, tile + t.shape.vocab * t.shape.hidden * 4 + n * t.shape.hidden * 4


def plan_memory(t: TrainSetup) -> MemoryPlan:
    ms = model_states(t)
    phases_c = phase_components(t)
    phases = {k: sum(v.values()) for k, v in phases_c.items()}
    peak = max(phases, key=lambda k: phases[k])

    G = max(1, t.ranks_per_node)
    w = _w(t.precision)
    _, ref_host = reference_model_bytes(t)
    ref_load = t.shape.total * w if t.ref_model else 0
    train_host = dict(zip(HOST_COMPONENTS, (G * (ms.host_weights + ref_host), G * ms.host_grads,
                                            G * ms.host_optimizer, 0, G * HOST_PER_RANK)))
    load_host = dict(zip(HOST_COMPONENTS, (0, 0, 0, G * (t.shape.total * w + ref_load), G * HOST_PER_RANK)))
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
