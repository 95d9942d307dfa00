"""Pieces every task uses: where a split's data is, logging, device placement of batches."""
from __future__ import annotations

import sys
from pathlib import Path

from tfx.errors import UsageError


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split_source(recipe, split: str, *, fetch: bool) -> str | None:
    """The file, file prefix (PREFIX.src/PREFIX.tgt) or hf: name of a split, or None.

    A named corpus is fetched on first use when `fetch`.
    """
    value = getattr(recipe.data, split)
    if value or not recipe.data.corpus:
        return value
    from tfx.data import corpora

    files = corpora.split_files(recipe.data.corpus, split)
    if not files:
        return None
    if not all(f.is_file() for f in files):
        if not fetch:
            raise UsageError(f"corpus {recipe.data.corpus!r} is not fetched; run: tfx data get {recipe.data.corpus}")
        corpora.get_corpus(recipe.data.corpus, log=log)
    return str(files[0]) if len(files) == 1 else str(Path(files[0]).with_suffix(""))


class Task:
    """Base of the family tasks; see tfx.tasks.lm for the reference implementation."""

    def __init__(self, recipe, run_dir=None):
        self.recipe, self.run_dir = recipe, run_dir

    def tokenizer_texts(self, side: str = "joint") -> list[str]:
        """The texts a new tokenizer is trained on (`side`: src or tgt for separate seq2seq ones)."""
        raise NotImplementedError

    def vocab_size(self, tokenizer) -> int:
        return tokenizer.vocab_size
