"""The clustering kernels (Reformer LSH, Routing Transformer) against the float64 oracle.

Both reduce to dense attention (under their own q/k convention) with a single bucket / cluster
covering the sequence; with several, the oracle is given the pattern of the papers' hashing or
routing, computed here from the kernel's random rotations / centroids (angular LSH, Kitaev et al.
2020: bucket = argmax([xR; -xR]); balanced routing, Roy et al. 2021: each cluster takes the w
queries and the w keys nearest its centroid), so the chunk windows, duplicate counting and
scatter-back are checked too, and the hashing and routing themselves against their definitions.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tfx.config import import_kinds
from tfx.nn.attention.base import AttnSpec, reference_attention
from tfx.registry import ATTENTION

import_kinds()

CASES = {
    "bidirectional": dict(causal=False),
    "causal": dict(causal=True),
    "padding": dict(causal=False, pad=True),
    "causal-padding": dict(causal=True, pad=True),
    "gqa-causal": dict(causal=True, Hkv=1),
    "bias": dict(causal=False, bias=True),
    "causal-bias-padding": dict(causal=True, bias=True, pad=True),
}


def make(kind: str, H: int = 2, D: int = 8, **params):
    cfg = ATTENTION.config_model(kind)(**params)
    return ATTENTION.build(cfg, n_heads=H, d_head=D, max_len=64).double().eval()


def inputs(B=2, H=2, Hkv=2, T=13, D=8, causal=False, pad=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    lengths = torch.tensor([T, T - 4] + [T] * (B - 2))
    spec = AttnSpec(
        q_pos=torch.arange(T), k_pos=torch.arange(T), causal=causal,
        key_padding_mask=(torch.arange(T)[None, :] < lengths[:, None]) if pad else None,
        bias=torch.randn(1, H, T, T, generator=g, dtype=torch.float64) if bias else None,
    )
    return q, k, v, spec


def row(spec: AttnSpec, b: int) -> AttnSpec:
    pad = spec.key_padding_mask
    return AttnSpec(q_pos=spec.q_pos, k_pos=spec.k_pos, causal=spec.causal,
                    key_padding_mask=None if pad is None else pad[b:b + 1], bias=spec.bias)


def lsh_oracle(q, v, spec, union: torch.Tensor | None = None):
    """Shared-QK attention: keys = unit queries, a token sees itself only when it sees nothing
    else; `union` (B, H, T, T) restricts the pairs (the union of the rounds' windows)."""
    B, H, T, D = q.shape
    keys = F.normalize(q, dim=-1)
    out = torch.zeros_like(q)
    eye = torch.eye(T, dtype=torch.bool)
    causal = spec.k_pos[None, :] <= spec.q_pos[:, None] if spec.causal else torch.ones(T, T, dtype=torch.bool)
    for b in range(B):
        pad = spec.key_padding_mask[b][None, :] if spec.key_padding_mask is not None else True
        for h in range(H):
            allowed = causal & pad & (union[b, h] if union is not None else True)
            alone = ~(allowed & ~eye).any(-1)
            pattern = (allowed & ~eye) | (eye & alone[:, None])
            s = row(spec, b)
            if s.bias is not None:
                s = AttnSpec(q_pos=s.q_pos, k_pos=s.k_pos, causal=s.causal,
                             key_padding_mask=s.key_padding_mask, bias=s.bias[:, h:h + 1])
            hv = h // (H // v.shape[1])
            out[b, h] = reference_attention(q[b:b + 1, h:h + 1], keys[b:b + 1, h:h + 1],
                                            v[b:b + 1, hv:hv + 1], s, pattern)[0, 0]
    return out


# ---------------------------------------------------------------- lsh


@pytest.mark.parametrize("n_hashes", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_lsh_one_bucket_is_dense_shared_qk(case, n_hashes):
    c = CASES[case]
    q, k, v, spec = inputs(**c)
    got = make("lsh", n_buckets=1, n_hashes=n_hashes, chunk=64)(q, k, v, spec)
    torch.testing.assert_close(got, lsh_oracle(q, v, spec), rtol=1e-10, atol=1e-10)


def lsh_hash_by_hand(kernel, x) -> torch.Tensor:
    """Angular LSH (Kitaev et al. 2020, section 2) token by token: project the unit vector on the
    kernel's random rotation R (D, n_buckets/2) of its head and round, bucket = argmax([xR; -xR])."""
    B, H, T, D = x.shape
    n = kernel.n_buckets(T)
    rot = kernel.rotations(H, D, n, x.device, x.dtype)  # (H, D, R, n/2): the kernel's random rotations
    unit = F.normalize(x, dim=-1)
    out = torch.zeros(B, H, kernel.cfg.n_hashes, T, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            for r in range(kernel.cfg.n_hashes):
                for t in range(T):
                    proj = [float(unit[b, h, t] @ rot[h, :, r, i]) for i in range(n // 2)]
                    both = proj + [-p for p in proj]
                    out[b, h, r, t] = max(range(n), key=both.__getitem__)
    return out


def lsh_union(kernel, q) -> torch.Tensor:
    """(B, H, T, T) pairs in a common window of some round, from hashes computed by hand."""
    B, H, T, D = q.shape
    c = min(kernel.cfg.chunk, T)
    buckets = lsh_hash_by_hand(kernel, q)  # (B, H, R, T)
    union = torch.zeros(B, H, T, T, dtype=torch.bool)
    for r in range(buckets.shape[2]):
        order = (buckets[:, :, r] * T + torch.arange(T)).argsort(-1)
        chunk = torch.empty_like(order).scatter_(-1, order, torch.arange(T).expand_as(order)) // c
        diff = chunk[..., :, None] - chunk[..., None, :]
        same = buckets[:, :, r, :, None] == buckets[:, :, r, None, :]
        union |= same & ((diff == 0) | (diff == 1))
    return union


@pytest.mark.parametrize("case", ["bidirectional", "causal-padding", "causal-bias-padding"])
@pytest.mark.parametrize("params", [dict(n_buckets=4, n_hashes=3, chunk=4), dict(n_buckets=2, n_hashes=2, chunk=3)])
def test_lsh_equals_oracle_on_union_of_windows(case, params):
    """Several buckets, chunks and rounds: softmax over the union of windows, each key once."""
    q, k, v, spec = inputs(T=16, **CASES[case])
    kernel = make("lsh", **params)
    union = lsh_union(kernel, q)
    assert not union.all() and union.any(dim=-1).all()
    torch.testing.assert_close(kernel(q, k, v, spec), lsh_oracle(q, v, spec, union), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_buckets, n_hashes", [(4, 3), (8, 2), (2, 1)])
def test_lsh_hash_is_argmax_of_the_random_rotation_and_its_negation(n_buckets, n_hashes):
    q, _, _, _ = inputs(T=16)
    kernel = make("lsh", n_buckets=n_buckets, n_hashes=n_hashes, chunk=4)
    unit = F.normalize(q, dim=-1)
    got = kernel.buckets(unit, n_buckets)
    assert torch.equal(got, lsh_hash_by_hand(kernel, q))
    assert len(got.unique()) == n_buckets  # every bucket is used: the hash is not degenerate
    # the definition's consequences: -x lands in the opposite bucket, and the scale does not matter
    assert torch.equal(kernel.buckets(-unit, n_buckets), (got + n_buckets // 2) % n_buckets)
    assert torch.equal(kernel.buckets(F.normalize(3.7 * q, dim=-1), n_buckets), got)
    rot = kernel.rotations(2, 8, n_buckets, q.device, q.dtype)
    assert rot.shape == (2, 8, n_hashes, n_buckets // 2) and kernel.rotations(2, 8, n_buckets, q.device, q.dtype) is rot
    assert rot.std() > 0.5  # Gaussian entries (a random rotation up to scale), fixed in eval


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_attends_only_within_a_bucket(causal):
    """Two interleaved groups along +u and -u always hash apart: one group's values never reach
    the other, whatever the rotations (training mode draws fresh ones)."""
    B, H, T, D = 1, 2, 16, 8
    u = F.normalize(torch.randn(H, D, dtype=torch.float64), dim=-1)
    scale = torch.rand(T, dtype=torch.float64) + 0.5
    sign = torch.tensor([1.0, -1.0] * (T // 2), dtype=torch.float64)
    q = (sign * scale)[None, None, :, None] * u[None, :, None, :]  # (1, H, T, D)
    v = torch.randn(B, H, T, D, dtype=torch.float64)
    v2 = v.clone()
    v2[:, :, sign < 0] = torch.randn_like(v2[:, :, sign < 0])
    spec = AttnSpec(q_pos=torch.arange(T), k_pos=torch.arange(T), causal=causal)
    kernel = make("lsh", n_buckets=4, n_hashes=2, chunk=4)
    for mode in (kernel.eval(), kernel.train()):
        a, b = mode(q, q, v, spec), mode(q, q, v2, spec)
        torch.testing.assert_close(a[:, :, sign > 0], b[:, :, sign > 0], rtol=0, atol=0)
        assert not torch.allclose(a[:, :, sign < 0], b[:, :, sign < 0])


def test_lsh_ignores_k_and_rotations_train_vs_eval():
    q, k, v, spec = inputs(T=24)
    kernel = make("lsh", n_buckets=4, n_hashes=2, chunk=4, seed=3)
    torch.testing.assert_close(kernel(q, k, v, spec), kernel(q, torch.randn_like(k), v, spec), rtol=0, atol=0)
    kernel.train()
    torch.manual_seed(0)
    a = kernel(q, k, v, spec)
    torch.manual_seed(0)
    torch.testing.assert_close(kernel(q, k, v, spec), a, rtol=0, atol=0)  # training RNG reproduces
    assert not torch.allclose(kernel(q, k, v, spec), a)  # fresh rotations per call


def test_lsh_config_and_auto_buckets():
    with pytest.raises(Exception):
        ATTENTION.config_model("lsh")(n_buckets=3)
    kernel = make("lsh", chunk=8)
    assert kernel.n_buckets(64) == 16 and kernel.n_buckets(5) == 2
    assert not ATTENTION.get("lsh").exact and not ATTENTION.get("lsh").supports_cache


# ---------------------------------------------------------------- routing


def route_by_hand(kernel, x, valid=None) -> torch.Tensor:
    """Balanced routing (Roy et al. 2021, section 4.1) token by token: cluster c takes the w tokens
    with the highest cosine to its centroid mu_c (kernel.centroids), w = ceil(T / C) unless set;
    padding tokens only when nothing else is left. Returns (B, H, C, w) token indices, sorted."""
    B, H, T, D = x.shape
    mu = kernel.centroids
    C, w = mu.shape[1], kernel.cfg.window or math.ceil(T / mu.shape[1])
    w = min(w, T)
    out = torch.zeros(B, H, C, w, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            for c in range(C):
                cos = [float(F.cosine_similarity(x[b, h, t], mu[h, c], dim=0)) for t in range(T)]
                real = lambda t: valid is None or bool(valid[b, t])  # noqa: E731
                ranked = sorted(range(T), key=lambda t: (not real(t), -cos[t]))
                out[b, h, c] = torch.tensor(sorted(ranked[:w]))
    return out


def routing_oracle(kernel, q, k, v, spec):
    """Routing under its convention (q, k scaled to norm sqrt(D)): query i gets the softmax over
    the keys of every cluster that picked it, a key counted once per such cluster (bias log n)."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    qn = F.normalize(q, dim=-1)
    kn = F.normalize(k.repeat_interleave(rep, 1), dim=-1)
    qi, kj = route_by_hand(kernel, qn, spec.key_padding_mask), route_by_hand(kernel, kn, spec.key_padding_mask)
    C = qi.shape[2]
    in_q = torch.zeros(B, H, C, T).scatter_(-1, qi, 1.0)
    in_k = torch.zeros(B, H, C, T).scatter_(-1, kj, 1.0)
    count = torch.einsum("bhci,bhcj->bhij", in_q, in_k).double()  # clusters holding both
    out = torch.zeros_like(q)
    for b in range(B):
        s = row(spec, b)
        bias = count[b:b + 1].log()
        bias = bias if s.bias is None else bias + s.bias
        s = AttnSpec(q_pos=s.q_pos, k_pos=s.k_pos, causal=s.causal, key_padding_mask=s.key_padding_mask, bias=bias)
        out[b] = reference_attention(qn[b:b + 1] * math.sqrt(D), kn[b:b + 1] * math.sqrt(D),
                                     v[b:b + 1].repeat_interleave(rep, 1), s)[0]
    return out


@pytest.mark.parametrize("case", CASES)
def test_routing_one_cluster_is_dense_on_unit_rms_qk(case):
    q, k, v, spec = inputs(**CASES[case])
    D = q.shape[-1]
    rep = q.shape[1] // k.shape[1]
    expected = reference_attention(F.normalize(q, dim=-1) * math.sqrt(D),
                                   F.normalize(k, dim=-1).repeat_interleave(rep, 1) * math.sqrt(D), v, spec)
    got = make("routing", n_clusters=1)(q, k, v, spec)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["bidirectional", "causal-padding", "causal-bias-padding", "gqa-causal"])
def test_routing_equals_oracle_with_several_clusters(case):
    q, k, v, spec = inputs(T=16, **CASES[case])
    kernel = make("routing", n_clusters=4, window=5)
    torch.testing.assert_close(kernel(q, k, v, spec), routing_oracle(kernel, q, k, v, spec), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["bidirectional", "padding"])
@pytest.mark.parametrize("n_clusters, window", [(4, 0), (3, 5)])
def test_routing_takes_the_nearest_w_tokens_of_each_centroid(case, n_clusters, window):
    q, k, _, spec = inputs(T=13, **CASES[case])
    kernel = make("routing", n_clusters=n_clusters, window=window)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    qi, kj = kernel.route(qn, kn, spec.key_padding_mask)
    w = window or math.ceil(13 / n_clusters)
    assert qi.shape == kj.shape == (2, 2, n_clusters, w)  # balanced: every cluster takes exactly w
    assert torch.equal(qi.sort(-1).values, route_by_hand(kernel, q, spec.key_padding_mask))
    assert torch.equal(kj.sort(-1).values, route_by_hand(kernel, k, spec.key_padding_mask))
    if case == "padding":  # 9 real tokens in row 1: no cluster of w <= 9 picks a padding token
        assert (qi[1] < 9).all() and (kj[1] < 9).all()


def test_routing_centroids_move_toward_data_in_training_only():
    H, D, T = 2, 8, 32
    kernel = make("routing", H=H, D=D, n_clusters=4, decay=0.5)
    u = F.normalize(torch.randn(H, D, dtype=torch.float64), dim=-1)
    x = u[None, :, None, :] + 0.05 * torch.randn(2, H, T, D, dtype=torch.float64)  # all near u
    spec = AttnSpec(q_pos=torch.arange(T), k_pos=torch.arange(T), causal=True)
    before = kernel.centroids.clone()
    kernel(x, x, x, spec)
    assert torch.equal(kernel.centroids, before)  # eval: frozen
    kernel.train()
    kernel(x, x, x, spec)
    nearest = torch.einsum("hcd,hd->hc", before, u).argmax(-1)  # the centroid the data went to
    cos = lambda m: torch.einsum("hcd,hd->hc", m, u).gather(1, nearest[:, None])  # noqa: E731
    assert (cos(kernel.centroids) > cos(before) + 0.1).all()
    torch.testing.assert_close(kernel.centroids.norm(dim=-1), torch.ones(H, 4, dtype=torch.float64))
    assert not kernel.centroids.requires_grad and "centroids" in kernel.state_dict()


# ---------------------------------------------------------------- both


KERNELS = {
    "lsh": dict(n_buckets=4, n_hashes=2, chunk=4),
    "routing": dict(n_clusters=3, window=6),
}


@pytest.mark.parametrize("kind", KERNELS)
def test_causal_by_gradient(kind):
    q, k, v, spec = inputs(B=1, T=12, causal=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    kernel = make(kind, **KERNELS[kind]).train()  # no dropout: training mode is just fresh rotations
    out = kernel(q, k, v, spec)
    for t in range(12):
        grads = torch.autograd.grad(out[:, :, t].sum(), (q, k, v), retain_graph=True, allow_unused=True)
        for g in grads:
            if g is not None:
                assert (g[:, :, t + 1:] == 0).all()
                assert torch.isfinite(g).all()


@pytest.mark.parametrize("kind", KERNELS)
def test_eval_is_deterministic(kind):
    q, k, v, spec = inputs(T=20, pad=True, causal=True)
    kernel = make(kind, **KERNELS[kind])
    a, b = kernel(q, k, v, spec), kernel(q, k, v, spec)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    again = make(kind, **KERNELS[kind])
    if kind == "lsh":  # a fresh kernel with the same seed hashes the same way
        assert torch.equal(again(q, k, v, spec), a)


@pytest.mark.parametrize("kind", KERNELS)
def test_low_precision_and_odd_lengths(kind):
    """float32 / bfloat16 inputs, lengths not a multiple of the chunk, down to one token."""
    kernel = ATTENTION.build(ATTENTION.config_model(kind)(**KERNELS[kind]), n_heads=2, d_head=8)
    for T, dtype in [(1, torch.float32), (7, torch.bfloat16), (11, torch.float32)]:
        q, k, v, spec = inputs(T=T, causal=True)
        out = kernel(q.to(dtype), k.to(dtype), v.to(dtype), spec)
        assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
