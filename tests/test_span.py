"""Adaptive attention span (Sukhbaatar et al., 2019): the soft ramp mask by hand, local == dense
under the same spans, the span penalty in the loss, and the spans learnable and reported."""
from __future__ import annotations

import math

import pytest
import torch

from tfx.config import import_kinds
from tfx.nn.attention.base import AttnSpec, aux_losses
from tfx.registry import ATTENTION

import_kinds()
H, D, T = 3, 4, 20
SPAN = {"adaptive_span": True, "max_span": 8, "span_ramp": 4, "span_init": 0.5, "span_penalty": 0.01}


def kernel(kind: str, **extra):
    k = ATTENTION.build(ATTENTION.config_model(kind)(**SPAN, **extra), n_heads=H, d_head=D, max_len=64).double()
    with torch.no_grad():
        k.span.z.copy_(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))  # spans 0, 4, 8 tokens
    return k.eval()


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, H, T, D, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_dense_span_reweights_by_the_soft_ramp(causal):
    q, k, v = qkv()
    spec = AttnSpec(q_pos=torch.arange(T), k_pos=torch.arange(T), causal=causal)
    got = kernel("dense")(q, k, v, spec)
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs().double()
    spans = torch.tensor([0.0, 4.0, 8.0], dtype=torch.float64)[:, None, None]
    m = ((4 + spans - dist) / 4).clamp(0, 1)  # (H, T, T)
    if causal:
        m = m * (torch.arange(T)[None, :] <= torch.arange(T)[:, None])
    w = m * torch.exp(q @ k.transpose(-1, -2) / math.sqrt(D))
    expected = (w / w.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("causal", [True, False])
def test_local_span_equals_dense_span_when_the_window_covers_it(causal):
    q, k, v = qkv(1)
    spec = AttnSpec(q_pos=torch.arange(T), k_pos=torch.arange(T), causal=causal)
    torch.testing.assert_close(kernel("local", window=12)(q, k, v, spec), kernel("dense")(q, k, v, spec))


def test_span_learns_and_its_penalty_joins_the_loss():
    k = kernel("dense").train()
    q, kk, v = qkv(2)
    spec = AttnSpec(q_pos=torch.arange(T), k_pos=torch.arange(T), causal=True)
    penalty = aux_losses(k)
    assert penalty is not None and float(penalty.detach()) == pytest.approx(0.01 * 4.0)  # λ · mean(0, 4, 8)
    k(q, kk, v, spec).pow(2).sum().backward()
    assert k.span.z.grad is not None and k.span.z.grad[1:].abs().sum() > 0
    assert aux_losses(k.eval()) is None  # no penalty outside training


def test_spans_are_reported_per_layer_and_head():
    from tfx.config import validate
    from tfx.families import build_model
    from tfx.run import learned_spans

    recipe = validate({"data": {"train": "x.txt"}, "model": {
        "d_model": 12, "n_layers": 2, "n_heads": 3, "context": 16,
        "attention": {"kind": "dense", **SPAN}}})
    spans = learned_spans(build_model(recipe, vocab_size=11))
    assert spans == [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
