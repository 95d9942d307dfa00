"""Autograd through the dense kernel against the hand-derived backward pass of softmax attention
(dV = Aᵀ·dO, dA = dO·Vᵀ, dS = A ∘ (dA − rowsum(dA ∘ A)), dQ = dS·K/√d, dK = dSᵀ·Q/√d), in float64,
with a causal mask and key padding; and the hand-derived reference against autograd of the oracle."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds
from tfx.nn.attention.base import AttnSpec, reference_attention, reference_attention_backward
from tfx.registry import ATTENTION

import_kinds()
B, H, D = 2, 3, 8

# (queries' positions, keys' positions): a full sequence, and 4 new queries after a cache of 3
CASES = {"full": (torch.arange(7), torch.arange(7)), "cached": (torch.arange(3, 7), torch.arange(7))}
# the second sequence pads its last two keys (right padding: every query keeps key 0)
PADDING = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])


def inputs(tq: int, tk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, t, D, generator=g, dtype=torch.float64) for t in (tq, tk, tk))
    d_out = torch.randn(B, H, tq, D, generator=g, dtype=torch.float64)
    return q, k, v, d_out


def explicit_mask(q_pos, k_pos, causal: bool, padding):
    """(B, 1, Tq, Tk) True = attend, built here by hand: key j allowed if not padded (and j <= i if causal)."""
    mask = torch.ones(B, 1, len(q_pos), len(k_pos), dtype=torch.bool)
    for b in range(B):
        for a, i in enumerate(q_pos.tolist()):
            for c, j in enumerate(k_pos.tolist()):
                mask[b, 0, a, c] = (padding is None or bool(padding[b, c])) and (not causal or j <= i)
    return mask


def grads(fn, q, k, v, d_out):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), d_out)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_dense_kernel_gradients_equal_the_hand_derived_backward(case, causal, padded):
    q_pos, k_pos = CASES[case]
    padding = PADDING if padded else None
    q, k, v, d_out = inputs(len(q_pos), len(k_pos))
    spec = AttnSpec(q_pos=q_pos, k_pos=k_pos, causal=causal, key_padding_mask=padding)
    dense = ATTENTION.build(ATTENTION.config_model("dense")(), n_heads=H, d_head=D).eval()
    got = grads(lambda q, k, v: dense(q, k, v, spec), q, k, v, d_out)
    expected = reference_attention_backward(q, k, v, d_out, mask=explicit_mask(q_pos, k_pos, causal, padding))
    for name, g, e in zip("qkv", got, expected):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=f"d{name}")
    if padded:  # padded keys get no gradient at all
        assert expected[1][1, :, 5:].abs().max() == 0 and expected[2][1, :, 5:].abs().max() == 0


@pytest.mark.parametrize("causal", [True, False])
def test_hand_derived_backward_equals_autograd_of_the_reference(causal):
    q_pos, k_pos = CASES["cached"]
    q, k, v, d_out = inputs(len(q_pos), len(k_pos), seed=1)
    spec = AttnSpec(q_pos=q_pos, k_pos=k_pos, causal=causal, key_padding_mask=PADDING)
    auto = grads(lambda q, k, v: reference_attention(q, k, v, spec), q, k, v, d_out)
    by_hand = reference_attention_backward(q, k, v, d_out, mask=explicit_mask(q_pos, k_pos, causal, PADDING))
    for name, a, h in zip("qkv", auto, by_hand):
        torch.testing.assert_close(h, a, rtol=1e-10, atol=1e-12, msg=f"d{name}")


def test_a_row_with_no_allowed_key_gives_zero_gradients():
    q, k, v, d_out = inputs(2, 3, seed=2)
    mask = torch.tensor([[True, True, False], [False, False, False]])[None, None]
    dq, dk, dv = reference_attention_backward(q, k, v, d_out, mask=mask)
    assert dq[:, :, 1].abs().max() == 0 and dk[:, :, 2].abs().max() == 0 and dv[:, :, 2].abs().max() == 0
    assert torch.isfinite(dq).all() and dq[:, :, 0].abs().max() > 0
