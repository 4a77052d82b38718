"""The memory planner for the `pretrain` and `grpo` kinds (StageKind.memory), without Slurm.

Pretrain: the model comes from the stage's size settings (exact count, checked against transformers
on the meta device); GRPO: the policy's training setup plus TRL's reference model (beta > 0) and the
KV cache of the generation batch, each term checked by hand.
"""

from __future__ import annotations

import json

import pytest

from hpcjobs import config, plan, stages
from hpcjobs.memplan import report
from hpcjobs.memplan.estimate import GiB, MiB, TrainSetup, phase_components, plan_memory
from hpcjobs.memplan.params import model_shape

# Qwen2-0.5B(-Instruct)'s published config.json: 24 layers, 14 heads, 2 KV heads, head size 896/14 = 64
QWEN2_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
             "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
             "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 151936,
             "max_position_embeddings": 32768, "rope_theta": 1000000.0, "torch_dtype": "bfloat16"}
QWEN2_05B_PARAMS = 494_032_768
# Llama-2-7B's HF config.json
LLAMA2_7B_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
                "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
LLAMA2_7B_PARAMS = 6_738_415_616


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Model directories (config.json only), a prompts parquet and an empty pretraining corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("memkinds")
    models = {}
    for name, cfg in (("qwen2-0.5b", QWEN2_05B), ("llama-2-7b-hf", LLAMA2_7B_HF)):
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(cfg))
        models[name] = d / name
    prompts = d / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"Summarise post {i}:" for i in range(16)]}), prompts)
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(16)))
    return models, prompts, corpus


def _build(recipe, profile, *overrides, nodes=1):
    c = config.compose(recipe, profile, overrides=list(overrides), cli={"run.nodes": nodes},
                       cli_text=[f"--nodes {nodes}"])
    return plan.build(c, chain_id="memkinds")


def _stage(recipe, profile, *overrides, nodes=1) -> report.StageMemory:
    (sm,) = report.plan_chain(_build(recipe, profile, *overrides, nodes=nodes))
    return sm


# ---------------------------------------------------------------- pretrain

@pytest.mark.train
@pytest.mark.parametrize("settings", [
    dict(dim=1024, n_layers=4, n_heads=16, n_kv_heads=8, vocab_size=6400, max_seq_len=1024, tie_embeddings=True),
    dict(dim=512, n_layers=3, n_heads=8, n_kv_heads=None, vocab_size=32000, max_seq_len=256, tie_embeddings=False,
         intermediate_size=1000),
])
def test_pretrain_parameter_count_equals_transformers(settings):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    stages.names()   # register every kind first: importing one kind's module alone registers only it
    from hpcjobs.stages.pretrain import PretrainStage, model_config

    s = PretrainStage(**settings)
    cfg = model_config(s)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    expected = sum(p.numel() for p in model.parameters())
    assert model_shape({"model_type": "llama", **cfg}).total == expected


def _pretrain_args(corpus, *more):
    return ["plan", "llm-pretrain", "--profile", "a800", "--nodes", "2", f"data.path={corpus}", *more]


def test_plan_llm_pretrain_prints_a_breakdown(hpcjobs, inputs):
    _, _, corpus = inputs
    out = hpcjobs(*_pretrain_args(corpus)).stdout
    assert "no training stage" not in out
    # the recipe's model: dim 1024, 32 layers, 16 heads, 8 KV heads, vocabulary 6400, tied
    h, L, kv, i, V = 1024, 32, 8 * 64, 64 * ((int(1024 * 8 / 3) + 63) // 64), 6400
    psi = V * h + L * (h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h) + h
    assert f"pretrain: llama, {psi:,} parameters" in out and "(full training from scratch)" in out
    assert "world size 16 (8 per node), micro batch 24, sequence 1024, bf16, ZeRO-2" in out
    for c in ("weights", "gradients", "optimizer states", "activations", "logits/loss", "DeepSpeed buffers",
              "framework overhead"):
        assert c in out
    assert "reference model" not in out and "KV cache" not in out
    assert "of 80.00 GiB: fits, headroom" in out


def test_pretrain_fits_and_does_not_fit_as_computed_by_hand(hpcjobs, inputs):
    _, _, corpus = inputs
    j = hpcjobs.json(*_pretrain_args(corpus))
    (st,) = j["stages"]
    psi, N = st["params"], 16
    gpu = st["gpu"]["components"]
    # ZeRO-2 over 16 ranks: 16-bit weights whole, 16-bit + fp32 gradients and 12 bytes of states partitioned
    assert gpu["weights"] == 2 * psi
    assert gpu["gradients"] == int(2 * psi / N) + int(4 * psi / N)
    assert gpu["optimizer states"] == int(12 * psi / N)
    assert st["setup"]["gradient_checkpointing"] is False and st["setup"]["lora_r"] is None
    # activations per token and block (bf16, SDPA, full training): norms 2*(4+2)*h, q/k/v and gate/up
    # inputs 2*2*h, q, k, v, output 2*64*(2*16 + 2*8) + logsumexp 4*16, SwiGLU 4*2*i, rsqrt 8
    h, i = 1024, 2752
    per_token_block = 12 * h + 4 * h + 128 * 48 + 64 + 8 * i + 8
    acts = 32 * 24 * 1024 * per_token_block + 24 * 1024 * h * 8
    assert gpu["activations"] == acts
    assert st["gpu"]["fits"] is True          # ~33 GiB of activations + ~3 GiB on an 80 GiB GPU
    # micro batch 64: the activations alone exceed 80 GiB
    assert 32 * 64 * 1024 * per_token_block > 80 * GiB
    (big,) = hpcjobs.json(*_pretrain_args(corpus, "pretrain.micro_batch_size=64"))["stages"]
    assert big["setup"]["micro_batch"] == 64 and big["gpu"]["fits"] is False


def test_pretrain_plan_follows_the_deepspeed_preset(inputs):
    _, _, corpus = inputs
    sm = _stage_pretrain(corpus, "pretrain.deepspeed=zero3")
    t = sm.plan.setup
    assert t.zero_stage == 3 and t.world_size == 16
    assert sm.fixed == ("gradient_checkpointing", "zero_stage", "offload_optimizer")


def _stage_pretrain(corpus, *overrides) -> report.StageMemory:
    sms = report.plan_chain(_build("llm-pretrain", "a800", f"data.path={corpus}", *overrides, nodes=2))
    (sm,) = [s for s in sms if s.stage == "pretrain"]
    return sm


# ---------------------------------------------------------------- grpo

def _grpo(inputs, profile="a800", *overrides, nodes=2, model="qwen2-0.5b") -> report.StageMemory:
    models, prompts, _ = inputs
    return _stage("qwen2-grpo", profile, f"model.source={models[model]}", f"data.path={prompts}", *overrides,
                  nodes=nodes)


def test_grpo_reference_model_is_w_psi_partitioned_under_zero3(inputs):
    w = 2   # bf16 on a800
    sm = _grpo(inputs, "a800", "grpo.beta=0.04")                      # the recipe's ZeRO-3, 16 ranks
    assert sm.shape.total == QWEN2_05B_PARAMS and sm.plan.setup.ref_model
    for comps in phase_components(sm.plan.setup).values():
        assert comps["reference model"] == w * QWEN2_05B_PARAMS // 16
    sm = _grpo(inputs, "a800", "grpo.beta=0.04", "grpo.zero_stage=2")   # TRL's prepare_deepspeed: stage 0
    for comps in phase_components(sm.plan.setup).values():
        assert comps["reference model"] == w * QWEN2_05B_PARAMS
    # the reference model's weights are loaded on the host too
    assert sm.plan.host["loaded checkpoint"] == 8 * 2 * w * QWEN2_05B_PARAMS


def test_grpo_without_beta_has_no_reference_model(hpcjobs, inputs):
    sm = _grpo(inputs)                                               # beta 0: TRL loads none
    assert not sm.plan.setup.ref_model
    assert all("reference model" not in c for c in phase_components(sm.plan.setup).values())
    models, prompts, _ = inputs
    out = hpcjobs("plan", "qwen2-grpo", "--profile", "a800", "--nodes", "2", f"model.source={models['qwen2-0.5b']}",
                  f"data.path={prompts}").stdout
    assert "reference model none (beta 0)" in out
    assert not any(line.startswith("reference model") for line in out.splitlines())
    assert any(line.startswith("KV cache") for line in out.splitlines())


def test_lora_setup_has_no_reference_model():
    """TRL uses the adapter-disabled policy as the reference with PEFT: no copy (the grpo kind trains no
    adapter; a LoRA setup asks for none)."""
    t = TrainSetup(shape=model_shape(QWEN2_05B), lora_r=8, lora_targets=["q_proj", "v_proj"], generation_batch=8,
                   generation_tokens=768, fused_logprobs=True)
    comps = phase_components(t)
    assert all("reference model" not in c for c in comps.values())
    assert comps["generation"]["KV cache"] > 0


def test_grpo_kv_cache_is_the_formula(inputs):
    sm = _grpo(inputs, "a800", "grpo.max_completion_length=256", "grpo.memory_prompt_length=512")
    t = sm.plan.setup
    # the recipe: micro batch 4 × steps_per_generation 2 (= grad_accum) sequences per rank at once
    assert t.generation_batch == 8 and t.generation_tokens == 768 and t.seq_len == 768
    kv = 2 * 24 * 2 * 64 * 768 * 8 * 2          # K and V × layers × kv heads × head size × tokens × batch × bf16
    assert kv == 75_497_472
    comps = phase_components(t)
    assert comps["generation"]["KV cache"] == kv
    assert all(c["KV cache"] == 0 for ph, c in comps.items() if ph != "generation")
    assert list(sm.plan.phases) == ["generation", "forward/loss", "backward", "step"]
    # ZeRO-3: generate runs on the gathered policy, 2Ψ on every rank
    assert comps["generation"]["weights"] >= 2 * QWEN2_05B_PARAMS
    # decoding logits: one position × 151,936 × (2 + 4 + 4 + 4) bytes × 8 sequences
    assert comps["generation"]["logits/loss"] == 8 * 151936 * 14
    # the loss pass never materialises the logits (TRL's fused head): far below b·s·V·4
    assert comps["forward/loss"]["logits/loss"] < 4 * 768 * 151936 * 4 / 4


def test_the_seed_grpo_settings_fit_an_a800(inputs):
    sm = _grpo(inputs, "a800", nodes=2)
    assert sm.gpu_fits is True and sm.host_fits is True and not sm.refused
    assert sm.plan.gpu_peak < 16 * GiB
    sm = _grpo(inputs, "a800", "grpo.beta=0.04", nodes=1)
    assert sm.gpu_fits is True


def test_grpo_json_has_the_generation_setup(hpcjobs, inputs):
    models, prompts, _ = inputs
    j = hpcjobs.json("plan", "qwen2-grpo", "--profile", "a800", "--nodes", "2",
                     f"model.source={models['qwen2-0.5b']}", f"data.path={prompts}", "grpo.beta=0.1")
    (st,) = j["stages"]
    assert st["setup"]["ref_model"] is True and st["setup"]["generation_batch"] == 8
    assert st["gpu"]["phases"].keys() >= {"generation", "forward/loss", "backward", "step"}
    assert st["gpu"]["peak"] == sum(st["gpu"]["components"].values())


def test_a_7b_full_grpo_at_zero0_is_refused_by_submit(hpcjobs, inputs, hpcjobs_home):
    """Nothing reaches Slurm: submit refuses before it builds its Slurm client (a100 has no cluster here)."""
    models, prompts, _ = inputs
    sm = _grpo(inputs, "a100", "grpo.zero_stage=0", nodes=1, model="llama-2-7b-hf")
    assert sm.shape.total == LLAMA2_7B_PARAMS and sm.refused
    # ZeRO-0, mixed precision: 2 + (2 + 4) + 12 bytes a parameter, far over 40 GiB
    assert sm.plan.gpu_peak > 20 * LLAMA2_7B_PARAMS
    proc = hpcjobs("submit", "qwen2-grpo", "--profile", "a100", "--name", "memgrpo",
                   f"model.source={models['llama-2-7b-hf']}", f"data.path={prompts}", "grpo.zero_stage=0",
                   check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "error: stage grpo is predicted not to fit: GPU peak" in err and "> 40.00 GiB" in err
    assert "KV cache" in err and "generation" in err
    assert "grpo.offload_optimizer" not in err          # the kind has no such setting
    assert "nothing was submitted" in err
    assert not (hpcjobs_home / "runs").exists() or not list((hpcjobs_home / "runs").glob("memgrpo-*"))


def test_a_cpu_profile_shows_but_does_not_enforce(inputs):
    sm = _grpo(inputs, "local", "grpo.precision=fp32", nodes=2)
    assert sm.gpu_mem == 2 * 1024 * MiB and not sm.enforced and not sm.refused
    assert any("not enforced" in n for n in sm.notes)


def test_defaults_leave_finetune_plans_unchanged():
    t = TrainSetup(shape=model_shape(QWEN2_05B), lora_r=8, lora_targets=["q_proj", "v_proj"])
    p = plan_memory(t)
    assert list(p.phases) == ["forward/loss", "backward", "step"]
    assert all(set(c) == {"weights", "gradients", "optimizer states", "activations", "logits/loss",
                          "DeepSpeed buffers", "framework overhead"} for c in phase_components(t).values())


def test_planning_these_kinds_imports_nothing_heavy(inputs):
    import subprocess
    import sys

    models, prompts, corpus = inputs
    for argv in (["plan", "qwen2-grpo", "--profile", "a800", f"model.source={models['qwen2-0.5b']}",
                  f"data.path={prompts}", "grpo.beta=0.1"],
                 ["plan", "llm-pretrain", "--profile", "a800", f"data.path={corpus}"]):
        code = ("import sys\nfrom hpcjobs.cli import main\n"
                f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                "bad = [m for m in ('torch', 'transformers', 'deepspeed', 'peft', 'trl') if m in sys.modules]\n"
                "assert not bad, bad\n")
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
