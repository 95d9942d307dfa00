"""The fused, chunked output projection + cross-entropy equals torch's, value and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tfx.nn.loss import linear_cross_entropy


def problem(dtype=torch.float64, n=37, d=12, v=50):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_(True)
    target = torch.randint(0, v, (n,), generator=g)
    target[[0, 5, n - 1]] = -100  # ignored rows
    return h, w, target


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("chunk", [None, 1, 8])
def test_value_and_gradients_equal_torchs(smoothing, chunk):
    h, w, target = problem()
    ours = linear_cross_entropy(h, w, target, label_smoothing=smoothing, chunk=chunk)
    ref = F.cross_entropy(F.linear(h, w), target, ignore_index=-100, reduction="sum", label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    scale = 0.37  # an upstream gradient other than 1 (the loop divides by the token count)
    got = torch.autograd.grad(ours * scale, (h, w))
    want = torch.autograd.grad(ref * scale, (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got[0][[0, 5, 36]].abs().max() == 0  # ignored rows get no gradient


def test_float32_no_grad_and_a_fully_ignored_batch():
    h, w, target = problem(torch.float32, n=300, d=32, v=1000)
    ref = F.cross_entropy(F.linear(h, w), target, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(linear_cross_entropy(h, w, target, label_smoothing=0.1), ref)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, target, label_smoothing=0.1, chunk=7), ref.detach())
    none = linear_cross_entropy(h, w, torch.full((300,), -100), label_smoothing=0.1)
    none.backward()
    assert float(none.detach()) == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(h, w, target, label_smoothing=1.5)
