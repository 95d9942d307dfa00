"""Memorizing Transformer: exact top-k retrieval, the gated mix, a bounded FIFO store of earlier
segments only (causal), cleared with each new stream."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.families import build_model
from tfx.nn.memory.memorizing import MemorizingState, knn_attention
from tfx.nn.state import StackState

import_kinds()
V, d = 17, 16


def model_for(position="rope", kind="dense", **memory):
    recipe = validate({"data": {"train": "x.txt"}, "model": {
        "d_model": d, "n_layers": 3, "n_heads": 2, "context": 8, "position": {"kind": position},
        "attention": {"kind": kind, **({"window": 4} if kind == "local" else {})},
        "memory": {"kind": "memorizing", "size": 12, "top_k": 4, **memory}}})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=V).double().eval()


TOKENS = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(5))
g = torch.Generator().manual_seed(0)


def test_knn_attention_with_every_key_is_softmax_attention_and_top1_is_the_best_value():
    q, keys, values = (torch.randn(*s, generator=g, dtype=torch.double) for s in ((2, 4, 3, 8), (2, 2, 5, 8),
                                                                                   (2, 2, 5, 8)))
    full = torch.softmax(q @ keys.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5, -1) \
        @ values.repeat_interleave(2, 1)
    torch.testing.assert_close(knn_attention(q, keys, values, top_k=5), full)
    best = (q @ keys.repeat_interleave(2, 1).transpose(-1, -2)).argmax(-1)  # (2, 4, 3)
    want = values.repeat_interleave(2, 1).gather(2, best[..., None].expand(-1, -1, -1, 8))
    torch.testing.assert_close(knn_attention(q, keys, values, top_k=1), want)


def test_recall_mixes_by_the_gate_and_stores_the_segment():
    memory = model_for().stack.recurrence
    with torch.no_grad():
        memory.gate.copy_(torch.tensor([0.0, 2.0]))
    keys, values = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    state = MemorizingState(keys=keys, values=values)
    q, k, v, y = (torch.randn(2, 2, 3, 8, generator=g) for _ in range(4))
    out = memory.recall(state, q, k, v, y)
    gate = torch.sigmoid(torch.tensor([0.0, 2.0]))[None, :, None, None]
    torch.testing.assert_close(out, gate * knn_attention(q, keys, values, 4) + (1 - gate) * y)
    assert torch.equal(state.keys, torch.cat([keys, k], 2)) and state.values.shape == (2, 2, 9, 8)


def segments(model, length=4, tokens=TOKENS, state=None):
    state, outs = state or model.stack.new_memory(), []
    for s in range(0, tokens.shape[1], length):
        out, state = model(tokens[:, s:s + length], state)
        outs.append(out)
    return torch.cat(outs, 1), state


def documents(*lengths, start=True):
    """Random documents (no token 1 inside), each opening with the BOS id 1 when `start`."""
    docs = []
    for i, n in enumerate(lengths):
        doc = torch.randint(2, V, (2, n), generator=torch.Generator().manual_seed(10 + i))
        doc[:, 0] = 1 if start else 2
        docs.append(doc)
    return docs


def test_a_new_document_reads_nothing_of_the_earlier_ones():
    model = model_for()
    a, b = documents(12, 12)
    both, _ = segments(model, tokens=torch.cat([a, b], 1))
    alone, _ = segments(model, tokens=b)
    torch.testing.assert_close(both[:, 12:], alone, rtol=1e-10, atol=1e-10)
    a, b = documents(12, 12, start=False)  # the control: one document, so b reads a's pairs
    both, _ = segments(model, tokens=torch.cat([a, b], 1))
    alone, _ = segments(model, tokens=b)
    assert (both[:, 16:] - alone[:, 4:]).abs().max() > 1e-3


def test_a_document_starting_inside_a_segment_keeps_only_its_own_pairs():
    model = model_for()
    tokens = torch.cat(documents(14, 10), 1)  # the second document starts at 14, inside segment 12..15
    _, state = segments(model, tokens=tokens[:, :16])
    assert state.memory.keys.shape[2] == 12 and state.memory.first.tolist() == [10, 10]  # tokens 4..15 kept
    own = StackState(memory=MemorizingState(keys=state.memory.keys[:, :, 10:], values=state.memory.values[:, :, 10:]))
    with_old, state = segments(model, tokens=tokens[:, 16:], state=state)
    with_own, _ = segments(model, tokens=tokens[:, 16:], state=own)
    torch.testing.assert_close(with_old, with_own, rtol=1e-10, atol=1e-10)
    assert state.memory.first.tolist() == [2, 2]  # tokens 12..23 kept, 14.. readable
    keep_all = model_for(doc_token=-1)
    keep_all.load_state_dict(model.state_dict())
    ignored, _ = segments(keep_all, tokens=tokens)
    read, _ = segments(model, tokens=tokens)
    assert (ignored[:, 16:] - read[:, 16:]).abs().max() > 1e-3  # doc_token = -1 reads across documents


def test_the_store_is_a_bounded_fifo_of_earlier_segments():
    model = model_for()
    _, state = segments(model)
    assert state.memory.keys.shape == (2, 2, 12, 8)  # 24 tokens seen, 12 kept per row and head
    blk = model.stack.blocks[1]  # layer -2 of 3
    assert model.stack.recurrence.layer == 1
    # the kept keys are layer 1's keys (before positions) of the last 12 tokens; without an XL
    # memory each segment runs layer 0 on its own, at positions 0..3
    kept = []
    for s in (12, 16, 20):
        x = model.stack.blocks[0](model.stack.embed(TOKENS[:, s:s + 4]), **layer_args(model, 4))
        kept.append(blk.attn.qkv(blk.norm1(x))[..., d:2 * d].view(2, 4, 2, 8).transpose(1, 2))
    torch.testing.assert_close(state.memory.keys, torch.cat(kept, 2), rtol=1e-10, atol=1e-10)


def layer_args(model, T):
    from tfx.nn.attention.base import AttnSpec

    pos = torch.arange(T)
    spec = AttnSpec(q_pos=pos, k_pos=pos, causal=True, bias=model.stack.pos.bias(pos, pos))
    return {"pos": model.stack.pos, "spec": spec, "q_pos": pos}


@pytest.mark.parametrize("kind, position, mem_len", [("dense", "rope", 0), ("dense", "learned", 0),
                                                     ("local", "alibi", 4), ("dense", "xl", 4)])
def test_no_token_sees_a_later_one(kind, position, mem_len):
    model = model_for(position, kind, mem_len=mem_len)
    emb = model.stack.embed(TOKENS).detach().requires_grad_(True)
    state, outs = model.stack.new_memory(), []
    original = model.stack.embed.forward
    for s in range(0, 24, 4):
        model.stack.embed.forward = lambda _, s=s: emb[:, s:s + 4]
        out, state = model(TOKENS[:, s:s + 4], state)
        outs.append(out)
    model.stack.embed.forward = original
    logits = torch.cat(outs, 1)
    for t in (3, 9, 17):
        grad, = torch.autograd.grad(logits[:, t].sum(), emb, retain_graph=True)
        assert grad[:, t + 1:].abs().max() == 0 and grad[:, :t + 1].abs().max() > 0


def test_a_new_stream_starts_with_an_empty_store():
    model = model_for().train()
    batch = {"input": TOKENS[:, :8], "target": TOKENS[:, 1:9], "reset": torch.tensor(False)}
    _, _, state = model.loss(batch)
    assert state.memory.keys.shape[2] == 8
    _, _, state = model.loss(batch, state)
    assert state.memory.keys.shape[2] == 12
    _, _, state = model.loss({**batch, "reset": torch.tensor(True)}, state)
    assert state.memory.keys.shape[2] == 8


def test_the_gate_learns():
    model = model_for().train()
    logits, _ = segments(model)
    logits.sum().backward()
    assert model.stack.recurrence.gate.grad.abs().sum() > 0
