"""The dense kernel against the float64 oracle; GQA against MHA with repeated heads."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds
from tfx.nn.attention.base import AttnSpec, reference_attention
from tfx.registry import ATTENTION

import_kinds()


def kernel(kind: str = "dense"):
    k = ATTENTION.build(ATTENTION.config_model(kind)(), n_heads=4, d_head=8)
    return k.eval()


def qkv(B=2, H=4, Hkv=4, Tq=7, Tk=7, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64)
    return q, k, v


CASES = {
    "bidirectional": dict(causal=False),
    "causal": dict(causal=True),
    "causal-after-cache": dict(causal=True, Tq=3, Tk=10),      # queries at positions 7..9
    "one-query-decode": dict(causal=True, Tq=1, Tk=10),
    "padding": dict(causal=False, pad=True),
    "causal-padding": dict(causal=True, pad=True),
    "bias": dict(causal=False, bias=True),
    "causal-bias-cache": dict(causal=True, bias=True, Tq=3, Tk=10),
    "gqa": dict(causal=True, Hkv=2),
    "mqa-padding": dict(causal=False, Hkv=1, pad=True),
}


@pytest.mark.parametrize("name", CASES)
def test_dense_matches_reference(name):
    c = dict(CASES[name])
    causal, pad, bias = c.pop("causal"), c.pop("pad", False), c.pop("bias", False)
    q, k, v = qkv(**c)
    Tq, Tk = q.shape[2], k.shape[2]
    spec = AttnSpec(
        q_pos=torch.arange(Tk - Tq, Tk), k_pos=torch.arange(Tk), causal=causal,
        key_padding_mask=(torch.arange(Tk)[None, :] < torch.tensor([[Tk], [Tk - 3]])) if pad else None,
        bias=torch.randn(1, 4, Tq, Tk, dtype=torch.float64) if bias else None,
    )
    expected = reference_attention(q, k, v, spec)
    got = kernel()(q, k, v, spec)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_reference_is_softmax_attention_by_hand():
    """The oracle itself on a 1-head case computed with explicit loops."""
    q, k, v = qkv(B=1, H=1, Hkv=1, Tq=3, Tk=3, D=2)
    spec = AttnSpec(q_pos=torch.arange(3), k_pos=torch.arange(3), causal=True)
    out = reference_attention(q, k, v, spec)
    for t in range(3):
        scores = torch.stack([q[0, 0, t] @ k[0, 0, s] / 2 ** 0.5 for s in range(t + 1)])
        w = torch.softmax(scores, 0)
        torch.testing.assert_close(out[0, 0, t], (w[:, None] * v[0, 0, : t + 1]).sum(0))


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(Hkv):
    q, k, v = qkv(Hkv=Hkv)
    spec = AttnSpec(q_pos=torch.arange(7), k_pos=torch.arange(7), causal=True)
    rep = 4 // Hkv
    gqa = kernel()(q, k, v, spec)
    mha = kernel()(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), spec)
    torch.testing.assert_close(gqa, mha, rtol=1e-12, atol=1e-12)
