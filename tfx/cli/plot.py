"""`tfx plot RUN... --out FILE.png`: training and validation curves of runs (tfx/plot.py)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tfx.cli.common import err


def plot(
    runs: List[Path] = typer.Argument(..., metavar="RUN...", help="Run directories (their metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Picture to write: .png, .pdf or .svg."),
    y: str = typer.Option("loss", "--y", help="Curves, comma-separated: train.NAME, valid.NAME, or NAME for "
                          "both (loss: the training and the validation loss). --metrics lists them."),
    x: str = typer.Option("step", "--x", help="step, tokens (seen in training) or time (training seconds)."),
    labels: Optional[str] = typer.Option(None, help="Comma-separated legend labels (default: the run folders' names)."),
    log_y: bool = typer.Option(False, "--log-y", help="Logarithmic y axes."),
    metrics: bool = typer.Option(False, "--metrics", help="List the curves each run logged, and exit."),
):
    """Plot the training and validation curves of one or several runs, one panel per curve.

    tfx plot runs/a runs/b --out curves.png                         # training and validation loss
    tfx plot runs/mt --y valid.bleu,train.loss --x time --out mt.png
    tfx plot runs/a --metrics                                       # what runs/a logged
    """
    from tfx.errors import UsageError
    from tfx.plot import curves, plot_runs, read_rows

    if metrics:
        for run in runs:
            found = curves(read_rows(run))
            print(f"{run}\t" + " ".join(f"{name}({len(points)})" for name, points in sorted(found.items())))
        return
    if out is None:
        raise UsageError("give --out FILE.png (or --metrics to list what the runs logged)")
    names = [n.strip() for n in y.split(",") if n.strip()]
    label_list = [s.strip() for s in labels.split(",")] if labels else None
    if label_list is not None and len(label_list) != len(runs):
        raise UsageError(f"--labels: {len(label_list)} labels for {len(runs)} runs")
    drawn = plot_runs(runs, out, names=names, x=x, labels=label_list, log_y=log_y)
    err(f"wrote {out}: " + "; ".join(f"{panel} ({', '.join(f'{k} {n} points' for k, n in lines.items())})"
                                     for panel, lines in drawn.items()))
