"""model.ffn = "dwconv" (EfficientViT's feed-forward): the depthwise convolution by its definition on
the patch grid and on text, [CLS] passing through, and padding adding nothing. Causality and
generation (which recomputes the prefix) are in tests/test_model.py's dwconv variant."""
from __future__ import annotations

import torch

from tfx.nn.attention.base import AttnSpec
from tfx.nn.dwconv import DepthwiseMix


def spec(T, **kw):
    pos = torch.arange(T)
    return AttnSpec(q_pos=pos, k_pos=pos, **{"causal": False, **kw})


def test_the_2d_convolution_sums_each_channels_3x3_neighbourhood_and_skips_the_prefix():
    torch.manual_seed(0)
    mix = DepthwiseMix(5, two_d=True).double()
    rows, cols = 3, 4
    h = torch.randn(2, 1 + rows * cols, 5, dtype=torch.float64)
    out = mix(h, spec(1 + rows * cols, grid=(rows, cols, 1)))
    torch.testing.assert_close(out[:, 0], h[:, 0])  # [CLS] is not a patch
    w = mix.weight[:, 0]  # (C, 3, 3)
    for r in range(rows):
        for c in range(cols):
            expected = mix.bias.clone().expand(2, -1).clone()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= r + dr < rows and 0 <= c + dc < cols:  # zero padding outside the grid
                        expected = expected + w[:, dr + 1, dc + 1] * h[:, 1 + (r + dr) * cols + c + dc]
            torch.testing.assert_close(out[:, 1 + r * cols + c], expected)


def test_the_1d_convolution_takes_the_neighbours_or_only_the_past():
    torch.manual_seed(1)
    mix = DepthwiseMix(3, two_d=False).double()
    h = torch.randn(1, 6, 3, dtype=torch.float64)
    w = mix.weight[:, 0]  # (C, 3)
    both, past = mix(h, spec(6)), mix(h, spec(6, causal=True))
    at = lambda t: h[:, t] if 0 <= t < 6 else torch.zeros_like(h[:, 0])  # noqa: E731
    for t in range(6):
        torch.testing.assert_close(both[:, t], mix.bias + w[:, 0] * at(t - 1) + w[:, 1] * at(t) + w[:, 2] * at(t + 1))
        torch.testing.assert_close(past[:, t], mix.bias + w[:, 0] * at(t - 2) + w[:, 1] * at(t - 1) + w[:, 2] * at(t))


def test_padding_adds_nothing_to_real_tokens():
    from tfx.config import validate
    from tfx.families import build_model

    recipe = validate({"family": "classifier", "data": {"train": "x.tsv"},
                       "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "context": 16, "ffn": "dwconv",
                                 "pool": "mean", "dropout": 0.0}})
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "labels.json").write_text(json.dumps(["a", "b"]))
        torch.manual_seed(0)
        model = build_model(recipe, vocab_size=20, run_dir=d).double().eval()
    tokens = torch.tensor([[1, 5, 6, 7, 0, 0], [1, 8, 9, 10, 11, 12]])
    mask = tokens != 0
    both = model(tokens, mask)
    alone = model(tokens[:1, :4], mask[:1, :4])
    torch.testing.assert_close(both[:1], alone)
