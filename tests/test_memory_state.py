"""Each memory kind's own State: a checkpoint's save() restores to the same continuation (also
from the names and the plain list older runs saved), reorder selects batch rows, and the position
schemes that declare themselves relative are the ones the memory and sink checks name."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.families import build_model
from tfx.nn.memory import relative_positions

import_kinds()
V, d = 17, 16
KINDS = {
    "xl": {"mem_len": 6},
    "compressive": {"mem_len": 4, "cmem_len": 4, "rate": 2, "compression": "most_used"},
    "memorizing": {"size": 10, "top_k": 3, "mem_len": 4},
    "rmt": {"tokens": 2, "segments": 2},
}
ELSEWHERE = {"spalm": "tests/test_spalm.py (it needs a trained run with a datastore)"}
TOKENS = torch.randint(2, V, (3, 24), generator=torch.Generator().manual_seed(3))


def model_for(kind: str):
    recipe = validate({"data": {"train": "x.txt"}, "model": {
        "d_model": d, "n_layers": 2, "n_heads": 2, "context": 8, "position": {"kind": "rope"},
        "memory": {"kind": kind, **KINDS[kind]}}})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=V).double().eval()


def run(model, state, tokens):
    outs = []
    for s in range(0, tokens.shape[1], 4):
        out, state = model(tokens[:, s:s + 4], state)
        outs.append(out)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_restore_continue_the_same(kind):
    model = model_for(kind)
    _, state = run(model, model.stack.new_memory(), TOKENS[:, :12])
    saved = state.memory.save()
    assert saved and all(t.device.type == "cpu" for ts in saved.values() for t in ts)
    assert set(saved) <= {"memory", "compressed", "usage", "recall_k", "recall_v", "recall_from", "rmt"}
    restored = model.restore_memory(saved, "cpu")
    assert type(restored.memory) is type(state.memory)
    want, _ = run(model, state, TOKENS[:, 12:])
    got, _ = run(model, restored, TOKENS[:, 12:])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_old_runs_plain_list_restores_the_xl_memory():
    model = model_for("xl")
    _, state = run(model, model.stack.new_memory(), TOKENS[:, :12])
    old = [t.clone() for t in state.memory.hidden]  # checkpoints before the compressive memory
    want, _ = run(model, state, TOKENS[:, 12:])
    got, _ = run(model, model.restore_memory(old, "cpu"), TOKENS[:, 12:])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_reorder_selects_rows_of_every_field(kind):
    model = model_for(kind)
    _, state = run(model, model.stack.new_memory(), TOKENS[:, :12])
    _, alone = run(model, model.stack.new_memory(), TOKENS[2:, :12])
    state.reorder(torch.tensor([2]))
    want, _ = run(model, alone, TOKENS[2:, 12:])
    got, _ = run(model, state, TOKENS[2:, 12:])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_relative_schemes_are_those_that_declare_it():
    assert set(relative_positions()) == {"rope", "alibi", "xl", "t5", "shaw", "da", "none"}
    with pytest.raises(Exception, match=r"needs relative positions \(.*rope.*\)"):
        validate({"data": {"train": "x.txt"}, "model": {"position": {"kind": "learned"},
                                                         "memory": {"kind": "xl", "mem_len": 4}}})


def test_every_registered_memory_kind_is_covered_here():
    from tfx.registry import MEMORY

    assert set(KINDS) | set(ELSEWHERE) == set(MEMORY.names()) - {"none"}, \
        "a new memory kind: add its settings to KINDS"
