"""Locally made demo assets: a tiny Meta-format Llama-2 checkpoint and a dialogue data set.

Nothing here downloads anything. Everything is deterministic for a given seed.

    python -m hpcjobs.train.demo_assets OUTDIR [--seed N] [--shards 1|2] [--n-kv-heads K] [--rows N]

writes::

    OUTDIR/llama-2-tiny/        Meta layout: consolidated.00.pth [consolidated.01.pth], params.json,
                                tokenizer.model (sentencepiece BPE, byte fallback, trained here)
    OUTDIR/dialogues.parquet    columns Description, Patient, Doctor (all strings), one dialogue a row
    OUTDIR/prompts.txt          test prompts, ONE PROMPT PER LINE, each exactly
                                ``Description: <text> Patient: <text> Doctor:``
                                (the model is meant to continue after ``Doctor:``). No field contains a
                                newline, so splitting the file on newlines gives the prompts; empty
                                lines are not written.

The training text format that matches the prompts is :func:`format_example`:
``Description: {Description} Patient: {Patient} Doctor: {Doctor}``.

The checkpoint has random weights (it is for exercising convert → finetune → merge → evaluate,
not for sensible answers). ``make_meta_checkpoint`` is the lower-level builder used by tests.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

PROMPT_TEMPLATE = "Description: {description} Patient: {patient} Doctor:"
EXAMPLE_TEMPLATE = "Description: {description} Patient: {patient} Doctor: {doctor}"
COLUMNS = ("Description", "Patient", "Doctor")
DEFAULT_ROWS = 300
DEFAULT_TOKENIZER_VOCAB = 512


def format_prompt(description: str, patient: str) -> str:
    """One prompt in the format used by prompts.txt (ends with ``Doctor:``)."""
    return PROMPT_TEMPLATE.format(description=description, patient=patient)


def format_example(row: dict) -> str:
    """One training text: the prompt followed by a space and the doctor's answer."""
    return EXAMPLE_TEMPLATE.format(
        description=row["Description"], patient=row["Patient"], doctor=row["Doctor"]
    )


# --------------------------------------------------------------------------------------
# Synthetic patient–doctor dialogues
# --------------------------------------------------------------------------------------

# Each condition: symptoms a patient mentions, questions for the Description, the likely
# cause the doctor names, tests and advice. The doctor's answer is a template over these,
# so a model can learn the mapping symptom → condition → advice (a finetune's loss falls).
_CONDITIONS: list[dict] = [
    {
        "name": "a viral upper respiratory infection",
        "symptoms": ["a sore throat", "a runny nose", "a mild fever", "sneezing", "a blocked nose"],
        "ask": ["What should I do about a sore throat and runny nose?", "Is a cold with fever serious?"],
        "tests": ["no tests are needed at this stage", "a throat swab if it does not settle"],
        "advice": ["drink plenty of warm fluids", "rest for a few days", "take paracetamol for the fever",
                   "gargle with warm salt water"],
    },
    {
        "name": "acid reflux (gastritis)",
        "symptoms": ["a burning pain in the upper stomach", "sour burps", "heartburn after meals",
                     "bloating", "nausea in the morning"],
        "ask": ["Why do I get burning pain after eating?", "What causes heartburn every night?"],
        "tests": ["an upper GI endoscopy if it persists", "a stool test for H. pylori"],
        "advice": ["avoid spicy and oily food", "eat smaller meals", "do not lie down right after eating",
                   "take an antacid before meals"],
    },
    {
        "name": "a tension-type headache",
        "symptoms": ["a headache like a tight band", "pain in the forehead", "neck stiffness",
                     "headache after long screen time", "trouble sleeping"],
        "ask": ["What causes a daily band-like headache?", "Why does my head hurt after work?"],
        "tests": ["an eye check-up", "a blood pressure check"],
        "advice": ["take regular breaks from the screen", "sleep at fixed hours", "do neck stretching exercises",
                   "drink enough water"],
    },
    {
        "name": "a urinary tract infection",
        "symptoms": ["burning while passing urine", "frequent urination", "lower belly pain",
                     "cloudy urine", "a feeling of incomplete emptying"],
        "ask": ["Why does it burn when I pass urine?", "What causes frequent urination with pain?"],
        "tests": ["a urine routine and culture test", "an ultrasound of the kidneys"],
        "advice": ["drink at least three liters of water a day", "complete the antibiotic course",
                   "do not hold urine for long"],
    },
    {
        "name": "iron deficiency anemia",
        "symptoms": ["tiredness all day", "pale skin", "breathlessness on climbing stairs", "dizziness",
                     "brittle nails"],
        "ask": ["Why am I always tired and pale?", "Could weakness and dizziness be anemia?"],
        "tests": ["a complete blood count", "serum ferritin and iron studies"],
        "advice": ["eat green leafy vegetables and lentils", "take iron tablets after food",
                   "take vitamin C with meals"],
    },
    {
        "name": "allergic rhinitis",
        "symptoms": ["sneezing every morning", "itchy eyes", "a watery nose", "an itchy throat",
                     "symptoms near dust"],
        "ask": ["Why do I sneeze every morning?", "What helps a dust allergy?"],
        "tests": ["an allergy skin test", "an absolute eosinophil count"],
        "advice": ["avoid dust and pollen", "use a saline nasal spray", "take an antihistamine at night",
                   "wash the bed sheets weekly"],
    },
    {
        "name": "lower back muscle strain",
        "symptoms": ["lower back pain", "pain on bending forward", "stiffness in the morning",
                     "pain after lifting weights", "muscle spasm in the back"],
        "ask": ["What should I do for lower back pain after lifting?", "Why is my back stiff in the morning?"],
        "tests": ["an X-ray of the lower spine if pain continues", "no scan is needed now"],
        "advice": ["apply a hot pack twice a day", "avoid lifting heavy weights",
                   "start gentle back exercises", "keep a straight posture while sitting"],
    },
    {
        "name": "type 2 diabetes that is not well controlled",
        "symptoms": ["excessive thirst", "frequent urination at night", "weight loss",
                     "slow healing of cuts", "blurred vision"],
        "ask": ["Are thirst and weight loss signs of diabetes?", "My sugar is high, what should I do?"],
        "tests": ["a fasting blood sugar test", "an HbA1c test"],
        "advice": ["reduce sugar and refined flour", "walk for thirty minutes daily",
                   "take your diabetes medicine regularly", "check your sugar every week"],
    },
    {
        "name": "an anxiety disorder",
        "symptoms": ["a racing heart", "worrying all the time", "trouble sleeping", "sweaty palms",
                     "a feeling of panic"],
        "ask": ["Why does my heart race when I worry?", "Can anxiety cause chest tightness?"],
        "tests": ["an ECG to rule out heart problems", "a thyroid function test"],
        "advice": ["practice slow deep breathing", "reduce tea and coffee", "talk to a counselor",
                   "exercise regularly"],
    },
    {
        "name": "a fungal skin infection",
        "symptoms": ["an itchy red rash", "a ring-shaped patch on the skin", "itching in the groin",
                     "scaling of the skin", "itching that is worse at night"],
        "ask": ["What is this itchy ring-shaped rash?", "How do I treat itching in skin folds?"],
        "tests": ["a KOH mount of the skin scraping", "no test is needed now"],
        "advice": ["keep the area clean and dry", "apply an antifungal cream twice a day",
                   "wear loose cotton clothes", "do not share towels"],
    },
    {
        "name": "high blood pressure",
        "symptoms": ["a headache at the back of the head", "readings above 150 over 95", "dizziness",
                     "a pounding feeling in the head", "nose bleeds"],
        "ask": ["Is a blood pressure of 150 over 95 dangerous?", "What should I do about high BP?"],
        "tests": ["a kidney function test", "an ECG", "a lipid profile"],
        "advice": ["reduce salt in your diet", "walk daily", "take the BP tablet at the same time every day",
                   "check your blood pressure twice a week"],
    },
    {
        "name": "migraine",
        "symptoms": ["a throbbing headache on one side", "sensitivity to light", "nausea with headache",
                     "flashing lights before the pain", "headache that lasts for hours"],
        "ask": ["Why do I get one-sided throbbing headaches?", "Is this headache a migraine?"],
        "tests": ["no scan is needed for now", "an MRI of the brain if the pattern changes"],
        "advice": ["rest in a dark quiet room", "keep a headache diary", "avoid skipping meals",
                   "take a pain killer early in the attack"],
    },
]

_DURATIONS = ["two days", "three days", "a week", "ten days", "two weeks", "a month", "three months",
              "six months", "a year"]
_EXTRAS = ["I have no other illness.", "I am not on any medicine.", "I have thyroid problems.",
           "I had a similar problem last year.", "My father has the same problem.",
           "I work night shifts.", "I am a smoker.", "I drink alcohol sometimes.",
           "I took a pain killer but it did not help.", "I am worried about it."]
_OPENINGS = ["Hi doctor,", "Hello doctor,", "Dear doctor,", "Hi,", "Hello,"]
_DOC_OPENINGS = ["Hi. Thanks for your query.", "Hello. I have read your query.",
                 "Hi. I understand your concern.", "Hello and welcome."]
_DOC_CLOSINGS = ["Take care.", "Hope this helps. Take care.", "Follow up with the report.",
                 "Consult your doctor if it gets worse."]


def _one_dialogue(rng: random.Random) -> dict[str, str]:
    cond = rng.choice(_CONDITIONS)
    age = rng.randint(18, 75)
    sex = rng.choice(["man", "woman"])
    syms = rng.sample(cond["symptoms"], k=rng.randint(1, 3))
    duration = rng.choice(_DURATIONS)
    sym_text = syms[0] if len(syms) == 1 else ", ".join(syms[:-1]) + " and " + syms[-1]
    patient = (
        f"{rng.choice(_OPENINGS)} I am a {age}-year-old {sex}. "
        f"I have had {sym_text} for {duration}. {rng.choice(_EXTRAS)}"
    )
    advice = rng.sample(cond["advice"], k=min(2, len(cond["advice"])))
    doctor = (
        f"{rng.choice(_DOC_OPENINGS)} From your description, this looks like {cond['name']}. "
        f"I suggest {rng.choice(cond['tests'])}. Please {advice[0]} and {advice[1]}. "
        f"{rng.choice(_DOC_CLOSINGS)}"
    )
    return {"Description": "Q. " + rng.choice(cond["ask"]), "Patient": patient, "Doctor": doctor}


def make_dialogues(rows: int = DEFAULT_ROWS, seed: int = 0) -> list[dict[str, str]]:
    """``rows`` synthetic dialogues, deterministic for ``seed``."""
    rng = random.Random(f"dialogues-{seed}")
    return [_one_dialogue(rng) for _ in range(rows)]


def make_prompts(n: int = 5, seed: int = 0) -> list[str]:
    """``n`` prompts (drawn from a different stream than the data set), ending in ``Doctor:``."""
    rng = random.Random(f"prompts-{seed}")
    out = []
    for _ in range(n):
        d = _one_dialogue(rng)
        out.append(format_prompt(d["Description"], d["Patient"]))
    return out


def write_dialogues_parquet(path: str | Path, rows: Sequence[dict[str, str]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    table = pa.table({c: pa.array([r[c] for r in rows], type=pa.string()) for c in COLUMNS})
    pq.write_table(table, path)
    return path


# --------------------------------------------------------------------------------------
# Tokenizer (sentencepiece, Llama settings)
# --------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_TOKENIZER_VOCAB) -> bytes:
    """Train a sentencepiece BPE model with Llama's settings; returns the serialized model.

    unk/bos/eos = 0/1/2 (``<unk>``, ``<s>``, ``</s>``), no pad piece, byte fallback,
    digits split, identity normalization, whitespace kept as is, dummy prefix added.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        max_sentence_length=8192,
        minloglevel=2,
    )
    return buf.getvalue()


def _tokenizer_texts(rows: Sequence[dict[str, str]]) -> list[str]:
    texts = []
    for r in rows:
        texts.append(format_example(r))
        texts.extend(r[c] for c in COLUMNS)
    return texts


def default_tokenizer_model(seed: int = 0, rows: int = DEFAULT_ROWS,
                            vocab_size: int = DEFAULT_TOKENIZER_VOCAB) -> bytes:
    """The tokenizer the demo checkpoint uses: trained on ``make_dialogues(rows, seed)``."""
    return train_tokenizer(_tokenizer_texts(make_dialogues(rows, seed)), vocab_size)


# --------------------------------------------------------------------------------------
# Meta-format checkpoint
# --------------------------------------------------------------------------------------

def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """FFN hidden size as in Meta's ``FeedForward``: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def make_meta_state_dict(
    *,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int | None,
    vocab_size: int,
    hidden_dim: int,
    seed: int = 0,
    rope_theta: float = 10000.0,
):
    """Full (unsharded) Meta-layout state dict with random fp32 weights.

    Weights are scaled like a trained model (≈1/sqrt(fan_in)), norms are near but not at 1,
    so a wrong permutation or a wrong merge shows in the logits.
    """
    import torch

    n_kv = n_kv_heads or n_heads
    head_dim = dim // n_heads
    g = torch.Generator().manual_seed(int(seed))

    def lin(out_f: int, in_f: int):
        return torch.randn(out_f, in_f, generator=g) / (in_f ** 0.5)

    def norm(n: int):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {"tok_embeddings.weight": torch.randn(vocab_size, dim, generator=g)}
    for i in range(n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = lin(n_heads * head_dim, dim)
        sd[p + "attention.wk.weight"] = lin(n_kv * head_dim, dim)
        sd[p + "attention.wv.weight"] = lin(n_kv * head_dim, dim)
        sd[p + "attention.wo.weight"] = lin(dim, n_heads * head_dim)
        sd[p + "feed_forward.w1.weight"] = lin(hidden_dim, dim)
        sd[p + "feed_forward.w2.weight"] = lin(dim, hidden_dim)
        sd[p + "feed_forward.w3.weight"] = lin(hidden_dim, dim)
        sd[p + "attention_norm.weight"] = norm(dim)
        sd[p + "ffn_norm.weight"] = norm(dim)
    sd["norm.weight"] = norm(dim)
    sd["output.weight"] = lin(vocab_size, dim)
    # Meta's original checkpoints carry the rotary inverse frequencies; converters ignore them.
    sd["rope.freqs"] = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return sd


# Meta model-parallel layout: which dim each weight is split along (None = replicated).
_SPLIT_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "wq": 0, "wk": 0, "wv": 0, "wo": 1,
    "w1": 0, "w3": 0, "w2": 1,
}


def _split_dim(key: str) -> int | None:
    parts = key.split(".")
    for name in (parts[-2] if len(parts) >= 2 else "", parts[0]):
        if name in _SPLIT_DIM:
            return _SPLIT_DIM[name]
    return None


def shard_meta_state_dict(sd: dict, shards: int) -> list[dict]:
    """Split a full Meta state dict the way Meta's model-parallel checkpoints are split."""
    out: list[dict] = [{} for _ in range(shards)]
    for k, v in sd.items():
        d = _split_dim(k)
        if d is None or shards == 1:
            for s in range(shards):
                out[s][k] = v.clone()
        else:
            if v.shape[d] % shards:
                raise ValueError(f"{k}: size {v.shape[d]} along dim {d} does not split into {shards} shards")
            for s, part in enumerate(v.chunk(shards, dim=d)):
                out[s][k] = part.clone().contiguous()
    return out


def make_meta_checkpoint(
    path: str | Path,
    *,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    multiple_of: int = 32,
    ffn_dim_multiplier: float | None = None,
    norm_eps: float | None = None,
    rope_theta: float | None = None,
    tokenizer_model: bytes | str | Path | None = None,
    shards: int = 1,
    seed: int = 0,
    dtype=None,
    llama_version: int = 2,
    params_vocab_size: int | None = -1,
) -> Path:
    """Write a Meta-format Llama checkpoint directory with random weights; returns ``path``.

    ``tokenizer_model``: sentencepiece model (bytes or a file); None trains the demo tokenizer.
    The embedding has as many rows as the tokenizer has pieces. ``params_vocab_size`` is what
    params.json says (-1, as Meta ships it, means "ask the tokenizer"; None writes the true size).
    ``n_kv_heads``: GQA (written to params.json as Llama-2-70B does); must divide by ``shards``.
    ``dtype``: storage dtype of the shards (default float32; Meta ships bfloat16).
    The merged weights do not depend on ``shards``: the same seed gives the same model.
    """
    import sentencepiece as spm
    import torch

    if shards < 1:
        raise ValueError("shards must be >= 1")
    if n_heads % shards or (n_kv_heads or n_heads) % shards:
        raise ValueError(f"n_heads ({n_heads}) and n_kv_heads ({n_kv_heads}) must be divisible by shards ({shards})")
    if n_kv_heads is not None and n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    if tokenizer_model is None:
        tok_bytes = default_tokenizer_model()
    elif isinstance(tokenizer_model, (bytes, bytearray)):
        tok_bytes = bytes(tokenizer_model)
    else:
        tok_bytes = Path(tokenizer_model).read_bytes()
    (path / "tokenizer.model").write_bytes(tok_bytes)
    vocab_size = spm.SentencePieceProcessor(model_proto=tok_bytes).vocab_size()

    if norm_eps is None:
        norm_eps = 1e-6 if llama_version == 1 else 1e-5
    hidden_dim = meta_intermediate_size(dim, multiple_of, ffn_dim_multiplier)
    sd = make_meta_state_dict(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=vocab_size, hidden_dim=hidden_dim, seed=seed, rope_theta=rope_theta or 10000.0,
    )
    dtype = dtype or torch.float32
    sd = {k: v.to(dtype) for k, v in sd.items()}
    for i, part in enumerate(shard_meta_state_dict(sd, shards)):
        torch.save(part, path / f"consolidated.{i:02d}.pth")

    params: dict = {"dim": dim, "multiple_of": multiple_of}
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    params["n_heads"] = n_heads
    if n_kv_heads is not None:
        params["n_kv_heads"] = n_kv_heads
    params["n_layers"] = n_layers
    params["norm_eps"] = norm_eps
    if rope_theta is not None:
        params["rope_theta"] = rope_theta
    params["vocab_size"] = vocab_size if params_vocab_size is None else params_vocab_size
    (path / "params.json").write_text(json.dumps(params) + "\n")
    return path


# --------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------

def make_demo_assets(
    outdir: str | Path,
    seed: int = 0,
    shards: int = 1,
    n_kv_heads: int | None = None,
    rows: int = DEFAULT_ROWS,
) -> dict[str, Path]:
    """Write the demo checkpoint, data set and prompts under ``outdir``.

    Returns ``{"checkpoint": OUTDIR/llama-2-tiny, "dataset": OUTDIR/dialogues.parquet,
    "prompts": OUTDIR/prompts.txt, "tokenizer": OUTDIR/llama-2-tiny/tokenizer.model}``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    dialogues = make_dialogues(rows, seed)
    prompts = make_prompts(5, seed)
    tok = train_tokenizer(_tokenizer_texts(dialogues) + prompts)
    ckpt = make_meta_checkpoint(
        outdir / "llama-2-tiny",
        dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, multiple_of=32,
        tokenizer_model=tok, shards=shards, seed=seed, llama_version=2,
    )
    dataset = write_dialogues_parquet(outdir / "dialogues.parquet", dialogues)
    prompts_path = outdir / "prompts.txt"
    prompts_path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return {
        "checkpoint": ckpt,
        "dataset": dataset,
        "prompts": prompts_path,
        "tokenizer": ckpt / "tokenizer.model",
    }


# --------------------------------------------------------------------------------------
# sft-lora: a tiny Bloom with a byte-level BPE tokenizer, prompt/response JSON lines
# --------------------------------------------------------------------------------------

# Short instructions whose answers follow from the prompt (a copy, a lookup, a sum), so a
# few dozen LoRA steps lower the response loss clearly.
_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
             ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana")]
_OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
              ("happy", "sad"), ("old", "new"), ("early", "late"), ("open", "closed"), ("full", "empty")]
_ANIMALS = ["cat", "dog", "bird", "horse", "fish", "cow", "goat", "duck", "frog", "lion"]
SFT_COLUMNS = ("input", "target")


def _one_instruction(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        country, city = rng.choice(_CAPITALS)
        return {"input": f"What is the capital of {country}?", "target": f"The capital of {country} is {city}."}
    if kind == 1:
        word, opp = rng.choice(_OPPOSITES)
        return {"input": f"Give the opposite of the word {word}.", "target": f"The opposite of {word} is {opp}."}
    if kind == 2:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return {"input": f"Add {a} and {b}.", "target": f"{a} plus {b} is {a + b}."}
    words = rng.sample(_ANIMALS, 3)
    return {"input": f"Repeat the animals: {' '.join(words)}", "target": f"Animals: {', '.join(words)}."}


def make_instructions(rows: int = DEFAULT_ROWS, seed: int = 0) -> list[dict[str, str]]:
    """``rows`` synthetic prompt/response pairs (columns ``input``, ``target``, as BELLE's data)."""
    rng = random.Random(f"instructions-{seed}")
    return [_one_instruction(rng) for _ in range(rows)]


def train_bpe_tokenizer(texts: Sequence[str], out_dir: str | Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer (Bloom's kind) trained on ``texts``, saved in HF layout.

    <unk>=0, <s>=1, </s>=2, <pad>=3; no BOS/EOS added on encoding (Bloom adds none).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", padding_side="right", model_max_length=2048,
                                 clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


def make_tiny_bloom(out_dir: str | Path, texts: Sequence[str], *, seed: int = 0, hidden: int = 64,
                    layers: int = 2, heads: int = 4, init_range: float = 0.2) -> Path:
    """A random tiny BloomForCausalLM (safetensors) with its tokenizer, in ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM, GenerationConfig

    out = Path(out_dir)
    train_bpe_tokenizer(texts, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    config = BloomConfig(vocab_size=len(tok), hidden_size=hidden, n_layer=layers, n_head=heads,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                         initializer_range=init_range)
    torch.manual_seed(seed)
    model = BloomForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


SFT_DEMO_YAML = """\
# Inputs made by `hpcjobs demo-assets --recipe sft-lora`; small settings for CPU training.
model:
  source: {model}
data:
  path: {dataset}
evaluate:
  max_new_tokens: 16
finetune:
  max_seq_length: 64
  micro_batch_size: 8
  max_steps: 30
  warmup_steps: 3
  lr: 1.0e-2
  logging_steps: 2
  save_steps: 15
  gradient_checkpointing: false
"""


SFT_ARCHS = ("bloom", "qwen2")


def make_sft_demo_assets(outdir: str | Path, seed: int = 0, rows: int = DEFAULT_ROWS,
                         arch: str = "bloom") -> dict[str, Path]:
    """A tiny Bloom (``bloom-tiny/``) or Qwen2 (``qwen2-tiny/``; it can pack, Bloom cannot),
    ``instructions.jsonl`` (input/target) and ``demo.yaml``.

    No prompts file: evaluate takes its prompts (and references) from the prepared test split."""
    if arch not in SFT_ARCHS:
        raise ValueError(f"no tiny {arch!r} for sft-lora (known: {', '.join(SFT_ARCHS)})")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    pairs = make_instructions(rows, seed)
    corpus = [f"{r['input']}\n{r['target']}" for r in pairs] + [r["target"] for r in pairs]
    if arch == "qwen2":
        from hpcjobs.train.grpo_demo import make_tiny_qwen2

        # Bloom's larger init too: LoRA on a near-uniform random attention learns slowly
        model = make_tiny_qwen2(outdir / "qwen2-tiny", corpus, seed=seed, warm_up=False, init_range=0.2)
    else:
        model = make_tiny_bloom(outdir / "bloom-tiny", corpus, seed=seed)
    dataset = outdir / "instructions.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in pairs), encoding="utf-8")
    demo = outdir / "demo.yaml"
    demo.write_text(SFT_DEMO_YAML.format(model=json.dumps(str(model)), dataset=json.dumps(str(dataset))))
    return {"model": model, "dataset": dataset, "config": demo}


def write_llama2_demo_yaml(outdir: str | Path, made: dict[str, Path]) -> Path:
    """demo.yaml for the llama2-lora demo (``make_demo_assets``' files)."""
    demo = Path(outdir) / "demo.yaml"
    demo.write_text(
        "# Inputs made by `hpcjobs demo-assets`; small settings for CPU training.\n"
        f"model:\n  source: {made['checkpoint']}\n"
        f"data:\n  path: {made['dataset']}\n"
        f"evaluate:\n  prompts: {made['prompts']}\n  max_new_tokens: 24\n"
        "finetune:\n  micro_batch_size: 4\n  max_seq_length: 128\n  max_steps: 40\n"
        "  warmup_steps: 4\n  lr: 5.0e-3\n  logging_steps: 2\n  save_steps: 20\n"
        "  gradient_checkpointing: false\n"
    )
    return demo


# --------------------------------------------------------------------------------------
# llm-pretrain: a small repetitive corpus (JSON lines, "text") and tiny size settings
# --------------------------------------------------------------------------------------

_NAMES = ["Anna", "Ben", "Carla", "Dev", "Emma", "Finn", "Gita", "Hugo"]
_PETS = ["cat", "dog", "bird", "fish", "horse", "goat"]
_FOODS = ["bread", "apples", "rice", "soup", "cheese", "carrots"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_TOWNS = ["Oslo", "Lima", "Rome", "Cairo", "Tokyo", "Paris"]


def _one_story(rng: random.Random) -> str:
    """A few sentences from a small grammar: repetitive enough that a tiny model learns it fast."""
    name, pet, food, day, town = (rng.choice(x) for x in (_NAMES, _PETS, _FOODS, _DAYS, _TOWNS))
    n = rng.randint(2, 5)
    sentences = [f"{name} lives in {town} and has {n} {pet}s.",
                 f"Every {day} {name} gives the {pet}s some {food}.",
                 f"The {pet}s like {food} very much.",
                 f"On {day} evening {name} walks the {pet}s around {town}.",
                 f"{name} says: my {n} {pet}s are happy in {town}."]
    return " ".join(sentences[:rng.randint(3, 5)])


PRETRAIN_DEMO_YAML = """\
# Inputs made by `hpcjobs demo-assets --recipe llm-pretrain`; tiny sizes for CPU training.
data:
  path: {corpus}
  split: [0.9, 0.05, 0.05]
pretrain:
  dim: 64
  n_layers: 2
  n_heads: 4
  n_kv_heads: 2
  vocab_size: 512
  max_seq_len: 64
  micro_batch_size: 8
  grad_accum: 1
  lr: 3.0e-3
  warmup_steps: 10
  max_steps: 120
  logging_steps: 5
  save_steps: 60
evaluate:
  max_new_tokens: 24
"""


def make_pretrain_demo_assets(outdir: str | Path, seed: int = 0, rows: int = 600) -> dict[str, Path]:
    """``corpus.jsonl`` (one ``{"text": ...}`` a line) and ``demo.yaml`` for the llm-pretrain recipe."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"stories-{seed}")
    corpus = outdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": _one_story(rng)}) + "\n" for _ in range(rows)), encoding="utf-8")
    demo = outdir / "demo.yaml"
    demo.write_text(PRETRAIN_DEMO_YAML.format(corpus=json.dumps(str(corpus))))
    return {"corpus": corpus, "config": demo}


# --------------------------------------------------------------------------------------
# seq-classification: a tiny BERT with a WordPiece tokenizer, sentence pairs (AFQMC's columns)
# --------------------------------------------------------------------------------------

# Two short reviews of one product; label 1 iff together they recommend it: each review's opinion
# word has a strength (+3 .. -3, never 0) and the sum decides (pairs that cancel out are not
# drawn). A genuine pair task (either review alone predicts the label at most 80% of the time),
# yet linear in the two reviews, so a random tiny BERT learns it in ~100 steps. "Same object in
# both sentences" (AFQMC's kind of question) is an equality test, which a random tiny encoder
# does not learn from a few hundred rows in 150 steps: it stays at chance.
_OPINIONS = {3: ["excellent", "perfect"], 2: ["good", "nice"], 1: ["fine", "okay"],
             -1: ["poor", "dull"], -2: ["bad", "weak"], -3: ["awful", "terrible"]}
_PRODUCTS = ["phone", "laptop", "bike", "camera", "lamp", "kettle", "chair", "watch"]
_REVIEW_TEMPLATES = ["The {obj} is {w}.", "{name} says the {obj} is {w}.", "I think this {obj} is {w}.",
                     "Honestly, a {w} {obj}.", "My new {obj} feels {w}.", "{name} finds the {obj} {w} overall."]
PAIR_COLUMNS = ("sentence1", "sentence2", "label")


def _one_pair(rng: random.Random) -> dict:
    obj = rng.choice(_PRODUCTS)
    while True:
        a, b = rng.choice(list(_OPINIONS)), rng.choice(list(_OPINIONS))
        if a + b:  # a tie has no label; the rest splits 15/15, so the labels are balanced
            break
    t1, t2 = rng.choice(_REVIEW_TEMPLATES), rng.choice(_REVIEW_TEMPLATES)
    return {"sentence1": t1.format(obj=obj, w=rng.choice(_OPINIONS[a]), name=rng.choice(_NAMES)),
            "sentence2": t2.format(obj=obj, w=rng.choice(_OPINIONS[b]), name=rng.choice(_NAMES)),
            "label": int(a + b > 0)}


def make_sentence_pairs(rows: int = 600, seed: int = 0) -> list[dict]:
    """``rows`` synthetic review pairs (columns sentence1, sentence2, label 0/1, as AFQMC's data)."""
    rng = random.Random(f"pairs-{seed}")
    return [_one_pair(rng) for _ in range(rows)]


def train_wordpiece_tokenizer(texts: Sequence[str], out_dir: str | Path, vocab_size: int = 400) -> Path:
    """A lower-casing WordPiece tokenizer (BERT's kind) for ``texts``, saved in HF layout.

    [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; encodes ``[CLS] a [SEP] b [SEP]`` with
    token_type_ids 0/1. The vocabulary: the specials, every character (alone and as a ``##``
    continuation, so unseen words still split), then the corpus' words, most frequent first.
    Not tokenizers' WordPieceTrainer: it breaks ties between equally frequent merges in hash
    order, so every process gives another vocabulary (and the same seed another checkpoint).
    BertTokenizer builds the pipeline, so reloading with AutoTokenizer gives the same tokens.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    # BertTokenizer's normalizer and pre-tokenizer, so the words are the ones it will look up.
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in counts for c in w})
    vocab = dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars])
    for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])):  # ties: alphabetical
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w)
    hf = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=128)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


def make_tiny_bert(out_dir: str | Path, texts: Sequence[str], *, seed: int = 0, hidden: int = 64,
                   layers: int = 2, heads: int = 4, intermediate: int = 128, max_positions: int = 128) -> Path:
    """A random tiny BertModel (safetensors) with its tokenizer, in ``out_dir``.

    A bare encoder (with pooler), like a pretrained BERT: AutoModelForSequenceClassification
    loads it and initialises only the classifier head."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = Path(out_dir)
    train_wordpiece_tokenizer(texts, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=max_positions, type_vocab_size=2,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(out), safe_serialization=True)
    return out


def make_classification_demo_assets(outdir: str | Path, seed: int = 0, rows: int = 600) -> dict[str, Path]:
    """A tiny BERT (``bert-tiny/``) and ``pairs.jsonl`` (sentence1/sentence2/label) under ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    pairs = make_sentence_pairs(rows, seed)
    model = make_tiny_bert(outdir / "bert-tiny", [r[c] for r in pairs for c in ("sentence1", "sentence2")],
                           seed=seed)
    dataset = outdir / "pairs.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in pairs), encoding="utf-8")
    return {"model": model, "dataset": dataset}


# --------------------------------------------------------------------------------------
# seq2seq: a tiny T5 with a T5-style BPE tokenizer, chat dialogues with summaries (SAMSum-like)
# --------------------------------------------------------------------------------------

_EVENTS = ["party", "concert", "match", "lecture", "picnic", "wedding"]
_PLACES = ["kitchen", "garden", "garage", "car", "office", "park"]
_REASONS = ["sick", "busy", "tired", "away"]
DIALOGUE_COLUMNS = ("dialogue", "summary")


def _one_chat(rng: random.Random) -> dict[str, str]:
    """A few turns of one of four kinds; the summary copies the names and the slot words,
    so an encoder-decoder learns to pick them out of the dialogue."""
    a, b = rng.sample(_NAMES, 2)
    kind = rng.randrange(4)
    if kind == 0:
        day, town = rng.choice(_DAYS), rng.choice(_TOWNS)
        turns = [(a, f"Are you free on {day}?"), (b, "Yes. Where shall we meet?"),
                 (a, f"Let's meet in {town} at {rng.randint(1, 9)} pm."), (b, "Great, see you then.")]
        summary = f"{a} and {b} will meet on {day} in {town}."
    elif kind == 1:
        food, n = rng.choice(_FOODS), rng.randint(2, 6)
        turns = [(a, "I am going to the shop."), (b, f"Can you buy some {food}?"),
                 (a, "Sure, how much?"), (b, f"{n} bags, thanks!")]
        summary = f"{a} will buy {n} bags of {food} for {b}."
    elif kind == 2:
        pet, place = rng.choice(_PETS), rng.choice(_PLACES)
        turns = [(a, f"I can't find my {pet}!"), (b, f"Did you look in the {place}?"),
                 (a, f"Yes, it was in the {place}. Thank you!")]
        summary = f"{a} found the {pet} in the {place}."
    else:
        event, day, why = rng.choice(_EVENTS), rng.choice(_DAYS), rng.choice(_REASONS)
        turns = [(a, f"Sorry, I can't come to the {event} on {day}."), (b, "Oh no, why not?"),
                 (a, f"I am {why}."), (b, "Okay, maybe next time.")]
        summary = f"{a} can't come to the {event} on {day} because {a} is {why}."
    return {"dialogue": "\n".join(f"{who}: {text}" for who, text in turns), "summary": summary}


def make_chats(rows: int = 600, seed: int = 0) -> list[dict[str, str]]:
    """``rows`` synthetic chats (columns dialogue, summary, as SAMSum's data)."""
    rng = random.Random(f"chats-{seed}")
    return [_one_chat(rng) for _ in range(rows)]


def train_t5_tokenizer(texts: Sequence[str], out_dir: str | Path, vocab_size: int = 400) -> Path:
    """A tokenizer with T5's conventions trained on ``texts``, saved in HF layout.

    <pad>=0, </s>=1, <unk>=2, no sentinel (<extra_id_N>) tokens; ``</s>`` is appended on encoding
    (as T5's tokenizer does). Whitespace (newlines too) splits words and decodes as single spaces
    ("▁" word prefix, T5's pre-tokenizer and decoder); punctuation is a piece of its own; case is
    kept. The model is BPE, not T5's unigram: the unigram trainers (tokenizers' and sentencepiece's)
    find seed pieces among *distinct* words only, so on a small repetitive corpus even its most
    frequent words end up split into letters. Saved as a plain PreTrainedTokenizerFast
    (tokenizer.json), because AutoTokenizer would rebuild a T5Tokenizer as a unigram model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Punctuation split off after the "▁" prefix: "Rome." is "▁Rome" "." as in the dialogue's "▁Rome".
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                 padding_side="right", model_max_length=512, clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


def make_tiny_t5(out_dir: str | Path, texts: Sequence[str], *, seed: int = 0, d_model: int = 64, d_kv: int = 16,
                 layers: int = 2, heads: int = 4, d_ff: int = 128) -> Path:
    """A random tiny T5ForConditionalGeneration (safetensors, no dropout) with its tokenizer, in ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, T5Config, T5ForConditionalGeneration

    out = Path(out_dir)
    train_t5_tokenizer(texts, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                      num_decoder_layers=layers, num_heads=heads, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                      dropout_rate=0.0)  # with T5's 0.1 a tiny model learns the copying far slower
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(decoder_start_token_id=tok.pad_token_id,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def make_seq2seq_demo_assets(outdir: str | Path, seed: int = 0, rows: int = 600) -> dict[str, Path]:
    """A tiny T5 (``t5-tiny/``) and ``dialogues.jsonl`` (dialogue/summary) under ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    chats = make_chats(rows, seed)
    # "summarize: " is the input prefix a T5 finetune puts before the dialogue.
    model = make_tiny_t5(outdir / "t5-tiny", [f"summarize: {r['dialogue']}" for r in chats] +
                         [r["summary"] for r in chats], seed=seed)
    dataset = outdir / "dialogues.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in chats), encoding="utf-8")
    return {"model": model, "dataset": dataset}


# Settings measured to learn on these tiny models (accuracy 0.58 -> 0.99 in 150 steps of batch 8;
# ROUGE-L 0 -> 0.90 in 300), for two CPU ranks: batch 8 per rank, a few epochs.
TASK_DEMO_YAML = {"seq-classification": """\
# Inputs made by `hpcjobs demo-assets --recipe seq-classification`; small settings for CPU training.
model:
  source: {model}
data:
  path: {dataset}
finetune:
  max_seq_length: 64
  micro_batch_size: 8
  epochs: 4
  lr: 2.0e-3
  warmup_steps: 10
  logging_steps: 5
""", "seq2seq": """\
# Inputs made by `hpcjobs demo-assets --recipe seq2seq`; small settings for CPU training.
model:
  source: {model}
data:
  path: {dataset}
prepare:
  max_target_length: 32
finetune:
  max_seq_length: 64
  micro_batch_size: 4
  grad_accum: 1
  epochs: 4
  lr: 3.0e-3
  warmup_steps: 20
  logging_steps: 10
"""}


def make_for_recipe(recipe: str, outdir: str | Path, seed: int = 0, arch: str | None = None) -> dict[str, Path]:
    """The demo assets of ``recipe`` and their ``demo.yaml`` (``hpcjobs demo-assets --recipe``);
    ``arch`` chooses sft-lora's tiny model (SFT_ARCHS)."""
    if arch is not None and recipe != "sft-lora":
        raise ValueError(f"--arch chooses sft-lora's tiny model; {recipe}'s model is fixed")
    if recipe == "sft-lora":
        return make_sft_demo_assets(outdir, seed=seed, arch=arch or "bloom")
    if recipe == "llama2-lora":
        made = make_demo_assets(outdir, seed=seed)
        return {**made, "config": write_llama2_demo_yaml(outdir, made)}
    if recipe == "llm-pretrain":
        return make_pretrain_demo_assets(outdir, seed=seed)
    if recipe == "qwen2-grpo":
        from hpcjobs.train.grpo_demo import make_grpo_demo_assets

        return make_grpo_demo_assets(outdir, seed=seed)
    if recipe in TASK_DEMO_YAML:
        made = (make_classification_demo_assets if recipe == "seq-classification" else
                make_seq2seq_demo_assets)(outdir, seed=seed)
        demo = Path(outdir) / "demo.yaml"
        demo.write_text(TASK_DEMO_YAML[recipe].format(model=json.dumps(str(made["model"])),
                                                      dataset=json.dumps(str(made["dataset"]))))
        return {**made, "config": demo}
    raise ValueError(f"no demo assets for recipe {recipe!r} (known: {', '.join(DEMO_RECIPES)})")


DEMO_RECIPES = ("llama2-lora", "sft-lora", "llm-pretrain", "qwen2-grpo", "seq-classification", "seq2seq")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a prompts.txt: one a line, blank lines ignored."""
    return [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m hpcjobs.train.demo_assets",
        description="Write a tiny Meta-format Llama-2 checkpoint, a synthetic dialogue data set and test prompts.",
    )
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, choices=(1, 2), default=1)
    ap.add_argument("--n-kv-heads", type=int, default=None, choices=(1, 2, 4),
                    help="grouped-query attention: kv heads (of 4 query heads); default: plain multi-head")
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    args = ap.parse_args(argv)
    if args.n_kv_heads is not None and args.n_kv_heads % args.shards:
        ap.error(f"--n-kv-heads {args.n_kv_heads} must be divisible by --shards {args.shards}")
    if args.rows < 1:
        ap.error("--rows must be >= 1")
    t0 = time.perf_counter()
    paths = make_demo_assets(args.outdir, seed=args.seed, shards=args.shards,
                             n_kv_heads=args.n_kv_heads, rows=args.rows)
    for name, p in paths.items():
        print(f"demo_assets: {name}: {p}")
    print(f"demo_assets: done in {time.perf_counter() - t0:.1f}s (seed {args.seed}, {args.rows} rows, "
          f"{args.shards} shard(s), n_kv_heads {args.n_kv_heads or 4})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
