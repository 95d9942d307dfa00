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


def raffel_bucket(n: int, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> int:
    """T5's bucket of n = query - key, written out from Raffel et al. 2020 (mesh_tensorflow's
    _relative_position_bucket): half the buckets per sign when bidirectional (keys after the
    query in the upper half), exact below max_exact, then log-spaced up to max_distance."""
    ret = 0
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(large, num_buckets - 1)


T5_DISTANCES = [0, 1, 2, 7, 8, 9, 11, 12, 15, 16, 20, 23, 24, 31, 32, 45, 46, 63, 64, 90, 91, 127, 128, 5000]
# the same values, pinned (32 buckets, max_distance 128)
T5_CAUSAL = [0, 1, 2, 7, 8, 9, 11, 12, 15, 16, 17, 18, 19, 21, 21, 23, 24, 26, 26, 29, 29, 31, 31, 31]
T5_BOTH_PAST = [0, 1, 2, 7, 8, 8, 8, 9, 9, 10, 10, 11, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 15, 15]
T5_BOTH_FUTURE = [0] + [16 + b for b in T5_BOTH_PAST[1:]]


def test_t5_buckets_by_hand():
    rel = torch.tensor(T5_DISTANCES)
    causal = t5_buckets(rel, causal=True, buckets=32, max_distance=128).tolist()
    assert causal == T5_CAUSAL == [raffel_bucket(n, bidirectional=False) for n in T5_DISTANCES]
    assert t5_buckets(-rel, causal=True, buckets=32, max_distance=128).tolist() == [0] * len(T5_DISTANCES)
    past = t5_buckets(rel, causal=False, buckets=32, max_distance=128).tolist()
    future = t5_buckets(-rel, causal=False, buckets=32, max_distance=128).tolist()
    assert past == T5_BOTH_PAST == [raffel_bucket(n, bidirectional=True) for n in T5_DISTANCES]
    assert future == T5_BOTH_FUTURE == [raffel_bucket(-n, bidirectional=True) for n in T5_DISTANCES]
    # every distance up to 300, both directions, another bucket count
    every = torch.arange(-300, 301)
    for buckets, max_distance in ((32, 128), (8, 16)):
        for causal in (True, False):
            got = t5_buckets(every, causal=causal, buckets=buckets, max_distance=max_distance).tolist()
            assert got == [raffel_bucket(n, bidirectional=not causal, num_buckets=buckets, max_distance=max_distance)
                           for n in every.tolist()], (buckets, causal)


def test_t5_bias_is_one_scalar_per_head_and_bucket_shared_by_layers():
    pos = scheme("t5", True, buckets=8, max_distance=16)
    bias = pos.bias(torch.arange(T), torch.arange(T))  # (1, H, T, T)
    for i in range(T):
        for j in range(max(0, i - 3), i + 1):
            assert torch.equal(bias[0, :, i, j], pos.table.weight[i - j])  # distances < 4 are exact buckets
