"""LM batches as packed token blocks, in a seeded order that a checkpoint can resume exactly."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DataPosition:
    """Where the next batch starts: the epoch and the index of the next block in its order."""

    epoch: int = 0
    cursor: int = 0


class PackedBlocks:
    """Cuts a token stream into blocks of `block + 1` tokens (input and shifted target).

    Each epoch shifts the block grid by a seeded offset and shuffles the blocks with a seeded
    permutation, so every epoch sees new windows and the order is a pure function of
    (seed, epoch): resuming needs only the DataPosition. Rank r of w takes every w-th block.
    """

    def __init__(self, ids: torch.Tensor, *, block: int, seed: int, rank: int = 0, world: int = 1):
        if ids.numel() < block + 1:
            raise ValueError(f"the training text has {ids.numel()} tokens, fewer than one block ({block + 1})")
        self.ids, self.block, self.seed, self.rank, self.world = ids, block, seed, rank, world

    def _order(self, epoch: int) -> tuple[int, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        shift = int(torch.randint(self.block, (1,), generator=g)) if epoch else 0
        n = (self.ids.numel() - 1 - shift) // self.block
        order = torch.randperm(n, generator=g)[self.rank::self.world]
        return shift, order

    def batches(self, batch_size: int, position: DataPosition):
        """Yield (batch, position after it) forever, starting at `position`."""
        epoch, cursor = position.epoch, position.cursor
        offsets = torch.arange(self.block + 1)
        while True:
            shift, order = self._order(epoch)
            if order.numel() < batch_size:
                raise ValueError(f"the training text has {order.numel()} blocks per rank, fewer than a batch "
                                 f"({batch_size}); lower train.batch_size or model.context")
            while cursor + batch_size <= order.numel():
                starts = shift + order[cursor:cursor + batch_size] * self.block  # (B,)
                rows = self.ids[starts[:, None] + offsets[None, :]].long()  # (B, block + 1)
                cursor += batch_size
                yield {"input": rows[:, :-1], "target": rows[:, 1:]}, DataPosition(epoch, cursor)
            epoch, cursor = epoch + 1, 0
