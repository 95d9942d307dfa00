"""The run directory: its layout and atomic writes (tfx.rundir.files), and loading a saved run."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tfx.errors import UsageError
from tfx.rundir.files import RECIPE, SRC_TOKENIZER, TOKENIZER, is_run, weights_path

__all__ = ["load_run", "weights_path", "is_run", "RECIPE", "TOKENIZER", "SRC_TOKENIZER"]


def load_run(run_dir: str | Path, *, checkpoint: str = "best", overrides: Iterable[str] = ()):
    """(recipe, tokenizer, model) of a saved run, weights from `best` (if any) or `last`, in eval mode."""
    from tfx import config as C
    from tfx.data.tokenizers import load_tokenizer
    from tfx.families import build_model
    from tfx.train.checkpoint import load_weights

    run = Path(run_dir)
    if not is_run(run):
        raise UsageError(f"{run}: not a tfx run directory (no {RECIPE})")
    recipe = C.load_recipe(run / RECIPE, list(overrides), files=False)
    tokenizer = load_tokenizer(run / TOKENIZER)
    model = build_model(recipe, tokenizer=tokenizer, run_dir=run)
    load_weights(model, weights_path(run, checkpoint))
    model.eval()
    return recipe, tokenizer, model


def _hand_over() -> None:
    """SPALM's memory loads its datastore's run (tfx/nn/memory/spalm.py) through this module."""
    from tfx.nn.memory import spalm

    spalm.load_run = load_run


_hand_over()
