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
    nproc: Optional[int] = typer.Option(None, help="Data parallel on this machine: start N processes under "
                                        "torchrun (train.batch_size stays the global batch)."),
):
    """Train a model from RECIPE into a run directory, or --resume one."""
    from tfx import run

    if recipe is not None and resume is not None:
        raise UsageError("give either a RECIPE or --resume RUN, not both (a resumed run keeps its recipe; "
                         "change keys with --set)")
    if nproc is not None:
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


def launch(nproc: int, recipe: Optional[Path], sets: List[str], out: Optional[Path], resume: Optional[Path]) -> int:
    """`tfx train` again under torchrun on this node (`--standalone --nproc-per-node N`), the same
    arguments less --nproc; each rank gets cores / N threads unless train.threads says otherwise.
    The recipe is checked here first, so a batch that does not divide is refused before any start."""
    import os
    import subprocess
    import sys

    from tfx import config as C
    from tfx.train import distributed as dist

    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: expected a positive number of processes")
    if "RANK" in os.environ:
        raise UsageError("--nproc starts torchrun itself; under torchrun, leave it out")
    if recipe is not None:
        dist.check_recipe(C.load_recipe(str(recipe), sets), nproc)
    elif resume is not None and (resume / "recipe.toml").is_file():
        dist.check_recipe(C.load_recipe(str(resume / "recipe.toml"), sets), nproc)
    args = [str(recipe)] if recipe is not None else []
    for item in sets:
        args += ["--set", item]
    if out is not None:
        args += ["--out", str(out)]
    if resume is not None:
        args += ["--resume", str(resume)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # torchrun would say 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tfx", "train", *args]
    return subprocess.call(cmd, env=env)
