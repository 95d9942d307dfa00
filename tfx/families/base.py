"""The Family record and the FAMILY registry (tfx/families/__init__.py explains both)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tfx.errors import UsageError
from tfx.registry import Registry


@dataclass(frozen=True)
class StackSpec:
    """A self-attention stack of a family's model, as the recipe checks see it."""

    name: str     # encoder / decoder
    causal: bool  # a token attends only to earlier ones
    padded: bool  # batches pad keys (the kernel must mask them)
    cross: bool = False  # its blocks also attend to another stack's output (a translation decoder)


@dataclass(frozen=True)
class Family:
    """What a family is made of; see tfx/families/lm.py for the reference entry."""

    name: str
    about: str
    stacks: tuple[StackSpec, ...]
    # (recipe, vocab_size, run_dir) -> the model; run_dir holds what the task saved (labels, a source tokenizer)
    build: Callable[[Any, int, Path | None], Any]
    task: Callable[[], type]  # the Task class, imported when first needed
    # the numbers its validation reports, any of which can pick best.safetensors (train.best_metric)
    metrics: Callable[[Any], frozenset[str]] = lambda recipe: frozenset({"loss"})
    metrics_hint: str = ""  # said when a best_metric it does not report is asked for
    memory: bool = False    # takes a segment memory (model.memory.kind other than none)
    blocks: bool = False    # data.blocks orders its training blocks (a token stream)
    continues_text: bool = False  # decoder-only: kNN-LM, attention-sink streaming, bench generate
    two_sided: bool = False  # source and target text (PREFIX.src + PREFIX.tgt files, src_tokenizer)
    images: bool = False     # reads images: its tokenizer is the ImageCodec (tokenizer.kind = "image")
    stack_names: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "stack_names", tuple(s.name for s in self.stacks))


FAMILY: Registry = Registry("family")


def register(family: Family) -> Family:
    FAMILY.register(family.name)(family)
    return family


def family_of(recipe_or_name) -> Family:
    """The Family record of a recipe (or of a family name)."""
    name = recipe_or_name if isinstance(recipe_or_name, str) else recipe_or_name.family
    return FAMILY.get(name)


def family_names() -> list[str]:
    return FAMILY.names()


def need_text_lm(recipe, what: str) -> None:
    """Refuse `what` (an option or command) for a family that does not continue text."""
    if not family_of(recipe).continues_text:
        raise UsageError(f"{what} needs a decoder-only lm run, not a {recipe.family} run")
