"""`train.tensorboard = true`: the metrics.jsonl rows also written as TensorBoard scalars under
RUN/tensorboard/ (train/NAME and valid/NAME against the step), for people who read runs there.
Needs the `tensorboard` package, which tfx does not install; metrics.jsonl stays the record."""
from __future__ import annotations

from pathlib import Path

from tfx.errors import UsageError

FOLDER = "tensorboard"


def open_writer(run_dir: Path):
    """A SummaryWriter over RUN/tensorboard/, or a UsageError naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("train.tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or set train.tensorboard = false)") from None
    return SummaryWriter(log_dir=str(run_dir / FOLDER))


def write_scalars(writer, record: dict) -> None:
    """One metrics row as scalars: numbers only, tagged by the row's split (train when it has none)."""
    split = record.get("split", "train")
    step = record["step"]
    for key, value in record.items():
        if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(f"{split}/{key}", value, step)
    writer.flush()
