"""Recurrent Memory Transformer: memory tokens carry a segment's content to the next, gradients
run through the segments of one block and stop between blocks, no token sees a later one."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.families import build_model

import_kinds()
V, d = 17, 16


def model_for(position="rope", kind="dense", segments=2, tokens=3):
    recipe = validate({"data": {"train": "x.txt"}, "model": {
        "d_model": d, "n_layers": 2, "n_heads": 2, "context": 8, "position": {"kind": position},
        "attention": {"kind": kind, **({"window": 16} if kind == "local" else {})},
        "memory": {"kind": "rmt", "tokens": tokens, "segments": segments}}})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=V).double().eval()


TOKENS = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("position", ["rope", "learned", "alibi", "sinusoidal"])
def test_one_block_equals_its_segments_one_call_each(position):
    model = model_for(position)  # context 8 in 2 segments of 4
    state = model.stack.new_memory()
    whole, state = model(TOKENS[:, :8], state)
    assert state.memory.tokens.shape == (2, 3, d) and not state.memory.tokens.requires_grad
    again, parts = model.stack.new_memory(), []
    for s in (0, 4):
        out, again = model(TOKENS[:, s:s + 4], again)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(again.memory.tokens, state.memory.tokens, rtol=1e-10, atol=1e-10)


def test_a_segment_reads_the_previous_one_only_through_the_memory():
    model = model_for(tokens=2)
    a, _ = model(TOKENS[:, :8], model.stack.new_memory())
    changed = TOKENS[:, :8].clone()
    changed[:, 1] = (changed[:, 1] + 1) % V
    b, _ = model(changed, model.stack.new_memory())
    assert not torch.allclose(a[:, 4:], b[:, 4:])  # segment 2 saw segment 1's change
    c, _ = model(TOKENS[:, 4:8], model.stack.new_memory())  # segment 2 alone, from the learned memory
    assert not torch.allclose(a[:, 4:], c)


@pytest.mark.parametrize("kind", ["dense", "local"])
def test_gradients_cross_segments_in_a_block_not_blocks_and_never_go_back_in_time(kind):
    model = model_for(kind=kind)
    emb = model.stack.embed
    x = emb(TOKENS).detach().requires_grad_(True)
    original = emb.forward
    calls = iter([x[:, 0:4], x[:, 4:8], x[:, 8:12], x[:, 12:16]])
    emb.forward = lambda _: next(calls)
    state = model.stack.new_memory()
    first, state = model(TOKENS[:, :8], state)
    second, state = model(TOKENS[:, 8:], state)
    emb.forward = original
    logits = torch.cat([first, second], 1)
    for t in (2, 6, 13):
        grad, = torch.autograd.grad(logits[:, t].sum(), x, retain_graph=True)
        assert grad[:, t + 1:].abs().max() == 0  # causal
        assert grad[:, t].abs().max() > 0
    grad, = torch.autograd.grad(logits[:, 6].sum(), x, retain_graph=True)
    assert grad[:, :4].abs().max() > 0  # segment 2 of a block backpropagates into segment 1
    grad, = torch.autograd.grad(logits[:, 10].sum(), x, retain_graph=True)
    assert grad[:, :8].abs().max() == 0  # the memory entering a new block is detached


def test_generation_recomputes_from_the_history():
    model = model_for()
    state = model.new_state(2)
    assert state.tokens is not None  # no per-layer cache with memory tokens
    out1, state = model(TOKENS[:, :5], state)
    out2, state = model(TOKENS[:, 5:7], state)
    full, _ = model(TOKENS[:, :7], model.stack.new_memory())
    torch.testing.assert_close(torch.cat([out1, out2], 1), full, rtol=1e-10, atol=1e-10)
