"""Merge a LoRA adapter into its base model and save a standalone HF model.

    python -m hpcjobs.train.merge --adapter DIR --output DIR [--base DIR]
                                  [--dtype float32|float16|bfloat16] [--device cpu|cuda]

* The base model is the adapter's ``base_model_name_or_path`` (an absolute path
  written by ``hpcjobs.train.finetune``) unless ``--base`` is given.
* The merge itself is done in float32 (``merge_and_unload(safe_merge=True)``,
  which also refuses NaNs), then the merged weights are cast to ``--dtype``
  (default: the dtype recorded in the base model's config.json, float32 when
  none) and saved as safetensors. Peak memory is about 4 bytes per parameter
  (~28 GB for a 7B model) on the chosen device.
* The tokenizer files are copied byte-for-byte from the base model directory
  (falling back to the adapter directory, then to ``save_pretrained``).
* A whole model instead of an adapter (a full finetune, ``lora.enabled: false``) is copied
  to OUTPUT unchanged, so the chain's later stages find it where they look.
* The output is written to ``OUTPUT.tmp-<pid>`` and moved into place at the
  end, so a killed merge never leaves a half-written model at OUTPUT.
  ``OUTPUT/merge_info.json`` records base, adapter and dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from hpcjobs.errors import HpcjobsError

DTYPES = ("float32", "float16", "bfloat16")
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def log(msg: str) -> None:
    print(f"[hpcjobs.merge] {msg}", flush=True)


def resolve_base(adapter_dir: str | os.PathLike, base: str | None) -> str:
    """Absolute base model directory: ``base`` or the adapter config's path."""
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.is_file():
        raise HpcjobsError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    if base is None:
        cfg = json.loads(cfg_path.read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise HpcjobsError(f"{cfg_path}: base_model_name_or_path is not set", hint="pass --base DIR")
        if not os.path.isabs(base):
            raise HpcjobsError(
                f"{cfg_path}: base_model_name_or_path {base!r} is not an absolute path",
                hint="pass --base DIR (adapters from hpcjobs.train.finetune record absolute paths)",
            )
    base_path = Path(base).expanduser().resolve()
    if not (base_path / "config.json").is_file():
        raise HpcjobsError(f"{base_path}: base model not found (no config.json)", hint="pass --base DIR")
    return str(base_path)


def base_dtype_name(base: str) -> str:
    cfg = json.loads((Path(base) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def copy_tokenizer(base: str, adapter: str, out: Path) -> list[str]:
    """Copy tokenizer files verbatim; returns the names copied."""
    for src in (Path(base), Path(adapter)):
        names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        if any(n in names for n in ("tokenizer.json", "tokenizer.model")):
            for n in names:
                shutil.copy2(src / n, out / n)
            return names
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(str(out))
    return sorted(p.name for p in out.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))


def fix_permissions(directory: Path) -> None:
    """Files as the umask allows (safetensors writes 0600, which hides a model
    from the rest of a project group on shared storage)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in directory.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~mask)


def copy_full_model(model: str, output: str, t0: float) -> Path:
    """A fully finetuned model passes through as a copy, so later stages find it where merge writes."""
    out = Path(output).resolve()
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp)
    (tmp / "merge_info.json").write_text(json.dumps({"full_model": model, "copied": True, "time": time.time()},
                                                    indent=2) + "\n")
    fix_permissions(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"{model} is a whole model (full finetune, no adapter): copied to {out} in {time.time() - t0:.1f}s")
    return out


def merge(
    adapter: str,
    output: str,
    base: str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
) -> Path:
    """Merge ``adapter`` into its base model and save to ``output``; returns the output path."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    adapter = str(Path(adapter).resolve())
    if not (Path(adapter) / "adapter_config.json").is_file() and (Path(adapter) / "config.json").is_file():
        return copy_full_model(adapter, output, t0)  # a full finetune (lora.enabled false): nothing to merge
    base = resolve_base(adapter, base)
    dtype = dtype or base_dtype_name(base)
    if dtype not in DTYPES:
        raise HpcjobsError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(output).resolve()
    log(f"base={base} adapter={adapter} output={out} dtype={dtype} device={device}")

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.to(device)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    model = model.merge_and_unload(safe_merge=True)
    model = model.to(dtype=getattr(torch, dtype)).to("cpu")
    model.config.use_cache = True

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    copied = copy_tokenizer(base, adapter, tmp)
    (tmp / "merge_info.json").write_text(
        json.dumps(
            {"base": base, "adapter": adapter, "dtype": dtype, "tokenizer_files": copied, "time": time.time()},
            indent=2,
        )
        + "\n"
    )
    fix_permissions(tmp)
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    log(f"merged model saved to {out} in {time.time() - t0:.1f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcjobs.train.merge", description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="PEFT adapter directory (finetune output_dir)")
    ap.add_argument("--output", required=True, help="directory for the merged model")
    ap.add_argument("--base", default=None, help="base model directory (default: from adapter_config.json)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the saved weights (default: base's)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to merge (default cpu)")
    args = ap.parse_args(argv)
    try:
        merge(args.adapter, args.output, base=args.base, dtype=args.dtype, device=args.device)
    except HpcjobsError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
