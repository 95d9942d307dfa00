"""`family = "lm"`: a decoder-only language model (GPT) over packed token blocks."""
from __future__ import annotations

from tfx.families.base import Family, StackSpec, register


def build(recipe, vocab_size: int, run_dir=None):
    from tfx.models.lm import LanguageModel

    if recipe.model.patches.size:  # MEGABYTE: patches of bytes, a global and a local model
        from tfx.models.megabyte import Megabyte

        return Megabyte(recipe.model, vocab_size=vocab_size)

    return LanguageModel(recipe.model, vocab_size=vocab_size, word_dropout=recipe.train.word_dropout,
                         rdrop=recipe.train.rdrop)


def task():
    from tfx.tasks.lm import LMTask

    return LMTask


register(Family(
    name="lm", about="decoder-only (GPT): loss, perplexity, bits per byte; continues prompts",
    stacks=(StackSpec("decoder", causal=True, padded=False),), build=build, task=task,
    memory=True, blocks=True, continues_text=True,
))
