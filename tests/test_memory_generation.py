"""Generation with a compressive or memorizing memory (tfx/decoding/segments.py): each token's logits
equal those of evaluation, which reads the text segment by segment with the memory carried."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.decoding.generate import generate_ids
from tfx.decoding.segments import SegmentReader, reads_by_segments
from tfx.families import build_model

import_kinds()
V, C = 17, 8  # vocabulary, context (the segment)

MEMORIES = {
    "compressive-conv": {"kind": "compressive", "mem_len": 6, "cmem_len": 4, "rate": 2, "compression": "conv"},
    "compressive-most-used": {"kind": "compressive", "mem_len": 6, "cmem_len": 4, "rate": 2,
                              "compression": "most_used"},
    "memorizing": {"kind": "memorizing", "size": 12, "top_k": 4},
    "memorizing-xl": {"kind": "memorizing", "size": 12, "top_k": 4, "mem_len": 4},
}


def model_for(memory: dict):
    recipe = validate({"data": {"train": "x.txt"}, "model": {
        "d_model": 16, "n_layers": 3, "n_heads": 2, "context": C, "position": {"kind": "rope"}, "memory": memory}})
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=V).double().eval()
    if memory["kind"] == "memorizing":
        model.stack.recurrence.gate.data.fill_(2.0)  # lean on the store, so that a wrong store shows
    return model


TEXT = torch.randint(2, V, (30,), generator=torch.Generator().manual_seed(5))
TEXT[0] = 1  # BOS


def by_segments(model, text: torch.Tensor, *, carry: bool = True) -> torch.Tensor:
    """(T, V) logits of evaluation's reading: segments of C from the first token, the memory carried
    (or, with carry=False, a fresh memory for every segment)."""
    state, out = model.stack.new_memory(), []
    for s in range(0, text.numel(), C):
        if not carry:
            state = model.stack.new_memory()
        logits, state = model(text[None, s:s + C], state)
        out.append(logits[0])
    return torch.cat(out)


@pytest.mark.parametrize("name", MEMORIES)
def test_token_by_token_logits_equal_evaluation_by_segments(name):
    model = model_for(MEMORIES[name])
    assert reads_by_segments(model)
    want = by_segments(model, TEXT)
    assert not torch.allclose(want[C:], by_segments(model, TEXT, carry=False)[C:])  # the memory matters
    reader = SegmentReader(model, "cpu")
    got = [reader.feed(TEXT[:5].tolist())[0, -1]]  # a prompt, then one token at a time
    got += [reader.feed([int(t)])[0, -1] for t in TEXT[5:]]
    torch.testing.assert_close(torch.stack(got), want[4:], rtol=1e-10, atol=1e-10)


def test_reading_an_unfinished_segment_leaves_the_memory_as_it_was():
    model = model_for(MEMORIES["memorizing-xl"])
    reader = SegmentReader(model, "cpu")
    reader.feed(TEXT[:C].tolist())  # one full segment: the memory moves on
    memory = reader.state.memory
    kept = (memory.keys, memory.values, list(memory.hidden))
    reader.feed(TEXT[C:C + 3].tolist())
    assert reader.state.memory is memory and memory.keys is kept[0] and memory.values is kept[1]
    assert all(a is b for a, b in zip(memory.hidden, kept[2]))


@pytest.mark.parametrize("name", ["compressive-conv", "memorizing"])
def test_greedy_generation_follows_evaluation_past_the_context(name):
    model = model_for(MEMORIES[name]).float()
    prompt = TEXT[:11].tolist()  # longer than the context: read whole, not cut
    out = generate_ids(model, prompt, max_new_tokens=14, temperature=0.0)
    assert len(out) == 14
    text = list(prompt)
    for token in out:
        logits = by_segments(model, torch.tensor(text))
        assert token == int(logits[-1].argmax())
        text.append(token)


def test_xl_keeps_its_kv_cache():
    model = model_for({"kind": "xl", "mem_len": 4})
    assert not reads_by_segments(model)
