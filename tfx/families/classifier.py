"""`family = "classifier"`: an encoder-only text classifier (Devlin et al., 2019), [CLS] or mean pooling."""
from __future__ import annotations

from tfx.families.base import Family, StackSpec, register


def build(recipe, vocab_size: int, run_dir=None):
    from tfx.models.encoder import Classifier
    from tfx.tasks.classifier import read_labels

    # one id past the tokenizer's: [MASK], so that a masked-LM encoder fits (init_from)
    return Classifier(recipe.model, vocab_size=vocab_size + 1, n_labels=len(read_labels(run_dir)),
                      word_dropout=recipe.train.word_dropout, rdrop=recipe.train.rdrop)


def task():
    from tfx.tasks.classifier import ClassifierTask

    return ClassifierTask


register(Family(
    name="classifier", about="encoder-only: accuracy, macro-F1, per-class table, confusion; labels lines",
    stacks=(StackSpec("encoder", causal=False, padded=True),), build=build, task=task,
    metrics=lambda recipe: frozenset({"loss", "accuracy", "macro_f1"}),
))
