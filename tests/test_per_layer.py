"""Per-layer attention settings ([model.attention.per_layer], tfx/config_layers.py): each layer's
kernel gets its own values and kind, the saved recipe keeps them, and a list of the wrong length
or a kind a layer cannot use is refused with the reason."""
from __future__ import annotations

import tomllib

import pytest

from tfx.config import import_kinds, recipe_dict, to_toml, validate
from tfx.errors import UsageError
from tfx.families import build_model
from tfx.nn.attention.dense import DenseAttention
from tfx.nn.attention.local import LocalAttention

import_kinds()


def recipe(per_layer: dict, family: str = "lm", **model):
    data = {"train": "x.txt"} if family == "lm" else {"train": "x.tsv"}
    return validate({"family": family, "data": data,
                     "model": {"n_layers": 4, "d_model": 16, "n_heads": 2, "context": 16, **model,
                               "attention": {"kind": "local", "window": 8, "per_layer": per_layer}}})


def test_each_layer_gets_its_own_window_and_kind():
    r = recipe({"window": [2, 4, "", ""], "kind": ["local", "local", "dense", "local"]})
    stack = build_model(r, vocab_size=11).stack
    kernels = [block.attn.kernel for block in stack.blocks]
    assert [type(k) for k in kernels] == [LocalAttention, LocalAttention, DenseAttention, LocalAttention]
    assert [kernels[0].window, kernels[1].window, kernels[3].window] == [2, 4, 128]  # "": unset, the default
    assert r.model.attention.kind == "local" and r.model.attention.window == 2  # the first layer's


def test_the_saved_recipe_keeps_every_layer():
    r = recipe({"window": [2, 3, 5, 7]})
    again = validate(tomllib.loads(to_toml(recipe_dict(r))))
    assert again.model.attention_layers == r.model.attention_layers
    assert [a.window for a in again.model.attention_layers] == [2, 3, 5, 7]


@pytest.mark.parametrize("per_layer, model, reason", [
    ({"window": [2, 3, 5]}, {}, r"per_layer.window has 3 values; the model has 4 layers"),
    ({"window": 3}, {}, r"per_layer.window has one value"),
    ({"kind": ["local", "local", "window", "local"]}, {}, "'window' works on a grid of image patches"),
    ({"kind": ["local", "local", "dense", "local"]}, {}, r"unknown key 'model.attention.window \(layer 2, a dense layer\)'"),
    ({"window": [1, 2, 3, 4]}, {"encoder_layers": 2}, "the same number of layers"),
])
def test_wrong_per_layer_settings_are_refused_with_the_reason(per_layer, model, reason):
    family = "seq2seq" if model else "lm"
    with pytest.raises(UsageError, match=reason):
        recipe(per_layer, family, **model)
