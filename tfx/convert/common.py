"""What the architecture modules share: reading an HF config's settings with refusals, and the
recipe checks that decide whether a run is exactly one architecture."""
from __future__ import annotations

from typing import Any

import torch

from tfx.errors import UsageError

# setting of [model] -> the value every Hugging Face architecture here needs (one plain stack)
PLAIN = {"block": "standard", "reversible": False, "attention_layers": None}


def need(config: dict, key: str, default: Any = None, *, arch: str) -> Any:
    """config[key], or `default` where absent; a required key (default None) that is absent is refused."""
    value = config.get(key, default)
    if value is None:
        raise UsageError(f"{arch} config.json: no {key}")
    return value


def refuse_unless(ok: bool, arch: str, what: str) -> None:
    """Refuse an HF setting tfx cannot express, with the reason."""
    if not ok:
        raise UsageError(f"{arch} config.json: {what}: tfx cannot express this exactly")


def plain_problems(m, *, position: str, full_heads: bool = False, **want: Any) -> list[str]:
    """Why the recipe's [model] `m` is not a plain stack with this position kind and the settings `want`
    (name -> value); `full_heads`: also n_heads x d_head = d_model with no grouped key/value heads."""
    problems = [f"model.{k} is {getattr(m, k)!r}, not {v!r}" for k, v in {**PLAIN, **want}.items()
                if getattr(m, k) != v]
    if full_heads and ((m.n_kv_heads or m.n_heads) != m.n_heads or
                       (m.d_head or m.d_model // m.n_heads) * m.n_heads != m.d_model):
        problems.append("grouped key/value heads or d_head x n_heads != d_model")
    for table, plain in (("position", position), ("attention", "dense"), ("memory", "none"), ("exit", "none"),
                         ("depth", "layers")):
        kind = getattr(m, table).kind
        if kind != plain:
            problems.append(f"model.{table}.kind is {kind!r}, not {plain!r}")
    if m.patches.size:
        problems.append("model.patches (MEGABYTE)")
    return problems


def token_ids(tokenizer) -> dict:
    """The special ids an HF config names: the run's tokenizer's."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def take(tensors: dict[str, torch.Tensor], used: set[str], name: str) -> torch.Tensor:
    """tensors[name], marked as used; a missing one is refused."""
    if name not in tensors:
        raise UsageError(f"the weights have no {name}")
    used.add(name)
    return tensors[name]


def take_pairs(tensors: dict[str, torch.Tensor], used: set[str], names) -> dict[str, torch.Tensor]:
    """{ours.weight, ours.bias: theirs.weight, theirs.bias} for each (ours, theirs) in `names`, taken."""
    return {f"{ours}.{p}": take(tensors, used, f"{theirs}.{p}") for ours, theirs in names for p in ("weight", "bias")}


def give_pairs(sd: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """The other way: {theirs.weight, theirs.bias: sd's ours.weight, ours.bias} for each (ours, theirs)."""
    return {f"{theirs}.{p}": sd[f"{ours}.{p}"] for ours, theirs in names for p in ("weight", "bias")}
