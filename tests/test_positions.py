"""The relative position schemes against their definitions, written out pair by pair in float64."""
from __future__ import annotations

import math

import pytest
import torch

from tfx.config import import_kinds
from tfx.nn.attention.base import AttnSpec
from tfx.nn.relative import t5_buckets
from tfx.registry import ATTENTION, POSITION

import_kinds()
B, H, D, T = 2, 2, 4, 6


def scheme(kind: str, causal: bool, **params):
    torch.manual_seed(0)
    pos = POSITION.build(POSITION.config_model(kind)(**params), d_model=H * D, d_head=D, n_heads=H, max_len=16,
                         causal=causal, n_layers=2).double()
    for p in pos.parameters():  # non-trivial values everywhere (some start at zero)
        torch.nn.init.normal_(p, std=0.5)
    return pos


def attend(pos, q, k, v, causal, layer=1):
    spec = AttnSpec(q_pos=torch.arange(T), k_pos=torch.arange(T), causal=causal, bias=pos.bias(
        torch.arange(T), torch.arange(T)))
    q2, spec = pos.adjust(q, spec, layer)
    dense = ATTENTION.build(ATTENTION.config_model("dense")(), n_heads=H, d_head=D)
    return dense(q2, k, v, spec)


def by_hand(score, value, causal):
    """out[b,h,i] = sum_j softmax_j(score(b,h,i,j)) * value(b,h,i,j) over the allowed j."""
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                js = [j for j in range(T) if j <= i or not causal]
                w = torch.softmax(torch.stack([score(b, h, i, j) for j in js]), 0)
                out[b, h, i] = sum(w[n] * value(b, h, i, j) for n, j in enumerate(js))
    return out


def qkv():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_shaw_adds_clipped_relative_vectors_to_keys_and_values(causal):
    pos, (q, k, v) = scheme("shaw", causal, max_distance=2), qkv()
    aK, aV = pos.keys[1], pos.values[1]

    def r(i, j):
        return max(-2, min(2, j - i)) + 2

    expected = by_hand(lambda b, h, i, j: q[b, h, i] @ (k[b, h, j] + aK[r(i, j)]) / math.sqrt(D),
                       lambda b, h, i, j: v[b, h, j] + aV[r(i, j)], causal)
    torch.testing.assert_close(attend(pos, q, k, v, causal), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_xl_scores_are_content_plus_relative_position_terms(causal):
    pos, (q, k, v) = scheme("xl", causal), qkv()
    u, vb, W = pos.u, pos.v, pos.proj[1].weight  # W: (H*D, d_model)

    def rel(i, j, h):
        d = torch.tensor(float(i - j))
        freqs = torch.exp(torch.arange(0, H * D, 2, dtype=torch.float64) * (-math.log(10000.0) / (H * D)))
        emb = torch.stack([torch.sin(d * freqs), torch.cos(d * freqs)], 1).flatten()  # sin, cos interleaved
        return (W @ emb).view(H, D)[h]

    expected = by_hand(
        lambda b, h, i, j: ((q[b, h, i] + u[h]) @ k[b, h, j] + (q[b, h, i] + vb[h]) @ rel(i, j, h)) / math.sqrt(D),
        lambda b, h, i, j: v[b, h, j], causal)
    torch.testing.assert_close(attend(pos, q, k, v, causal), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_da_rescales_relu_scores_by_a_learned_sigmoid_of_distance(causal):
    pos, (q, k, v) = scheme("da", causal), qkv()
    w, vv = pos.w[1], pos.v[1]

    def score(b, h, i, j):
        r = w[h] * abs(i - j)
        scale = (1 + torch.exp(vv[h])) / (1 + torch.exp(vv[h] - r))
        return torch.relu(q[b, h, i] @ k[b, h, j] / math.sqrt(D)) * scale

    expected = by_hand(score, lambda b, h, i, j: v[b, h, j], causal)
    torch.testing.assert_close(attend(pos, q, k, v, causal), expected)


def test_da_starts_as_plain_relu_attention():
    pos = POSITION.build(POSITION.config_model("da")(), d_model=8, d_head=4, n_heads=2, max_len=16, causal=True,
                         n_layers=1)
    spec = pos.adjust(torch.zeros(1, 2, 3, 4), AttnSpec(q_pos=torch.arange(3), k_pos=torch.arange(3), causal=True),
                      0)[1]
    assert torch.equal(spec.score_scale, torch.ones(1, 2, 3, 3))


def test_t5_buckets_by_hand():
    rel = torch.tensor([0, 1, 15, 16, 20, 127, 128, 5000])
    causal = t5_buckets(rel, causal=True, buckets=32, max_distance=128).tolist()
    assert causal[:4] == [0, 1, 15, 16] and causal[-2:] == [31, 31]
    assert 16 < causal[4] < causal[5] <= 31
    both = t5_buckets(torch.cat([rel, -rel[1:]]), causal=False, buckets=32, max_distance=128).tolist()
    assert both[:3] == [0, 1, 9] and both[7] == 15           # 8 exact buckets, then log-spaced to 15
    assert both[8] == 17 and both[-1] == 31                     # negative distances: 16 + bucket


def test_t5_bias_is_one_scalar_per_head_and_bucket_shared_by_layers():
    pos = scheme("t5", True, buckets=8, max_distance=16)
    bias = pos.bias(torch.arange(T), torch.arange(T))  # (1, H, T, T)
    for i in range(T):
        for j in range(max(0, i - 3), i + 1):
            assert torch.equal(bias[0, :, i, j], pos.table.weight[i - j])  # distances < 4 are exact buckets
