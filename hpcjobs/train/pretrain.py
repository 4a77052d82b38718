"""Pretraining a Llama-style decoder from scratch, inside a Slurm job (the ``pretrain`` stage).

Two steps, both reading ``pretrain.json`` (written by :mod:`hpcjobs.stages.pretrain`)::

    python -m hpcjobs.train.pretrain prepare --config pretrain.json     # once, on the batch host
    accelerate launch ... -m hpcjobs.train.pretrain train --config pretrain.json   # every rank

pretrain.json::

    tokenizer         HF tokenizer directory
    output_dir        the trained model (HF directory + tokenizer), written at the end
    init_dir          the untrained init (HF directory + tokenizer), written by prepare
    checkpoint_dir    Trainer checkpoints (checkpoint-<step>/: a loadable HF model + DeepSpeed state)
    packed_dir        the packed corpus (datasets.save_to_disk), written by prepare
    deepspeed_config  the settled DeepSpeed JSON (no "auto" left)
    resume            "auto" (latest complete checkpoint) | "never"
    device            "cuda" | "cpu"
    world_size        ranks the batch numbers were settled for
    data              {path, columns, template, split, seed}: see hpcjobs.train.data
    model             LlamaConfig keyword arguments (hidden_size, num_hidden_layers, ...)
    train             {micro_batch_size, gradient_accumulation_steps, learning_rate, min_lr_ratio,
                       warmup_steps, weight_decay, num_train_epochs, max_steps, max_grad_norm,
                       precision, max_seq_len, logging_steps, save_steps, save_total_limit, seed}

**prepare** tokenizes the *train* split (the deterministic split of hpcjobs.train.data, so
evaluate's held-out test split is never trained on): ``tokenizer(text)`` (with BOS when the
tokenizer adds it) followed by EOS, documents concatenated and cut into blocks of
``max_seq_len`` tokens (the tail of each batch of 1000 documents that does not fill a block is
dropped, as in transformers' ``run_clm``). It then builds the model from ``model`` with the
run's seed and saves it untrained. Both are written to ``*.partial`` and renamed, and both are
skipped when already there for the same inputs (a fingerprint in ``packed_dir/pack.json``, the
config in ``init_dir/config.json``), so a requeue or rerun reuses them.

**train** is the HF Trainer with DeepSpeed (its ``deepspeed=`` argument, the same file the
accelerate YAML names): AdamW (torch), warmup then cosine decay to ``lr × min_lr_ratio``,
gradient clipping, bf16/fp16 per ``precision``. The Trainer is used because it resumes
exactly: model, optimizer, scheduler, DeepSpeed engine, RNG states and the position in the
data (it skips the batches of the current epoch already seen, under the same seeded sampler),
all from one ``checkpoint-<step>``. Progress and the time-limit contract come from
:class:`hpcjobs.train.callbacks.HpcjobsCallback` (SIGUSR2 -> checkpoint on every rank -> exit
75). The final model is saved to ``output_dir.partial`` and renamed.

Exit codes: 0 done, 75 preempted (checkpoint saved), 2 bad input (message printed), 1 crash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hpcjobs.errors import HpcjobsError

LOG_PREFIX = "[hpcjobs.pretrain]"
PACK_FILE = "pack.json"
PACK_VERSION = 1
MAP_BATCH = 1000


def log(msg: str) -> None:
    sys.stdout.write(f"{LOG_PREFIX} {msg}\n")
    sys.stdout.flush()


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HpcjobsError(f"{p}: config not found") from None
    except json.JSONDecodeError as e:
        raise HpcjobsError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None
    for key in ("tokenizer", "output_dir", "init_dir", "checkpoint_dir", "packed_dir", "data", "model", "train"):
        if not cfg.get(key):
            raise HpcjobsError(f"{p}: {key}: required")
    return cfg


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _replace_dir(partial: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


# ----------------------------------------------------------------------------
# prepare: tokenize + pack, and the untrained init
# ----------------------------------------------------------------------------


def load_tokenizer(path: str, vocab_size: int):
    from hpcjobs.train.tokenizer import check_tokenizer

    tok = check_tokenizer(path)
    if len(tok) > vocab_size:
        raise HpcjobsError(f"{path}: the tokenizer has {len(tok)} tokens but the model's vocab_size is "
                           f"{vocab_size}; raise pretrain.vocab_size")
    return tok


def _tokenizer_digest(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def pack_fingerprint(cfg: dict) -> dict:
    data = dict(cfg["data"])
    st = Path(data["path"]).stat()
    return {"version": PACK_VERSION, "tokenizer": _tokenizer_digest(cfg["tokenizer"]), "data": data,
            "data_size": st.st_size, "data_mtime_ns": st.st_mtime_ns,
            "max_seq_len": int(cfg["train"]["max_seq_len"])}


def pack(texts, tok, block: int, num_proc: int = 1):
    """``texts`` (a datasets.Dataset with ``text``) -> a Dataset of ``input_ids`` blocks of ``block`` tokens."""
    eos = tok.eos_token_id

    def tokenize_and_group(batch: dict) -> dict:
        ids: list[int] = []
        for enc in tok(batch["text"], add_special_tokens=True)["input_ids"]:
            ids.extend(enc)
            ids.append(eos)
        usable = len(ids) // block * block
        return {"input_ids": [ids[i:i + block] for i in range(0, usable, block)]}

    return texts.map(tokenize_and_group, batched=True, batch_size=MAP_BATCH, remove_columns=texts.column_names,
                     num_proc=num_proc if num_proc > 1 else None, desc=None)


def prepare(cfg: dict) -> None:
    t0 = time.time()
    model_cfg = cfg["model"]
    tok = load_tokenizer(cfg["tokenizer"], int(model_cfg["vocab_size"]))
    block = int(cfg["train"]["max_seq_len"])

    packed = Path(cfg["packed_dir"])
    want = pack_fingerprint(cfg)
    try:
        have = json.loads((packed / PACK_FILE).read_text())
    except (OSError, ValueError):
        have = None
    if have and {k: have.get(k) for k in want} == want:
        log(f"packed corpus {packed}: {have['blocks']} blocks of {block} tokens, made before; reused")
    else:
        if have:
            log(f"packed corpus {packed} was made from other inputs; making it again")
        from hpcjobs.train.data import load_splits

        splits = load_splits(cfg["data"])
        train = splits["train"]
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            cores = os.cpu_count() or 1
        num_proc = min(8, cores) if len(train) >= 20 * MAP_BATCH else 1
        ds = pack(train, tok, block, num_proc)
        if len(ds) == 0:
            raise HpcjobsError(f"{cfg['data']['path']}: the train split ({len(train)} rows) has fewer than "
                               f"{block} tokens: not one block of max_seq_len; lower pretrain.max_seq_len")
        partial = packed.with_name(packed.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        ds.save_to_disk(str(partial))
        stats = {**want, "documents": len(train), "blocks": len(ds), "tokens": len(ds) * block,
                 "test_documents": len(splits["test"]), "seconds": round(time.time() - t0, 2)}
        _write_json(partial / PACK_FILE, stats)
        _replace_dir(partial, packed)
        log(f"packed {len(train)} documents into {len(ds)} blocks of {block} tokens ({len(ds) * block:,} tokens) "
            f"in {time.time() - t0:.1f}s: {packed}")
    save_init(cfg, tok)


INIT_FILE = "hpcjobs-init.json"


def save_init(cfg: dict, tok) -> None:
    """The model of the size settings, initialised from scratch with the run's seed, saved untrained."""
    init = Path(cfg["init_dir"])
    want = {"model": cfg["model"], "seed": int(cfg["train"]["seed"]), "tokenizer": _tokenizer_digest(cfg["tokenizer"])}
    try:
        have = json.loads((init / INIT_FILE).read_text())
    except (OSError, ValueError):
        have = None
    if have is not None:
        if have == want:
            log(f"untrained init {init}: made before; reused")
            return
        ckpts = Path(cfg["checkpoint_dir"])
        if cfg.get("resume") != "never" and ckpts.is_dir() and any(ckpts.glob("checkpoint-*")):
            raise HpcjobsError(f"{init} was made with other size settings, seed or tokenizer than this run's, and "
                               f"{ckpts} holds checkpoints of that model; rerun with --fresh to start over")
        log(f"untrained init {init} was made from other settings; making it again")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg["model"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(int(cfg["train"]["seed"]))
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    partial = init.with_name(init.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    model.save_pretrained(str(partial), safe_serialization=True)
    tok.save_pretrained(str(partial))
    _write_json(partial / INIT_FILE, want)
    _replace_dir(partial, init)
    n = sum(p.numel() for p in model.parameters())
    log(f"untrained init: {n:,} parameters ({n / 1e6:.2f}M) saved to {init}")


# ----------------------------------------------------------------------------
# train: every rank
# ----------------------------------------------------------------------------


def _collate(examples: list) -> dict:
    import torch

    ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}  # the model shifts the labels itself


def train(cfg: dict) -> int:
    # first: SIGUSR2 (Slurm's time-limit warning) is caught from here on, before the heavy imports
    from hpcjobs.train.callbacks import HpcjobsCallback
    from hpcjobs.train.runtime import find_resume_checkpoint, rank_info, resolve_device, setup_environment

    info = rank_info()
    device = resolve_device(cfg.get("device"))
    setup_environment(device, info["local_size"])
    planned = cfg.get("world_size")
    if planned and planned != info["world_size"]:
        raise HpcjobsError(f"the launcher started {info['world_size']} ranks but this job was planned, and its "
                           f"DeepSpeed batch size computed, for {planned}")
    t = cfg["train"]
    if device == "cpu" and t["precision"] != "fp32":
        raise HpcjobsError(f"train.precision {t['precision']} needs a GPU; use fp32 on the CPU")
    packed = Path(cfg["packed_dir"])
    if not (packed / PACK_FILE).is_file():
        raise HpcjobsError(f"{packed}: no packed corpus (the prepare step writes it before the launch)")
    init = cfg["init_dir"]
    if not Path(init, "config.json").is_file():
        raise HpcjobsError(f"{init}: no untrained init (the prepare step writes it before the launch)")

    import warnings

    # known, harmless deprecation chatter from inside DeepSpeed/torch (x every rank)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, Trainer, TrainingArguments

    if info["rank"] != 0:
        transformers.utils.logging.disable_progress_bar()
    data = datasets.load_from_disk(str(packed))
    ratio = float(t.get("min_lr_ratio") or 0)
    args = TrainingArguments(
        output_dir=cfg["checkpoint_dir"],
        per_device_train_batch_size=int(t["micro_batch_size"]),
        gradient_accumulation_steps=int(t["gradient_accumulation_steps"]),
        learning_rate=float(t["learning_rate"]),
        lr_scheduler_type="cosine_with_min_lr" if ratio > 0 else "cosine",
        lr_scheduler_kwargs={"min_lr_rate": ratio} if ratio > 0 else {},
        warmup_steps=int(t["warmup_steps"]),
        weight_decay=float(t["weight_decay"]),
        optim="adamw_torch",
        max_steps=int(t["max_steps"]),
        num_train_epochs=float(t["num_train_epochs"]),
        max_grad_norm=float(t["max_grad_norm"]),
        bf16=t["precision"] == "bf16",
        fp16=t["precision"] == "fp16",
        logging_steps=int(t["logging_steps"]),
        logging_first_step=True,
        save_strategy="steps",
        save_steps=int(t["save_steps"]),
        save_total_limit=int(t["save_total_limit"]) or None,
        save_only_model=False,
        seed=int(t["seed"]),
        data_seed=int(t["seed"]),
        deepspeed=cfg.get("deepspeed_config"),
        use_cpu=device == "cpu",
        # TensorBoard by default: the job template exports TENSORBOARD_LOGGING_DIR
        report_to=list(t.get("report_to") or []) or "none",
        disable_tqdm=True,
        log_level="warning",
        log_level_replica="error",
        dataloader_drop_last=True,
        ddp_find_unused_parameters=False,
    )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and cfg.get("deepspeed_config"):
        # As in hpcjobs.train.finetune: with use_cpu accelerate never initialises deepspeed.comm,
        # which ZeRO-3's zero.Init (in from_pretrained below) needs; wrap the existing group.
        import deepspeed.comm as ds_comm

        if not ds_comm.is_initialized():
            ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)

    tokenizer = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype="float32")
    model.config.use_cache = False
    resume = find_resume_checkpoint(cfg["checkpoint_dir"], cfg.get("resume", "auto"),
                                    deepspeed=bool(cfg.get("deepspeed_config")))
    world = args.world_size
    block = int(t["max_seq_len"])
    per_step = int(t["micro_batch_size"]) * int(t["gradient_accumulation_steps"]) * world
    if info["rank"] == 0:
        n = sum(p.numel() for p in model.parameters())
        log(f"model {n:,} parameters; {len(data)} blocks of {block} tokens; world size {world}, "
            f"{per_step} blocks ({per_step * block:,} tokens) per optimizer step"
            + (f"; resuming from {resume}" if resume else ""))
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=_collate,
                      processing_class=tokenizer, callbacks=[HpcjobsCallback()])
    if not trainer.is_world_process_zero():
        trainer.remove_callback(PrinterCallback)  # it prints on every node's local rank 0
    trainer.train(resume_from_checkpoint=resume)   # exits 75 after a checkpoint on the time-limit warning

    out = Path(cfg["output_dir"])
    partial = out.with_name(out.name + ".partial")
    if args.should_save and partial.exists():
        shutil.rmtree(partial)
    trainer.save_model(str(partial))   # rank 0 writes; collective under DeepSpeed
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        model.config.use_cache = True
        model.config.save_pretrained(str(partial))
        _replace_dir(partial, out)
        log(f"done: step {trainer.state.global_step}/{trainer.state.max_steps}; model saved to {out}")
    trainer.accelerator.wait_for_everyone()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcjobs.train.pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("prepare", "train"))
    ap.add_argument("--config", required=True, help="pretrain.json")
    a = ap.parse_args(argv)
    from hpcjobs.train.runtime import set_log_prefix

    set_log_prefix(LOG_PREFIX)   # the shared helpers' lines (resume, preemption) say pretrain
    # no progress bars in the job's log (datasets' map/save, transformers' shard writing)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        cfg = load_config(a.config)
        if a.step == "prepare":
            prepare(cfg)
            return 0
        return train(cfg)
    except HpcjobsError as e:
        log(f"error: {e}")
        return 2
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
