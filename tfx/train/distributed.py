"""Data parallel training on torch.distributed: the process group from torchrun's environment.

Under `torchrun` (or `tfx train --nproc N`) every rank builds the same GLOBAL batch from the same
seeded data order and takes its own rows of it (`shard`); the model is wrapped in
DistributedDataParallel for the gradient all-reduce. With one process (no WORLD_SIZE, or 1)
nothing here does anything: no process group, no wrapping, no collectives.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch

from tfx.errors import UsageError

TIMEOUT_ENV = "TFX_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks (default 30 min)


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def backend_for(device_type: str) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device_type: str):
    """Initialise the process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)
    when the world is above 1, gloo on CPU and nccl on CUDA, with a finite timeout; destroy it on
    the way out, on errors too. Yields the world size."""
    n = world()
    if n <= 1 or active():
        yield n
        return
    if not torch.distributed.is_available():
        raise UsageError(f"WORLD_SIZE={n} but this torch has no torch.distributed")
    backend = backend_for(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))
    torch.distributed.init_process_group(backend=backend, timeout=timeout)
    try:
        yield n
    finally:
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor (in place; returned); the tensor itself with one process."""
    if active():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
    return value


def sum_numbers(*values: float) -> list[float]:
    """Numbers summed over ranks (one collective for all of them), in float64."""
    if not active():
        return list(values)
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if nccl else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.tolist()


def gather_objects(value) -> list:
    """Every rank's `value` (picklable), in rank order; [value] with one process."""
    if not active():
        return [value]
    out = [None] * world()
    torch.distributed.all_gather_object(out, value)
    return out


def accumulating(wrapped, last: bool):
    """Context for one micro-batch's backward: the gradient sync (all-reduce under DDP, reduce-scatter
    under FSDP) only after the last micro-batch of a step."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else wrapped.no_sync()


def check_recipe(recipe, n: int) -> None:
    """Refuse what does not run at world size `n` (> 1), with the reason."""
    if n <= 1:
        return
    if recipe.train.max_tokens is None and recipe.train.batch_size % n:
        raise UsageError(f"train.batch_size ({recipe.train.batch_size}) is the global batch and must divide by "
                         f"the number of processes ({n}): each rank takes batch_size / {n} rows; pick a multiple "
                         f"of {n}")
    if recipe.train.ema and recipe.train.parallel == "fsdp":
        raise UsageError(f"train.ema averages whole weights, which train.parallel = 'fsdp' shards over the {n} "
                         f"processes: use train.parallel = 'ddp' with it, or drop train.ema")
    if recipe.model.memory.kind != "none":
        raise UsageError(f"model.memory.kind = {recipe.model.memory.kind!r} cannot train on {n} processes: the lanes "
                         f"of a segment memory carry from step to step inside one process; train it with one")


def rows(batch: dict) -> int:
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)


def shard(batch: dict, r: int, n: int) -> dict:
    """Rank r's rows of a global batch: rows [r*B/n, (r+1)*B/n) of every tensor with a batch dimension
    (0-dim tensors, such as a reset flag, are kept). The batch must have at least n rows."""
    total = rows(batch)
    lo, hi = r * total // n, (r + 1) * total // n
    return {k: v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}


class LossModule(torch.nn.Module):
    """`model.loss` as a forward, so that DistributedDataParallel's hooks (the gradient all-reduce)
    see it; parameters are the model's own (no prefix change in what a checkpoint saves: the
    trainer saves the inner model)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, state=None):
        return self.model.loss(batch, state)


def wrap(model: torch.nn.Module, device: torch.device):
    """DistributedDataParallel over `model.loss`."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
    return DistributedDataParallel(LossModule(model), device_ids=ids)
