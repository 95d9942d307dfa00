"""What differs between the families around the shared model, loop and run directory: how data
becomes batches, what validation and evaluation report, and what `generate` prints."""
from __future__ import annotations


def get_task(recipe, run_dir=None):
    family = recipe.family
    if family == "lm":
        from tfx.tasks.lm import LMTask as Task
    elif family == "seq2seq":
        from tfx.tasks.seq2seq import Seq2SeqTask as Task
    elif family in ("classifier", "mlm"):
        from tfx.tasks.classifier import ClassifierTask as Task
    else:  # pragma: no cover - the recipe schema allows no other family
        raise ValueError(family)
    return Task(recipe, run_dir)
