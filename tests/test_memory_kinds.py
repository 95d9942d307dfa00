"""Every memory kind composes with the dense and local kernels and the rope, alibi and xl
positions: two consecutive training segments, finite losses, gradients everywhere that trains."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.errors import UsageError
from tfx.families import build_model

import_kinds()
MEMORIES = {
    "xl": {"mem_len": 8},
    "compressive": {"mem_len": 4, "cmem_len": 4, "rate": 2},
    "memorizing": {"size": 16, "top_k": 4, "mem_len": 4},
    "rmt": {"tokens": 2, "segments": 2},
}


@pytest.mark.parametrize("memory", sorted(MEMORIES))
@pytest.mark.parametrize("kind", ["dense", "local"])
@pytest.mark.parametrize("position", ["rope", "alibi", "xl"])
def test_memory_kind_trains_with_kernel_and_position(memory, kind, position):
    recipe = validate({"data": {"train": "x.txt"}, "model": {
        "d_model": 16, "n_layers": 2, "n_heads": 2, "context": 8, "position": {"kind": position},
        "attention": {"kind": kind, **({"window": 4} if kind == "local" else {})},
        "memory": {"kind": memory, **MEMORIES[memory]}}})
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=11).train()
    tokens = torch.randint(0, 11, (2, 17), generator=torch.Generator().manual_seed(0))
    state = None
    for s in (0, 8):
        batch = {"input": tokens[:, s:s + 8], "target": tokens[:, s + 1:s + 9], "reset": torch.tensor(s == 0)}
        loss, parts, state = model.loss(batch, state)
        total = loss / 16 + parts.get("aux_loss", 0)
        total.backward()
        assert torch.isfinite(total)
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, silent


def test_memory_kinds_refuse_other_families():
    for memory in MEMORIES:
        with pytest.raises(UsageError, match="lm family"):
            validate({"family": "classifier", "data": {"train": "x.tsv"},
                      "model": {"position": {"kind": "rope"}, "memory": {"kind": memory}}})


def test_data_blocks_order_the_lm_training_text():
    from types import SimpleNamespace

    from tfx.data.batching import DataPosition
    from tfx.tasks.lm import LMTask

    for memory in MEMORIES:
        with pytest.raises(UsageError, match="data.blocks: 'random'"):
            validate({"data": {"train": "x.txt", "blocks": "random"},
                      "model": {"position": {"kind": "rope"}, "memory": {"kind": memory, **MEMORIES[memory]}}})
    with pytest.raises(UsageError, match="data.blocks: 'lanes' is for the lm family"):
        validate({"family": "classifier", "data": {"train": "x.tsv", "blocks": "lanes"}})
    ids = torch.arange(1000)
    seen = {}
    for blocks in ("auto", "random", "lanes"):
        recipe = validate({"data": {"train": "x.txt", "blocks": blocks}, "model": {"context": 8},
                           "train": {"batch_size": 2}})
        task = LMTask(recipe, None)
        task.load_split = lambda tokenizer, split, fetch=False: (ids, 1000) if split == "train" else None
        batches, _ = task.prepare(SimpleNamespace(vocab_size=1000))
        first, second = (b["input"] for b, _ in (lambda it: (next(it), next(it)))(batches(DataPosition())))
        seen[blocks] = bool(torch.equal(second[:, 0], first[:, -1] + 1))  # each row reads on
    assert seen == {"auto": False, "random": False, "lanes": True}
