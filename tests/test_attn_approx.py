"""Approximate kernels against their exact limits: linear and Performer against their own quadratic
masked forms and across prefill + recurrent steps, Performer against softmax as features grow,
Linformer with identity projections against dense, additive against an explicit loop."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tfx.config import import_kinds
from tfx.nn.attention.base import AttnSpec, full_mask, reference_attention
from tfx.nn.attention.linear import RecurrentState
from tfx.registry import ATTENTION

import_kinds()
B, H, D = 2, 4, 8


def make(kind: str, max_len: int = 16, layer: int = 0, shared: dict | None = None, **params):
    cfg = ATTENTION.config_model(kind)(**params)
    return ATTENTION.build(cfg, n_heads=H, d_head=D, max_len=max_len, layer=layer, shared=shared).double().eval()


def qkv(T=13, Tq=None, Hkv=H, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq or T, D, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    return q, k, v


def make_spec(T, Tq=None, *, causal, pad=False):
    Tq = Tq or T
    mask = None
    if pad:  # row 1: the last 3 keys are padding
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, -3:] = False
    return AttnSpec(q_pos=torch.arange(T - Tq, T), k_pos=torch.arange(T), causal=causal, key_padding_mask=mask)


def quadratic(phi_q, phi_k, v, spec, eps):
    """φ(Q)φ(K)ᵀ masked and row-normalised: the definition the running sums must equal."""
    rep = phi_q.shape[1] // phi_k.shape[1]
    phi_k, v = phi_k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    a = phi_q @ phi_k.transpose(-1, -2)  # (B, H, Tq, Tk)
    mask = full_mask(spec, None, B)
    if mask is not None:
        a = a * mask
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def performer_phi(kernel, x):
    x = x * D ** -0.25
    m = kernel.weight.shape[0]
    return torch.exp(x @ kernel.weight.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)


def exact_phi(kernel, x):
    """The feature map written out from the papers, without stabilisers."""
    if kernel.cfg.kind == "performer":
        return performer_phi(kernel, x)
    return F.elu(x) + 1 if kernel.cfg.feature == "elu" else F.relu(x)


KERNELIZED = {
    "linear-elu": ("linear", dict(feature="elu", chunk=4)),
    "linear-relu": ("linear", dict(feature="relu", chunk=4, eps=1e-3)),
    "performer": ("performer", dict(features=32, chunk=4)),
}
SHAPES = {
    "causal": dict(causal=True),
    "causal-pad-gqa": dict(causal=True, pad=True, Hkv=2),
    "causal-after-cache-mqa": dict(causal=True, Tq=6, Hkv=1),  # 7 earlier keys, then the queries' own
    "bidirectional": dict(causal=False),
    "bidirectional-pad-gqa": dict(causal=False, pad=True, Hkv=2),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", KERNELIZED)
def test_running_sums_equal_quadratic_form(name, shape):
    kind, params = KERNELIZED[name]
    c = dict(SHAPES[shape])
    kernel = make(kind, **params)
    q, k, v = qkv(Tq=c.get("Tq"), Hkv=c.get("Hkv", H))
    spec = make_spec(13, c.get("Tq"), causal=c["causal"], pad=c.get("pad", False))
    expected = quadratic(exact_phi(kernel, q), exact_phi(kernel, k), v, spec, kernel.eps)
    torch.testing.assert_close(kernel(q, k, v, spec), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunk_size_does_not_change_the_result(chunk):
    q, k, v = qkv(Hkv=2)
    spec = make_spec(13, causal=True, pad=True)
    ref = make("performer", features=16, chunk=13)(q, k, v, spec)
    torch.testing.assert_close(make("performer", features=16, chunk=chunk)(q, k, v, spec), ref,
                               rtol=1e-12, atol=1e-12)


def left_padded():
    mask = torch.ones(B, 13, dtype=torch.bool)
    mask[1, :2] = False  # row 1 starts with two pads (batched generation)
    return mask


@pytest.mark.parametrize("name", KERNELIZED)
def test_recurrent_generation_equals_parallel_forward(name):
    kind, params = KERNELIZED[name]
    kernel = make(kind, **params)
    q, k, v = qkv(Hkv=2)
    mask = left_padded()
    full = kernel(q, k, v, AttnSpec(q_pos=torch.arange(13), k_pos=torch.arange(13), causal=True,
                                    key_padding_mask=mask))
    cache = kernel.new_cache(B, 2, 16, device=q.device, dtype=q.dtype)
    assert isinstance(cache, RecurrentState)
    P = 6
    parts = [kernel.attend(q[:, :, :P], k[:, :, :P], v[:, :, :P],
                           AttnSpec(q_pos=torch.arange(P), k_pos=torch.arange(P), causal=True,
                                    key_padding_mask=mask[:, :P]), cache)]
    for t in range(P, 13):
        spec = AttnSpec(q_pos=torch.tensor([t]), k_pos=torch.arange(t + 1), causal=True,
                        key_padding_mask=mask[:, :t + 1])
        parts.append(kernel.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], spec, cache))
    assert cache.length == 13
    assert cache.S.shape == (B, 2, kernel.n_features(), D)  # O(1) in the length
    torch.testing.assert_close(torch.cat(parts, 2), full, rtol=1e-10, atol=1e-10)
    assert full[1, :, :2].abs().max() == 0  # queries with no real key give zeros


@pytest.mark.parametrize("name", KERNELIZED)
def test_recurrent_state_reorder_and_crop(name):
    kind, params = KERNELIZED[name]
    kernel = make(kind, **params)
    q, k, v = qkv(T=6)
    cache = kernel.new_cache(B, H, 16, device=q.device, dtype=q.dtype)
    kernel.attend(q[:, :, :5], k[:, :, :5], v[:, :, :5],
                  AttnSpec(q_pos=torch.arange(5), k_pos=torch.arange(5), causal=True), cache)
    index = torch.tensor([1, 1, 0])
    cache.reorder(index)
    cache.crop(5)  # a no-op crop is fine
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(4)
    step = kernel.attend(q[index, :, 5:], k[index, :, 5:], v[index, :, 5:],
                         AttnSpec(q_pos=torch.tensor([5]), k_pos=torch.arange(6), causal=True), cache)
    ref = kernel(q[index], k[index], v[index], AttnSpec(q_pos=torch.arange(6), k_pos=torch.arange(6), causal=True))
    torch.testing.assert_close(step[:, :, 0], ref[:, :, 5], rtol=1e-10, atol=1e-10)


def test_performer_approaches_softmax_as_features_grow():
    q, k, v = qkv(T=24, scale=0.8)
    for causal in (False, True):
        spec = make_spec(24, causal=causal, pad=True)
        exact = reference_attention(q, k, v, spec)
        err = {m: sum((make("performer", features=m, seed=s)(q, k, v, spec) - exact).abs().mean().item()
                      for s in range(4)) / 4 for m in (16, 64, 256)}
        assert err[256] < err[64] < err[16], err
        assert err[256] < 0.5 * err[16], err


def test_performer_features_are_orthogonal_blocks_seeded_and_redrawn():
    a, b = make("performer", features=20, seed=3), make("performer", features=20, seed=3)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)  # reproducible
    assert not torch.equal(a.weight, make("performer", features=20, seed=3, layer=1).weight)
    w = a.weight
    block = w[:D] / w[:D].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(D, dtype=w.dtype), rtol=0, atol=1e-6)
    assert "weight" in a.state_dict() and "draws" in a.state_dict()

    k = make("performer", features=16, redraw=2).train()
    q, kk, v = qkv(T=4)
    spec = make_spec(4, causal=True)
    w0 = k.weight.clone()
    k(q, kk, v, spec)
    assert torch.equal(k.weight, w0)
    k(q, kk, v, spec)
    assert not torch.equal(k.weight, w0)  # the second training forward redraws
    w1 = k.weight.clone()
    with torch.no_grad():
        k(q, kk, v, spec)
        k(q, kk, v, spec)
    assert torch.equal(k.weight, w1)  # no redraw without gradients (evaluation in train mode)
    fresh = make("performer", features=16, redraw=2)
    fresh.load_state_dict(k.state_dict())
    fresh.train()
    for _ in range(2):
        fresh(q, kk, v, spec), k(q, kk, v, spec)
    assert torch.equal(fresh.weight, k.weight)  # the draw count travels with the weights


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv", "layerwise"])
def test_linformer_with_identity_projections_is_dense(sharing):
    T = 12
    kernel = make("linformer", max_len=T, k=T, sharing=sharing)
    with torch.no_grad():
        for p in kernel.projections():
            p.copy_(torch.eye(T, dtype=p.dtype).expand_as(p))
    q, k, v = qkv(T=T, Hkv=2)
    spec = make_spec(T, causal=False)
    torch.testing.assert_close(kernel(q, k, v, spec), reference_attention(q, k, v, spec), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sharing", ["none", "headwise"])
def test_linformer_ignores_padded_keys_and_takes_short_sequences(sharing):
    kernel = make("linformer", max_len=16, k=5, sharing=sharing)
    q, k, v = qkv(T=13, Hkv=2)
    spec = make_spec(13, causal=False, pad=True)
    out = kernel(q, k, v, spec)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, -3:] += 100.0
    v2[1, :, -3:] = torch.randn_like(v2[1, :, -3:])
    torch.testing.assert_close(kernel(q, k2, v2, spec), out, rtol=0, atol=0)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="bidirectional"):
        kernel(q, k, v, make_spec(13, causal=True))


def test_linformer_sharing_modes():
    shared: dict = {}
    l0, l1 = (make("linformer", k=4, sharing="layerwise", layer=i, shared=shared) for i in range(2))
    assert l0.projections()[0] is l1.projections()[0] is l0.projections()[1]
    kv = make("linformer", k=4, sharing="kv")
    assert kv.projections()[0] is kv.projections()[1]
    assert sum(p.numel() for p in kv.parameters()) == 4 * 16
    assert sum(p.numel() for p in make("linformer", k=4, sharing="headwise").parameters()) == 2 * 4 * 16
    assert sum(p.numel() for p in make("linformer", k=4, sharing="none").parameters()) == 2 * H * 4 * 16


def additive_by_loops(kernel, q, k, v, spec):
    """score_ij = wᵀ tanh(W_q q_i + W_k k_j) per head, softmax over the allowed keys, loop by loop."""
    Bq, Hq, Tq, _ = q.shape
    rep = Hq // k.shape[1]
    mask = full_mask(spec, None, Bq)
    out = torch.zeros_like(q)
    for b in range(Bq):
        for h in range(Hq):
            Wq, Wk, w = kernel.w_q[h], kernel.w_k[h], kernel.w[h]
            for i in range(Tq):
                scores, vals = [], []
                for j in range(k.shape[2]):
                    if mask is not None and not mask[b if mask.shape[0] > 1 else 0, 0, i if mask.shape[2] > 1 else 0, j]:
                        continue
                    s = w @ torch.tanh(q[b, h, i] @ Wq + k[b, h // rep, j] @ Wk)
                    if spec.bias is not None:
                        s = s + spec.bias[0, h, i, j]
                    scores.append(s)
                    vals.append(v[b, h // rep, j])
                if scores:
                    weights = torch.softmax(torch.stack(scores), 0)
                    out[b, h, i] = (weights[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("case", ["causal-pad-gqa", "bidirectional-bias", "cache-offset", "pad-only"])
def test_additive_equals_explicit_loops(case):
    kernel = make("additive", d_attn=6, chunk=3)
    T, Tq = 7, (3 if case == "cache-offset" else None)
    q, k, v = qkv(T=T, Tq=Tq, Hkv=2 if case == "causal-pad-gqa" else H)
    spec = make_spec(T, Tq, causal=case != "bidirectional-bias" and case != "pad-only",
                     pad=case in ("causal-pad-gqa", "pad-only"))
    if case == "bidirectional-bias":
        spec = AttnSpec(q_pos=spec.q_pos, k_pos=spec.k_pos, causal=False,
                        bias=torch.randn(1, H, T, T, dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(kernel(q, k, v, spec), additive_by_loops(kernel, q, k, v, spec),
                                   rtol=1e-10, atol=1e-10)


def test_additive_recomputed_backward_is_the_gradient():
    from tfx.nn.attention.additive import _AdditiveScores
    g = torch.Generator().manual_seed(4)
    qa, ka = (torch.randn(2, 3, n, 5, generator=g, dtype=torch.float64, requires_grad=True) for n in (7, 6))
    w = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: _AdditiveScores.apply(a, b, c, 3), (qa, ka, w))


def test_additive_chunking_keeps_values_and_gradients():
    q, k, v = qkv(T=9, Hkv=2)
    spec = make_spec(9, causal=True, pad=True)
    a, b = make("additive", chunk=2), make("additive", chunk=64)
    b.load_state_dict(a.state_dict())
    grads = []
    for kernel in (a, b):
        x = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = kernel(*x, spec)
        out.pow(2).sum().backward()
        grads.append((out.detach(), *(t.grad for t in x), kernel.w_q.grad))
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)


CAUSAL = {
    "dense": ("dense", {}),
    "linear": ("linear", dict(chunk=4)),
    "performer": ("performer", dict(features=16, chunk=4)),
    "additive": ("additive", dict(chunk=4)),
}


@pytest.mark.parametrize("name", CAUSAL)
def test_causality_by_gradient(name):
    """d out[t] / d (q, k, v)[t'] is zero for every t' > t, and not for t' <= t."""
    kind, params = CAUSAL[name]
    kernel = make(kind, **params)
    assert kernel.supports_causal
    q, k, v = (t.requires_grad_(True) for t in qkv(T=11, Hkv=2))
    out = kernel(q, k, v, make_spec(11, causal=True))
    for t in (0, 3, 4, 9):
        grads = torch.autograd.grad(out[:, :, t].sum(), (q, k, v), retain_graph=True)
        for g in grads:
            assert g[:, :, t + 1:].abs().max() == 0, f"{name}: position {t} sees the future"
        assert grads[1][:, :, : t + 1].abs().sum() > 0 or t == 0


def test_capabilities_and_configs():
    flags = {n: ATTENTION.get(n) for n in ("linear", "performer", "linformer", "additive")}
    assert not any(cls.exact for cls in flags.values())
    assert flags["linformer"].supports_causal is False and flags["linformer"].supports_cache is False
    assert not flags["linear"].supports_bias and not flags["performer"].supports_bias
    assert flags["additive"].supports_bias and flags["additive"].supports_cache
    assert ATTENTION.config_model("linear")().feature == "elu"
    assert ATTENTION.config_model("performer")().features == 128
    assert ATTENTION.config_model("linformer")().sharing == "headwise"
    with pytest.raises(Exception):
        ATTENTION.config_model("linear")(feature="tanh")


@pytest.mark.parametrize("kind", ["linear", "performer"])
def test_model_generation_with_recurrent_state(kind):
    """A whole LM (rope, GQA): prefill + steps through the stack's state equal one full forward."""
    from tfx.config import validate
    from tfx.families import build_model
    cfg = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "context": 16,
           "position": {"kind": "rope"}, "attention": {"kind": kind, "chunk": 4}}
    torch.manual_seed(0)
    model = build_model(validate({"data": {"train": "x.txt"}, "model": cfg}), vocab_size=23).double().eval()
    tokens = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(2))
    full, _ = model(tokens)
    state = model.new_state(2, 16)
    parts = [model(tokens[:, :5], state)[0]] + [model(tokens[:, t:t + 1], state)[0] for t in range(5, 12)]
    assert state.length == 12
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)
