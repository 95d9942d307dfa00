"""LM-Infinite (tfx/nn/attention/lm_infinite.py): query i sees keys with 0 <= i - j < window and the first
global_tokens keys; a global key outside the window is scored with the query at position min(i, ceiling)."""
from __future__ import annotations

import math

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.errors import UsageError
from tfx.families import build_model
from tfx.nn.attention.base import AttnSpec, reference_attention
from tfx.nn.attention.lm_infinite import LMInfiniteAttention, LMInfiniteConfig

import_kinds()
V = 23
G, W = 2, 5  # global tokens, window (= ceiling by default)


def recipe(position="rope", kind="lm_infinite", n_layers=1, context=8, **att):
    table = {"kind": kind, **({"global_tokens": G, "window": W} if kind == "lm_infinite" else {}), **att}
    return validate({"data": {"train": "x.txt"}, "model": {
        "d_model": 16, "n_layers": n_layers, "n_heads": 2, "context": context, "position": {"kind": position},
        "attention": table}})


def model_for(position="rope", kind="lm_infinite", n_layers=1, **att):
    torch.manual_seed(0)
    return build_model(recipe(position, kind, n_layers, **att), vocab_size=V).double().eval()


def test_pattern_is_the_lambda_written_out():
    kernel = LMInfiniteAttention(LMInfiniteConfig(global_tokens=G, window=W), n_heads=2, d_head=4, max_len=8)
    pos = torch.arange(17)
    got = kernel.allowed(pos, pos) & (pos[None, :] <= pos[:, None])
    want = torch.tensor([[j <= i and (i - j < W or j < G) for j in range(17)] for i in range(17)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("offset", [0, 9])
def test_kernel_without_far_queries_is_dense_attention_under_its_pattern(offset):
    # true distances for every pair (no far queries given): exactly the reference under allowed()
    kernel = LMInfiniteAttention(LMInfiniteConfig(global_tokens=3, window=4), n_heads=4, d_head=8, max_len=8)
    g = torch.Generator().manual_seed(1)
    Tk = 21
    q = torch.randn(2, 4, Tk - offset, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, Tk, 8, generator=g, dtype=torch.float64) for _ in range(2))
    pad = torch.ones(2, Tk, dtype=torch.bool)
    pad[1, 1] = False
    spec = AttnSpec(q_pos=torch.arange(offset, Tk), k_pos=torch.arange(Tk), causal=True, key_padding_mask=pad)
    want = reference_attention(q, k, v, spec, kernel.allowed(spec.q_pos, spec.k_pos))
    torch.testing.assert_close(kernel(q, k, v, spec), want, rtol=1e-12, atol=1e-12)


def rope_by_hand(x: torch.Tensor, p: int, base: float = 10000.0) -> torch.Tensor:
    """Rotate (.., D) by position p, half-split pairs (feature f with f + D/2), angle p * base^(-f / (D/2))."""
    half = x.shape[-1] // 2
    angle = p * base ** (-torch.arange(half, dtype=torch.float64) / half)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1)


def heads(model, x):
    attn = model.stack.blocks[0].attn
    B, T, _ = x.shape
    H, D = attn.n_heads, attn.d_head
    q, k, v = attn.qkv(x).split((H * D, H * D, H * D), dim=-1)
    return [t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v)]  # (B, H, T, D) each, before positions


def attention_of(model, batch: int, T: int, seed: int):
    """The first layer's attention over a random (batch, T, 16) input, and that input's heads (q, k, v)."""
    attn, pos = model.stack.blocks[0].attn, model.stack.pos
    x = torch.randn(batch, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    p = torch.arange(T)
    pos.ensure(T)
    got = attn(x, pos=pos, spec=AttnSpec(q_pos=p, k_pos=p, causal=True, bias=pos.bias(p, p)), q_pos=p)
    return got, heads(model, x)


def distance(i: int, j: int) -> int:
    """The distance LM-Infinite scores pair (i, j) at: its own inside the window, else min(i, ceiling) - j."""
    return i - j if i - j < W else min(i, W) - j


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_attention_equals_the_capped_distances_written_out(position):
    model = model_for(position)
    T = 19
    got, (q, k, v) = attention_of(model, 2, T, seed=2)
    D = q.shape[-1]
    slopes = [2 ** (-8 / 2 * (h + 1)) for h in range(2)]  # ALiBi's geometric slopes for 2 heads
    out = torch.zeros_like(q)
    for i in range(T):
        keys = [j for j in range(i + 1) if i - j < W or j < G]
        for h in range(2):
            if position == "rope":  # the query at i - d against the key at j: only the distance d matters
                s = torch.stack([(rope_by_hand(q[:, h, i], j + distance(i, j)) * rope_by_hand(k[:, h, j], j)).sum(-1)
                                 for j in keys], -1) / math.sqrt(D)
            else:
                s = torch.stack([(q[:, h, i] * k[:, h, j]).sum(-1) / math.sqrt(D) - slopes[h] * distance(i, j)
                                 for j in keys], -1)
            out[:, h, i] = torch.einsum("bk,bkd->bd", s.softmax(-1), v[:, h, keys])
    want = model.stack.blocks[0].attn.out(out.transpose(1, 2).reshape(2, T, -1))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert max(distance(i, j) for i in range(T) for j in range(i + 1) if i - j < W or j < G) == W


@pytest.mark.parametrize("position", ["t5", "xl", "none"])
def test_attention_places_far_queries_at_the_ceiling_for_every_relative_scheme(position):
    # the scheme's own hooks, one query at a time: local keys at the query's position, far keys at min(i, W)
    model = model_for(position)
    attn, pos = model.stack.blocks[0].attn, model.stack.pos
    T = 17
    got, (q, k, v) = attention_of(model, 1, T, seed=4)

    def scores(i: int, at: int, keys: list[int]):
        qp, kp = torch.tensor([at]), torch.tensor(keys)
        qi, kj = pos.rotate(q[:, :, i:i + 1], k[:, :, keys], qp, kp)
        spec = AttnSpec(q_pos=qp, k_pos=kp, causal=True, bias=pos.bias(qp, kp))
        qi, spec = pos.adjust(qi, spec, 0)
        s = qi @ kj.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return s + spec.bias if spec.bias is not None else s  # (1, H, 1, K)

    out = torch.zeros_like(q)
    for i in range(T):
        local = list(range(max(0, i - W + 1), i + 1))
        far = [j for j in range(G) if i - j >= W]
        s = torch.cat([scores(i, i, local)] + ([scores(i, min(i, W), far)] if far else []), -1)
        out[:, :, i:i + 1] = s.softmax(-1) @ v[:, :, local + far]
    want = attn.out(out.transpose(1, 2).reshape(1, T, -1))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("position", ["rope", "alibi", "xl"])
def test_prefill_and_cached_steps_equal_one_parallel_pass_past_the_context(position):
    model = model_for(position, n_layers=2)
    tokens = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(5))  # context 8: far past it
    want, _ = model(tokens)
    state = model.new_state(2, 30)
    first, state = model(tokens[:, :6], state)
    steps = [first] + [model(tokens[:, t:t + 1], state)[0] for t in range(6, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-9, atol=1e-9)


def test_a_window_over_the_whole_text_is_dense_attention():
    dense = model_for("rope", "dense", n_layers=2)
    wide = model_for("rope", n_layers=2, window=64)
    wide.load_state_dict(dense.state_dict())
    tokens = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(wide(tokens)[0], dense(tokens)[0], rtol=1e-10, atol=1e-10)


def test_gradients_reach_the_window_and_the_global_tokens_only():
    model = model_for("rope")
    attn, pos = model.stack.blocks[0].attn, model.stack.pos
    T, i = 16, 13
    x = torch.randn(1, T, 16, dtype=torch.float64, requires_grad=True)
    p = torch.arange(T)
    pos.ensure(T)
    y = attn(x, pos=pos, spec=AttnSpec(q_pos=p, k_pos=p, causal=True), q_pos=p)
    y[0, i].sum().backward()
    reached = x.grad[0].abs().sum(-1) > 0
    assert reached.tolist() == [j < G or (j <= i and i - j < W) for j in range(T)]


def test_generation_keeps_one_cache_past_the_context():
    from tfx.decoding.generate import generate_ids

    model = model_for("rope", n_layers=2).float()
    prompt = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(7)).tolist()  # context 8
    out = generate_ids(model, prompt, max_new_tokens=10, temperature=0.0)
    history = list(prompt)
    for token in out:  # each greedy token is the argmax of a parallel pass over the whole text so far
        logits, _ = model(torch.tensor([history]))
        assert token == int(logits[0, -1].argmax())
        history.append(token)


@pytest.mark.parametrize("change, needle", [
    ({"position": "sinusoidal"}, "absolute positions"),
    ({"position": "learned"}, "absolute positions"),
    ({"ceiling": 3}, "at least the window"),
])
def test_refused_combinations(change, needle):
    att = {"ceiling": change["ceiling"]} if "ceiling" in change else {}
    with pytest.raises(UsageError, match=needle):
        recipe(change.get("position", "rope"), **att)


def test_refused_with_a_segment_memory_and_in_an_encoder():
    with pytest.raises(UsageError, match="segment memory"):
        validate({"data": {"train": "x.txt"}, "model": {"context": 8, "position": {"kind": "xl"},
                  "attention": {"kind": "lm_infinite"}, "memory": {"kind": "xl", "mem_len": 8}}})
    with pytest.raises(UsageError, match="causal only"):
        validate({"family": "classifier", "data": {"train": "x.tsv"}, "model": {
            "context": 8, "position": {"kind": "rope"}, "attention": {"kind": "lm_infinite"}}})
