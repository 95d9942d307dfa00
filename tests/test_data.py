"""Packed LM blocks (deterministic, resumable, sharded) and sliding-window scoring spans."""
from __future__ import annotations

import itertools

import pytest
import torch

from tfx.data.batching import DataPosition, PackedBlocks
from tfx.evaluate import windows


@pytest.mark.parametrize("n,context,stride", [(2, 8, 8), (10, 4, 4), (100, 16, 16), (100, 16, 5), (37, 8, 1)])
def test_windows_score_every_token_once_with_bounded_context(n, context, stride):
    scored = []
    for start, end, first in windows(n, context, stride):
        assert 0 < end - start <= context and end <= n - 1
        targets = list(range(start + 1, end + 1))[first:]
        scored += targets
        if start > 0:  # after the first window, each scored token keeps context - stride tokens of history
            assert targets[0] - start >= context - stride
    assert scored == list(range(1, n))


def test_packed_blocks_are_contiguous_text_and_shifted_targets():
    ids = torch.arange(1000, dtype=torch.int32)
    blocks = PackedBlocks(ids, block=10, seed=1)
    batch, _ = next(blocks.batches(4, DataPosition()))
    assert batch["input"].shape == (4, 10)
    assert torch.equal(batch["target"], batch["input"] + 1)
    assert all(int(row[0]) % 10 == 0 for row in batch["input"])  # epoch 0: the grid starts at 0


def test_packed_blocks_resume_from_a_position_and_cover_an_epoch():
    ids = torch.arange(401, dtype=torch.int32)
    blocks = PackedBlocks(ids, block=10, seed=7)
    straight = list(itertools.islice(blocks.batches(4, DataPosition()), 25))
    resumed = list(itertools.islice(blocks.batches(4, straight[11][1]), 13))
    for (a, _), (b, _) in zip(straight[12:], resumed):
        assert torch.equal(a["input"], b["input"])
    firsts = torch.cat([b["input"][:, 0] for b, pos in straight if pos.epoch == 0 and pos.cursor <= 40])
    assert sorted(firsts.tolist()) == list(range(0, 400, 10))  # each block once per epoch
    assert straight[9][1] == DataPosition(0, 40) and straight[10][1] == DataPosition(1, 4)


def test_ranks_take_disjoint_blocks():
    ids = torch.arange(801, dtype=torch.int32)
    seen = [set(next(PackedBlocks(ids, block=10, seed=3, rank=r, world=2).batches(40, DataPosition()))[0]
                ["input"][:, 0].tolist()) for r in (0, 1)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 80


def test_too_little_text_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one block"):
        PackedBlocks(torch.arange(5), block=10, seed=0)
    with pytest.raises(ValueError, match="fewer than a batch"):
        next(PackedBlocks(torch.arange(31), block=10, seed=0).batches(8, DataPosition()))


def test_length_batches_budget_cover_and_resume():
    from tfx.data.batching import LengthBatches

    lengths = [int(x) for x in torch.randint(1, 40, (300,), generator=torch.Generator().manual_seed(0))]
    order = LengthBatches(lengths, seed=4, max_tokens=200)
    epoch0 = order.epoch(0)
    assert sorted(torch.cat(epoch0).tolist()) == list(range(300))  # every example once per epoch
    assert all(len(b) * max(lengths[i] for i in b.tolist()) <= 200 for b in epoch0)
    spread = [max(lengths[i] for i in b.tolist()) - min(lengths[i] for i in b.tolist()) for b in epoch0]
    assert sum(spread) / len(spread) < 5  # bucketing: similar lengths share a batch
    straight = list(itertools.islice(order.batches(DataPosition()), len(epoch0) + 5))
    resumed = list(itertools.islice(order.batches(straight[6][1]), len(epoch0) - 2))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(straight[7:], resumed))
    by_count = LengthBatches(lengths, seed=4, batch_size=16).epoch(0)
    assert max(len(b) for b in by_count) == 16
    with pytest.raises(ValueError, match="smaller than the longest"):
        LengthBatches(lengths, seed=0, max_tokens=10)
