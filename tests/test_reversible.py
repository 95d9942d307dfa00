"""Reversible layers (tfx/nn/reversible.py): the recomputing backward pass gives the gradients plain
autograd gives the same couplings (float64, dropout on: its masks are replayed), in a decoder-only
LM and in a translation model (attention, cross-attention and feed-forward couplings); the
chunked feed-forward equals the whole one; recipes it cannot serve are refused with the reason."""
from __future__ import annotations

import pytest
import torch

import tfx.nn.reversible as rev
from tfx.config import import_kinds, validate
from tfx.errors import UsageError
from tfx.families import build_model
from tfx.nn.layers import FeedForward

import_kinds()
V = 21


def build(family: str = "lm", **model):
    cfg = {"d_model": 16, "n_layers": 3, "n_heads": 2, "context": 16, "dropout": 0.1, "reversible": True,
           "position": {"kind": "rope"}, **model}
    data = {"train": "x.txt"} if family == "lm" else {"train": "x.tsv"}
    recipe = validate({"family": family, "data": data, "model": cfg})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=V).double().train()


def batch(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, V, (2, 10), generator=g)
    if family == "lm":
        return {"input": tokens[:, :-1], "target": tokens[:, 1:]}
    target = torch.randint(4, V, (2, 8), generator=g)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 7:] = False  # a padded source row
    return {"src": tokens, "src_mask": mask, "tgt_in": target[:, :-1], "tgt_out": target[:, 1:]}


def grads(model, data) -> dict:
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks in both runs
    loss, _, _ = model.loss(data)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
def test_the_recomputing_backward_equals_autograd_through_the_same_couplings(family, monkeypatch):
    model = build(family)
    data = batch(family)
    low_memory = grads(model, data)
    monkeypatch.setattr(rev, "reversible", rev.couple)
    plain = grads(model, data)
    assert low_memory.keys() == plain.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(low_memory[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_the_two_streams_start_as_the_input_and_end_as_their_mean():
    model = build(n_layers=1, dropout=0.0).eval()
    block = model.stack.blocks[0]
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    from tfx.nn.attention.base import AttnSpec

    pos = torch.arange(5)
    spec = AttnSpec(q_pos=pos, k_pos=pos, causal=True)
    a = x + block.attn(block.norm1(x), pos=model.stack.pos, spec=spec, q_pos=pos)
    b = x + block.ffn(block.norm2(a), spec)
    layers = rev.sublayers(model.stack.blocks, [None], [None], pos=model.stack.pos, spec=spec, q_pos=pos,
                           cross_spec=None)
    torch.testing.assert_close(rev.couple(x, layers), (a + b) / 2)
    torch.testing.assert_close(rev.reversible(x, layers), (a + b) / 2)


def test_the_chunked_feed_forward_equals_the_whole_one():
    torch.manual_seed(0)
    whole = FeedForward(d_model=8, d_ff=16, kind="swiglu", bias=True, dropout=0.0).double()
    chunked = FeedForward(d_model=8, d_ff=16, kind="swiglu", bias=True, dropout=0.0, chunks=3).double()
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    torch.testing.assert_close(chunked(x), whole(x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("model, reason", [
    ({"memory": {"kind": "xl"}}, "segment memory"),
    ({"position": {"kind": "t5"}}, "weights inside the attention scores"),
    ({"depth": {"kind": "universal"}}, "does not combine with universal depth"),
    ({"ffn_chunks": 2, "ffn": "dwconv", "reversible": False}, "across the chunks' borders"),
])
def test_recipes_reversible_layers_cannot_serve_are_refused_with_the_reason(model, reason):
    with pytest.raises(UsageError, match=reason):
        validate({"data": {"train": "x.txt"}, "model": {"reversible": True, **model}})


def test_a_kernel_that_changes_as_it_runs_is_refused_when_built():
    recipe = validate({"data": {"train": "x.txt"},
                       "model": {"reversible": True, "attention": {"kind": "performer", "redraw": 10}}})
    with pytest.raises(UsageError, match="model.reversible recomputes"):
        build_model(recipe, vocab_size=V)
