"""Training batches in a seeded order that a checkpoint can resume exactly: packed token blocks and
lanes (lm, mlm), length buckets (seq2seq, classifier), and examples re-made each epoch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


class StreamBlocks:
    """Cuts a token stream into contiguous lanes, one per batch row (Transformer-XL training).

    Batch i holds segment i of every lane, so each row continues the text of the same row of
    the batch before, and a memory can carry from step to step. Each epoch shifts the lanes by a
    seeded offset; the first batch of an epoch has `reset` set, so the memory starts afresh.
    Rank r of w takes rows r·B ... (r+1)·B - 1 of w·B lanes.
    """

    def __init__(self, ids: torch.Tensor, *, block: int, seed: int, rank: int = 0, world: int = 1):
        self.ids, self.block, self.seed, self.rank, self.world = ids, block, seed, rank, world

    def batches(self, batch_size: int, position: DataPosition):
        """Yield (batch, position after it) forever, starting at `position`."""
        epoch, cursor = position.epoch, position.cursor
        lanes = batch_size * self.world
        offsets = torch.arange(self.block + 1)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            shift = int(torch.randint(self.block, (1,), generator=g)) if epoch else 0
            lane_len = (self.ids.numel() - 1 - shift) // lanes
            segments = lane_len // self.block
            if segments < 1:
                raise ValueError(f"the training text has {self.ids.numel()} tokens, fewer than one segment of "
                                 f"{self.block} per batch row ({lanes} rows); lower train.batch_size or model.context")
            starts = shift + (torch.arange(batch_size) + self.rank * batch_size) * lane_len  # (B,)
            while cursor < segments:
                rows = self.ids[(starts + cursor * self.block)[:, None] + offsets[None, :]].long()  # (B, block + 1)
                batch = {"input": rows[:, :-1], "target": rows[:, 1:], "reset": torch.tensor(cursor == 0),
                         "position": starts + cursor * self.block}  # (B,): each row's first input token in the text
                cursor += 1
                yield batch, DataPosition(epoch, cursor)
            epoch, cursor = epoch + 1, 0


class LengthBatches:
    """Batches of examples of similar length (bucketing), by token budget or by count.

    Each epoch sorts the examples by length with a seeded jitter, cuts the order into batches
    whose padded size (count x longest) stays within `max_tokens` (or `batch_size` examples), and
    shuffles the batches with a seeded permutation; rank r of w takes every w-th batch.

    With `resample` (subword sampling re-encodes the examples each epoch), epoch e orders the same
    examples by the lengths `resample(e)` gives instead, a function of e alone, so a resume holds.
    """

    def __init__(self, lengths: list[int], *, seed: int, max_tokens: int | None = None, batch_size: int = 32,
                 rank: int = 0, world: int = 1, resample: Callable[[int], list[int]] | None = None):
        self.seed, self.max_tokens, self.batch_size, self.rank, self.world = seed, max_tokens, batch_size, rank, world
        self.lengths, self.resample = self._checked(lengths), resample

    def _checked(self, lengths: list[int]) -> torch.Tensor:
        if not lengths:
            raise ValueError("no training examples")
        if self.max_tokens is not None and max(lengths) > self.max_tokens:
            raise ValueError(f"train.max_tokens ({self.max_tokens}) is smaller than the longest example "
                             f"({max(lengths)} tokens)")
        return torch.tensor(lengths, dtype=torch.float64)

    def epoch(self, epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        sizes = self.lengths if self.resample is None else self._checked(self.resample(epoch))
        if sizes.numel() != self.lengths.numel():
            raise ValueError(f"epoch {epoch} has {sizes.numel()} examples, not {self.lengths.numel()}")
        jitter = torch.rand(sizes.numel(), generator=g, dtype=torch.float64)
        order = torch.argsort(sizes + jitter)  # similar lengths together, ties broken at random
        batches, start = [], 0
        lengths = sizes[order].long().tolist()
        while start < len(lengths):
            end, longest = start, 0
            while end < len(lengths):
                longest = max(longest, lengths[end])
                fits = (end - start + 1) * longest <= self.max_tokens if self.max_tokens else end - start < self.batch_size
                if not fits:
                    break
                end += 1
            batches.append(order[start:end])
            start = end
        perm = torch.randperm(len(batches), generator=g)[self.rank::self.world]
        return [batches[i] for i in perm.tolist()]

    def batches(self, position: DataPosition):
        """Yield (example indices, position after them) forever, starting at `position`."""
        epoch, cursor = position.epoch, position.cursor
        while True:
            batches = self.epoch(epoch)
            while cursor < len(batches):
                cursor += 1
                yield batches[cursor - 1], DataPosition(epoch, cursor)
            epoch, cursor = epoch + 1, 0


class PerEpoch:
    """Epoch -> a value made by `make(epoch)`, a pure function of the epoch (the training examples,
    sampled anew each epoch), made once per epoch: the latest epoch's is kept."""

    def __init__(self, make: Callable[[int], object]):
        self.make, self.epoch, self.value = make, None, None

    def __call__(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self.value = None, None  # the last epoch's examples go before the next are made
            self.value, self.epoch = self.make(epoch), epoch
        return self.value


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ids to one (B, T) long tensor."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
