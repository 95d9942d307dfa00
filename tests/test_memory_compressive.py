"""Compressive Transformer memory: FIFO sizes, each compression function by its definition, rate 1
equals a longer XL memory, and the reconstruction loss trains the compressor alone."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.families import build_model

import_kinds()
V, d = 17, 16


def model_for(memory: dict, position="rope", kind="dense"):
    recipe = validate({"data": {"train": "x.txt"}, "model": {
        "d_model": d, "n_layers": 2, "n_heads": 2, "context": 8, "position": {"kind": position},
        "attention": {"kind": kind, **({"window": 8} if kind == "local" else {})}, "memory": memory}})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=V).double().eval()


def compressive(**kw):
    return model_for({"kind": "compressive", **kw})


TOKENS = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))


def segments(model, tokens=TOKENS, length=4):
    state, outs, states = model.stack.new_memory(), [], []
    for s in range(0, tokens.shape[1], length):
        out, state = model(tokens[:, s:s + length], state)
        outs.append(out)
        states.append(([m.clone() for m in state.memory.hidden],
                       [c.clone() for c in compressed] if (compressed := getattr(state.memory, "compressed", None))
                       else None))  # an XL state has no compressed memory
    return torch.cat(outs, 1), states


@pytest.mark.parametrize("kind, position", [("dense", "rope"), ("dense", "alibi"), ("dense", "xl"),
                                            ("local", "rope")])
def test_rate_one_mean_equals_xl_with_both_memories(kind, position):
    comp = model_for({"kind": "compressive", "mem_len": 4, "cmem_len": 4, "rate": 1, "compression": "mean"},
                     position, kind)
    xl = model_for({"kind": "xl", "mem_len": 8}, position, kind)
    xl.load_state_dict(comp.state_dict())
    got, states = segments(comp)
    want, _ = segments(xl)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert states[-1][1][0].shape == (2, 4, d)  # the compressed memory was used


def test_memory_and_compressed_memory_are_fifos_of_their_sizes():
    _, states = segments(compressive(mem_len=5, cmem_len=2, rate=2, compression="mean"))
    # 4-token segments: 4 in memory; 8 -> 2 evicted (a whole group), 6 kept; 10 -> 4 evicted, 6 kept
    assert [m[0].shape[1] for m, _ in states] == [4, 6, 6, 6]
    assert [c[0].shape[1] if c else 0 for _, c in states] == [0, 1, 2, 2]  # capped at cmem_len
    assert all(not m.requires_grad for m, _ in states for m in m)


@pytest.mark.parametrize("compression, reduce", [("max", lambda g: g.amax(2)), ("mean", lambda g: g.mean(2))])
def test_pooling_compresses_groups_of_rate_consecutive_states(compression, reduce):
    _, states = segments(compressive(mem_len=4, cmem_len=8, rate=2, compression=compression))
    first = states[0][0]  # memory after segment 1: its 4 states are evicted by segment 2
    for layer in range(2):
        expected = reduce(first[layer].view(2, 2, 2, d))  # (B, groups, rate, d) -> (B, groups, d)
        torch.testing.assert_close(states[1][1][layer], expected, rtol=0, atol=0)


def test_most_used_keeps_the_most_attended_states_in_order():
    model = compressive(mem_len=4, cmem_len=8, rate=2, compression="most_used")
    old = torch.arange(2 * 6 * d, dtype=torch.double).view(2, 6, d)
    usage = torch.tensor([[0.1, 5.0, 0.2, 3.0, 4.0, 0.0], [9.0, 0.0, 0.0, 1.0, 0.0, 2.0]], dtype=torch.double)
    got = model.stack.recurrence.compress(0, old, usage)
    torch.testing.assert_close(got[0], old[0, [1, 3, 4]])
    torch.testing.assert_close(got[1], old[1, [0, 3, 5]])


def test_usage_counts_each_query_once_per_head():
    model = compressive(mem_len=16, cmem_len=4, rate=2, compression="most_used")
    state = model.stack.new_memory()
    for s in (0, 4, 8):
        _, state = model(TOKENS[:, s:s + 4], state)
    # nothing evicted yet: 12 queries x 2 heads of probability mass, all on the 12 kept states
    assert [u.shape for u in state.memory.usage] == [(2, 12)] * 2
    torch.testing.assert_close(state.memory.usage[0].sum(1), torch.full((2,), 24.0, dtype=torch.double))
    _, state = model(TOKENS[:, 12:], state)  # 16 kept: still every state, 32 queries' worth
    torch.testing.assert_close(state.memory.usage[1].sum(1), torch.full((2,), 32.0, dtype=torch.double))


def test_reconstruction_loss_trains_the_compressor_and_nothing_else():
    model = compressive(mem_len=4, cmem_len=8, rate=2, compression="conv").train()
    for p in model.parameters():
        p.requires_grad_(True)
    state = model.stack.new_memory()
    _, state = model(TOKENS[:, :4], state)
    assert state.aux_loss is None  # nothing evicted yet
    logits, state = model(TOKENS[:, 4:8], state)
    assert state.aux_loss is not None and float(state.aux_loss.detach()) > 0
    state.aux_loss.backward()
    convs = {id(p) for p in model.stack.recurrence.parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stack.recurrence.parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters() if id(p) not in convs)
    model.zero_grad(set_to_none=True)
    logits, state = model(TOKENS[:, 8:12], state)  # reads the compressed memory
    logits.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.stack.recurrence.parameters())


def test_conv_starts_as_mean_pooling_and_the_loss_falls_when_trained():
    mean = compressive(mem_len=4, cmem_len=8, rate=2, compression="mean")
    conv = compressive(mem_len=4, cmem_len=8, rate=2, compression="conv").train()
    conv.load_state_dict(mean.state_dict(), strict=False)
    _, a = segments(mean)
    _, b = segments(conv.eval())
    torch.testing.assert_close(a[1][1][0], b[1][1][0])
    conv.train()
    opt = torch.optim.Adam(conv.stack.recurrence.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        state = conv.stack.new_memory()
        _, state = conv(TOKENS[:, :4], state)
        _, state = conv(TOKENS[:, 4:8], state)
        losses.append(float(state.aux_loss.detach()))
        opt.zero_grad()
        state.aux_loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
