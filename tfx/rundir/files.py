"""The run directory's layout and its writes: file names, atomic write + fsync, sha256.

    RUN/recipe.toml          the resolved recipe (overrides applied)
    RUN/tokenizer/           the tokenizer (RUN/tokenizer-src/: a separate seq2seq source side)
    RUN/model.safetensors    weights of the last checkpoint; RUN/best.safetensors: the best train.best_metric
    RUN/state/               checkpoints for an exact resume (tfx/train/checkpoint.py)
    RUN/metrics.jsonl        one JSON object per logged step / validation
    RUN/labels.json          a classifier's label names, in id order (tfx/tasks/classifier.py)
    RUN/knn/                 a kNN-LM datastore (tfx/knn/)

Every write goes to a temporary file that is fsynced and renamed over the target, then the folder
is fsynced, so a kill at any moment leaves either the old file or the new one. This module
imports nothing of tfx, so any part of the package can write into a run.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

RECIPE = "recipe.toml"
TOKENIZER = "tokenizer"
SRC_TOKENIZER = "tokenizer-src"
WEIGHTS = "model.safetensors"
BEST = "best.safetensors"
STATE = "state"
METRICS = "metrics.jsonl"


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (where the platform lets a folder be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | Path, dst: str | Path) -> None:
    """fsync `tmp`, rename it over `dst`, fsync the folder."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(Path(dst).parent)


def temp_path(path: str | Path) -> Path:
    """The temporary name a file is written under before commit()."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def atomic_write_text(path: str | Path, text: str) -> None:
    tmp = temp_path(path)
    tmp.write_text(text, encoding="utf-8")
    commit(tmp, path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_path(run_dir: str | Path, checkpoint: str = "best") -> Path:
    """The weights a run is loaded with: best.safetensors if any (unless `last`), else model.safetensors."""
    best = Path(run_dir) / BEST
    return best if checkpoint != "last" and best.is_file() else Path(run_dir) / WEIGHTS


def is_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / RECIPE).is_file()
