"""Transformer-XL recurrence: two segments with enough memory equal one pass over both, the
memory is gradient-stopped and bounded, and training streams carry it from step to step."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.errors import UsageError
from tfx.families import build_model

import_kinds()
V = 17


def model_for(position="rope", kind="dense", mem_len=8, **attention):
    recipe = validate({"data": {"train": "x.txt"}, "model": {
        "d_model": 16, "n_layers": 2, "n_heads": 2, "context": 8, "position": {"kind": position},
        "attention": {"kind": kind, **attention}, "memory": {"kind": "xl", "mem_len": mem_len}}})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=V).double().eval()


TOKENS = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind, position", [("dense", p) for p in ("rope", "alibi", "xl", "t5", "shaw", "da")]
                         + [("local", p) for p in ("rope", "alibi", "xl", "t5")])
def test_two_segments_with_memory_equal_one_pass(kind, position):
    model = model_for(position, kind, **({"window": 16} if kind == "local" else {}))
    full, _ = model(TOKENS)
    state = model.stack.new_memory()
    first, state = model(TOKENS[:, :8], state)
    assert [m.shape for m in state.memory.hidden] == [(2, 8, 16)] * 2
    second, state = model(TOKENS[:, 8:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-10, atol=1e-10)


def test_memory_is_bounded_and_gradient_stopped():
    model = model_for(mem_len=5).train()
    state = model.stack.new_memory()
    _, state = model(TOKENS[:, :8], state)
    assert all(m.shape == (2, 5, 16) and not m.requires_grad for m in state.memory.hidden)
    emb = model.stack.embed
    logits, state = model(TOKENS[:, 8:], state)
    logits.sum().backward()
    assert emb.weight.grad is not None  # the segment itself still trains
    # the second segment sees the memory: changing the first segment changes its logits
    other = model.stack.new_memory()
    _, other = model(TOKENS[:, :8].flip(1), other)
    assert not torch.allclose(model(TOKENS[:, 8:], other)[0], logits)


def test_memory_refuses_absolute_positions_and_other_families():
    with pytest.raises(UsageError, match="relative positions"):
        model_for("learned")
    with pytest.raises(UsageError, match="no cache"):
        model_for("rope", "lsh")


def test_recurrent_scoring_equals_one_pass_when_the_memory_covers_the_text():
    from tfx.evaluate import score_stream_recurrent

    model = model_for(mem_len=32)
    ids = torch.randint(0, V, (21,), generator=torch.Generator().manual_seed(4))
    logits, _ = model(ids[None, :-1])
    expected = torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="sum")
    nll, count = score_stream_recurrent(model, ids, segment=8, lanes=1)
    assert count == 20 and nll == pytest.approx(float(expected.detach()), rel=1e-6)  # scored in float32
    nll2, count2 = score_stream_recurrent(model, ids, segment=8, lanes=3)  # lanes + the remainder
    assert count2 == 20 and nll2 != pytest.approx(nll)  # lanes start without memory


def test_stream_blocks_continue_each_row_and_reset_each_epoch():
    from tfx.data.batching import DataPosition, StreamBlocks

    ids = torch.arange(101)
    it = StreamBlocks(ids, block=5, seed=0).batches(3, DataPosition())
    (a, _), (b, pos) = next(it), next(it)
    assert bool(a["reset"]) and not bool(b["reset"])
    assert torch.equal(b["input"][:, 0], a["input"][:, -1] + 1)  # row r goes on where it stopped
    assert torch.equal(a["target"], a["input"] + 1)
    batches = [next(it) for _ in range(5)]  # 100 // 3 = 33 per lane: 6 segments of 5 per epoch
    assert [bool(x["reset"]) for x, _ in batches] == [False, False, False, False, True]
    again = StreamBlocks(ids, block=5, seed=0).batches(3, pos)
    assert torch.equal(next(again)[0]["input"], batches[0][0]["input"])  # resumes exactly


@pytest.mark.parametrize("memory", [("model.memory.kind=xl", "model.memory.mem_len=16"),
                                    ("model.memory.kind=compressive", "model.memory.mem_len=8",
                                     "model.memory.cmem_len=4", "model.memory.rate=2"),
                                    ("model.memory.kind=memorizing", "model.memory.size=48", "model.memory.top_k=8"),
                                    ("model.memory.kind=rmt", "model.memory.tokens=4", "model.memory.segments=2")])
def test_training_with_memory_resumes_with_the_same_losses(tmp_path, small_text, memory):
    """In process (the CLI's resume is covered end to end by test_cli's kill-and-resume test)."""
    import json

    from conftest import TINY

    from tfx import run

    threads = torch.get_num_threads()  # the recipe's train.threads sets it for the whole process
    overrides = [*TINY, f"data.train={small_text}", "data.corpus=''", "model.position.kind=rope", *memory,
                 "model.dropout=0.1", "train.save_every=4", "train.eval_every=0",
                 "train.schedule.decay_steps=8"]  # same lr either way
    try:
        run.train("recipes/lm/shakespeare-char.toml", overrides=[*overrides, "train.steps=8"],
                  out=str(tmp_path / "a"), resume=None)
        run.train("recipes/lm/shakespeare-char.toml", overrides=[*overrides, "train.steps=4"],
                  out=str(tmp_path / "b"), resume=None)
        run.train(None, overrides=["train.steps=8"], out=None, resume=str(tmp_path / "b"))
        ev = run.evaluate(str(tmp_path / "a"), data=str(small_text))
    finally:
        torch.set_num_threads(threads)

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "split" not in r]

    assert len(losses("a")) == 8 and losses("a") == losses("b")
    assert ev["tokens"] == len(small_text.read_text(encoding="utf-8"))  # every character scored once
