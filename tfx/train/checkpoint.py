"""Checkpoints that a kill at any moment cannot corrupt, and that load without running code.

    RUN/model.safetensors            weights of the last checkpoint (a hard link into state/)
    RUN/best.safetensors             weights with the best validation train.best_metric
    RUN/state/LATEST                 name of the complete checkpoint directory to resume from
    RUN/state/ckpt-XXXXXXXX/         model.safetensors, optim.pt (tensors only), trainer.json
                                     (train.parallel = "fsdp": + dcp/, the sharded model and
                                     optimizer state; optim.pt then holds the RNG states only)

A checkpoint directory is written completely and fsynced before LATEST is switched to it with an
atomic rename; only then are older directories removed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from tfx.errors import RunError
from tfx.rundir.files import STATE, WEIGHTS, atomic_write_text, commit, fsync_dir, temp_path  # noqa: F401  (atomic_write_text: re-exported)


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """safetensors (no pickle); tied weights are stored once."""
    tmp = temp_path(path)
    save_model(model, str(tmp))
    commit(tmp, path)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no weights at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:  # reads and checks the header
            f.keys()
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise RunError(f"{path}: cannot load weights (truncated or corrupt checkpoint?): {exc}") from None
    try:
        load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise RunError(f"{path}: the weights do not fit the model (was a model key changed with --set?): "
                       f"{detail[-1] if detail else exc}") from None
    except Exception as exc:
        raise RunError(f"{path}: cannot load weights (truncated or corrupt checkpoint?): {exc}") from None


def _link(src: Path, dst: Path) -> None:
    """Point dst at src's bytes atomically (hard link, or a copy where links are not possible)."""
    tmp = temp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    commit(tmp, dst)


def save_checkpoint(run_dir: str | Path, *, model, optimizer, trainer: dict, extra: dict, keep: int = 1) -> Path:
    """Write a complete checkpoint for `trainer['step']` and make it the one to resume from.

    `extra` holds tensors (RNG states, ...) saved beside the optimizer state.
    """
    state_dir, name, tmp = _fresh(run_dir, trainer["step"])
    return _publish(state_dir, name, tmp, weights=model, blob={"optimizer": optimizer.state_dict(), **extra},
                    trainer=trainer, keep=keep)


def save_sharded_checkpoint(run_dir: str | Path, *, model, optimizer, weights, trainer: dict, extra: dict,
                            keep: int = 1) -> Path | None:
    """The same under train.parallel = "fsdp", called by every rank: model and optimizer state go to
    `dcp/` in torch.distributed.checkpoint's sharded format (each rank writes its shards); rank 0
    (the one given `weights`, its unsharded copy of the model) writes the full weights, the extra
    tensors and trainer.json, and publishes the checkpoint as `save_checkpoint` does."""
    from tfx.train import distributed as dist
    from tfx.train import sharded

    first = dist.rank() == 0
    if first:
        state_dir, name, tmp = _fresh(run_dir, trainer["step"])
    else:
        state_dir = Path(run_dir) / STATE
        name, tmp = f"ckpt-{trainer['step']:08d}", state_dir / f".ckpt-{trainer['step']:08d}.tmp"
    dist.barrier()  # the temporary folder exists
    sharded.save(tmp / sharded.SHARDED, model, optimizer)  # DCP fsyncs its files
    dist.barrier()  # every rank's shards are written
    final = _publish(state_dir, name, tmp, weights=weights, blob=extra, trainer=trainer, keep=keep) if first else None
    dist.barrier()  # the checkpoint is published before any rank goes on
    return final


def _fresh(run_dir: str | Path, step: int) -> tuple[Path, str, Path]:
    """(state folder, checkpoint name, an empty temporary folder to write it in)."""
    state_dir = Path(run_dir) / STATE
    state_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:08d}"
    tmp = state_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return state_dir, name, tmp


def _publish(state_dir: Path, name: str, tmp: Path, *, weights, blob: dict, trainer: dict, keep: int) -> Path:
    """Write the weights, optim.pt (`blob`) and trainer.json into `tmp`, fsync, rename it to its final
    name, point LATEST and RUN/model.safetensors at it, and drop checkpoints beyond `keep`."""
    save_weights(weights, tmp / WEIGHTS)
    torch.save(blob, tmp / "optim.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer), encoding="utf-8")
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            fsync_dir(f)
    final = state_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(state_dir)
    atomic_write_text(state_dir / "LATEST", name + "\n")
    _link(final / WEIGHTS, state_dir.parent / WEIGHTS)
    older = sorted(p for p in state_dir.glob("ckpt-*") if p.name != name)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint directories of a run, oldest first."""
    return sorted(p for p in (Path(run_dir) / STATE).glob("ckpt-*") if (p / WEIGHTS).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path:
    state_dir = Path(run_dir) / STATE
    try:
        name = (state_dir / "LATEST").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise RunError(f"{run_dir}: no checkpoint to resume from (state/LATEST is missing)") from None
    path = state_dir / name
    if not name.startswith("ckpt-") or not path.is_dir():
        raise RunError(f"{run_dir}: state/LATEST names {name!r}, which is not a checkpoint directory")
    return path


def require_sharded(run_dir: str | Path) -> None:
    """Refuse to resume a checkpoint of full tensors into FSDP shards, with the way out."""
    from tfx.train.sharded import SHARDED

    path = latest_checkpoint(run_dir)
    if not (path / SHARDED).is_dir():
        raise RunError(f"{path} was saved with train.parallel = 'ddp' (full tensors, not sharded ones): resume "
                       f"it with --set train.parallel=ddp, at any number of processes")


def load_checkpoint(run_dir: str | Path, *, model, optimizer) -> tuple[dict, dict]:
    """Restore model and optimizer from the latest checkpoint; returns (trainer, extra tensors)."""
    from tfx.train import sharded

    path = latest_checkpoint(run_dir)
    if not (path / sharded.SHARDED).is_dir():
        load_weights(model, path / WEIGHTS)
    try:
        trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        blob = torch.load(path / "optim.pt", weights_only=True, map_location="cpu")
        if (path / sharded.SHARDED).is_dir():  # train.parallel = "fsdp": resharded to this world
            sharded.load(path / sharded.SHARDED, model, optimizer)
        else:
            optimizer.load_state_dict(blob.pop("optimizer"))
    except Exception as exc:
        raise RunError(f"{path}: cannot load the training state (truncated or corrupt checkpoint?): {exc}") from None
    return trainer, blob
