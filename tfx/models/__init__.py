"""Model families; `build_model(recipe, vocab_size)` picks the family's class."""
from __future__ import annotations

from torch import nn


def build_model(recipe, *, vocab_size: int) -> nn.Module:
    if recipe.family == "lm":
        from tfx.models.lm import LanguageModel

        return LanguageModel(recipe.model, vocab_size=vocab_size)
    raise ValueError(f"unknown family {recipe.family!r}")
