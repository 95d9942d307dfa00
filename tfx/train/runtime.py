"""What a training process takes from its surroundings: the device, the stop signals, and a
metrics.jsonl cut back to a checkpoint's step."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import torch

from tfx.errors import RunError
from tfx.train import checkpoint as ckpt
from tfx.train import distributed as dist


def select_device(name: str) -> torch.device:
    """train.device: `auto` is CUDA where present, then Apple's MPS, then the CPU. Under torchrun a
    CUDA process takes the GPU of its LOCAL_RANK (one process per GPU)."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RunError("train.device = 'cuda' but no CUDA device is available")
        if dist.world() > 1:
            index, count = dist.local_rank(), torch.cuda.device_count()
            if index >= count:
                raise RunError(f"LOCAL_RANK {index} but this node has {count} CUDA device(s): start at most "
                               f"{count} process(es) per node (--nproc-per-node)")
            return torch.device("cuda", index)
    return torch.device(name)


class StopFlag:
    """SIGINT/SIGTERM ask the loop to save and exit at the end of the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def trim_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint's step (they will be recomputed) and torn last lines."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    ckpt.atomic_write_text(path, "".join(x + "\n" for x in keep))
