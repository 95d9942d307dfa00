"""Per-layer attention settings: `[model.attention.per_layer]` in a recipe.

    [model.attention]
    kind = "local"
    window = 64
    [model.attention.per_layer]          # one value per layer, in order; an empty string: not set there
    kind = ["local", "local", "dense", "dense"]
    window = [32, 64, "", ""]         # "": not set in that layer (the kind's default; dense has none)

The keys outside `per_layer` hold for every layer; each list gives layer i its i-th value. The
model then has one attention table per layer (`model.attention_layers`, which the saved recipe of a
run keeps); `model.attention` is the first layer's, for the checks and tools that read one. Every
stack of the model has this many layers (a seq2seq encoder and decoder alike), or it is refused.
"""
from __future__ import annotations

from typing import Any

UNSET = ""  # TOML has no null: an empty string leaves a key unset in that layer


def split_per_layer(data: Any) -> Any:
    """A model table with `attention.per_layer` -> the same with one attention table per layer."""
    if not isinstance(data, dict) or not isinstance(data.get("attention"), dict):
        return data
    attention = dict(data["attention"])
    table = attention.pop("per_layer", None)
    if table is None:
        return data
    if not isinstance(table, dict) or not table:
        raise ValueError("attention.per_layer is a table of lists, one value per layer, e.g. window = [32, 64, 128, 256]")
    counts = {data.get("n_layers", 4)} | {data[k] for k in ("encoder_layers", "decoder_layers") if data.get(k)}
    if len(counts) != 1:
        raise ValueError(f"attention.per_layer needs every stack to have the same number of layers; "
                         f"n_layers / encoder_layers / decoder_layers give {sorted(counts)}")
    n = counts.pop()
    for key, values in table.items():
        if not isinstance(values, list) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, list) else "one value"
            raise ValueError(f"attention.per_layer.{key} has {got}; the model has {n} layers: give one value per "
                             f"layer (\"\" leaves it unset in a layer)")
    layers = []
    for i in range(n):
        layer = dict(attention)
        for key, values in table.items():
            if values[i] == UNSET:
                layer.pop(key, None)
            else:
                layer[key] = values[i]
        layers.append(layer)
    return {**data, "attention": layers[0], "attention_layers": layers}
