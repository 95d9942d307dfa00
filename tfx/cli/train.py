"""`tfx train` (a recipe into a run directory, or --resume one) and `tfx average`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tfx.cli.common import SET
from tfx.errors import UsageError


def train(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe TOML (omit with --resume)."),
    set_: Optional[List[str]] = SET,
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<recipe name>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory exactly."),
    nproc: Optional[int] = typer.Option(None, help="Data parallel on this machine: start N processes, as "
                                        "torchrun --standalone does (train.batch_size stays the global batch)."),
):
    """Train a model from RECIPE into a run directory, or --resume one."""
    from tfx import run

    if recipe is not None and resume is not None:
        raise UsageError("give either a RECIPE or --resume RUN, not both (a resumed run keeps its recipe; "
                         "change keys with --set)")
    if nproc is not None:
        from tfx.train.launch import launch

        raise typer.Exit(launch(nproc, recipe, set_ or [], out, resume))
    run.train(str(recipe) if recipe else None, overrides=set_ or [], out=str(out) if out else None,
              resume=str(resume) if resume else None)


def average(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    last: int = typer.Option(5, help="Average the newest K checkpoints."),
    out: Path = typer.Option(..., help="The new run directory."),
):
    """Average the weights of a run's last K checkpoints into a new run (for eval/generate)."""
    from tfx import run

    if last <= 0:
        raise UsageError("--last must be positive")
    print(run.average(str(run_dir), last=last, out=str(out)))
