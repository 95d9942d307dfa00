"""Sharded data parallel (train.parallel = "fsdp"): torch's FSDP2 and torch.distributed.checkpoint.

Every Transformer block of every stack is its own `fully_shard` unit, and the loss wrapper
(tfx.train.distributed.LossModule) is the root unit that holds the rest (embeddings, norms, heads,
tied weights together): each rank keeps 1/world of the parameters, gradients and AdamW state, and
gathers a block's parameters just before it runs. Batches are sharded by rank as under DDP.

A run with train.parallel = "fsdp" keeps its model and optimizer state in DCP's sharded format
(`ckpt-*/dcp/`, one file per rank plus metadata), at any world size, one process included: DCP
reshards on load, so the run resumes on any number of processes, and a single process reads it
without a process group. Beside it rank 0 writes the full weights (`model.safetensors`, gathered
to its CPU), which `tfx eval`, `tfx generate` and `tfx average` read as for any run.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

SHARDED = "dcp"  # the folder of a checkpoint that holds the sharded model and optimizer state


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over `model.loss`: one unit per block, the loss wrapper as the root; returns the root."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from tfx.nn.stack import TransformerStack
    from tfx.train.distributed import LossModule

    for stack in [m for m in model.modules() if isinstance(m, TransformerStack)]:
        for block in stack.blocks:
            if getattr(block, "cross", None) is not None:  # its own unit: the decoder projects the source's
                fully_shard(block.cross)  # keys/values once per source, outside the block's forward
                register_fsdp_forward_method(block.cross, "project_source")
            fully_shard(block)
    return fully_shard(LossModule(model))


def full_weights(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full weights gathered to rank 0's CPU (a collective: every rank calls it; the
    others get an empty dict). Names are the model's own, as in a 1-process state_dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


@contextlib.contextmanager
def _quiet():
    """DCP warns that it 'assumes the intent is to load in a single process' when there is no
    process group: with one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state into a DCP folder (a collective under a process group: each rank
    writes its shards; rank 0 the metadata). `model` is the inner model, sharded or not."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state from a DCP folder, resharded to this world (1 process included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
