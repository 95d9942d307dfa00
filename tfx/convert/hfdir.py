"""A Hugging Face model directory: config.json and safetensors weights, read and written.

Only safetensors are read (a pickled pytorch_model.bin can run code when loaded); a sharded model's
model.safetensors.index.json is followed. Writes go through a temporary folder renamed at the end,
so a failed export leaves no half-written directory.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tfx.errors import UsageError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the model's config: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UsageError(f"{path}: no model_type: not a Hugging Face model config")
    return config


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files holding the model's weights (one, or the shards its index names)."""
    if (hf_dir / WEIGHTS).is_file():
        return [hf_dir / WEIGHTS]
    if (hf_dir / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((hf_dir / INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UsageError(f"{hf_dir / INDEX}: unreadable shard index: {exc!r}") from None
        if any(Path(s).name != s for s in shards):
            raise UsageError(f"{hf_dir / INDEX}: shard names must be files in the model directory")
        return [hf_dir / s for s in shards]
    pickled = [p.name for p in hf_dir.glob("*.bin")] + [p.name for p in hf_dir.glob("*.pt")]
    hint = f" ({', '.join(sorted(pickled))} are pickles, which tfx never loads: they can run code; " \
           "save the model with safe_serialization=True)" if pickled else ""
    raise UsageError(f"{hf_dir}: no {WEIGHTS} or {INDEX}{hint}")


def read_tensors(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model's safetensors files, by name, as float32 where floating."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(hf_dir)):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    tensors[name] = t.float() if t.is_floating_point() else t
        except Exception as exc:  # safetensors raises several types for truncated or foreign files
            raise UsageError(f"{path}: cannot read the weights (truncated or not safetensors?): {exc}") from None
    return tensors


def write_hf_dir(out: str | Path, config: dict, tensors: dict[str, torch.Tensor], tokenizer=None) -> None:
    """config.json, model.safetensors (each tensor stored once, contiguous) and the tokenizer's HF
    files where it has them (`save_hf`), written to a temporary folder renamed to `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
              metadata={"format": "pt"})
    if tokenizer is not None and hasattr(tokenizer, "save_hf"):
        tokenizer.save_hf(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
