"""Pieces every task uses: where a split's data is, logging, device placement of batches."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tfx.errors import UsageError


def log(msg: str) -> None:
    """A progress message on stderr; under torchrun only rank 0's (the others stay quiet)."""
    if os.environ.get("RANK", "0") != "0":
        return
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


@dataclass(frozen=True)
class EvalOptions:
    """How `tfx eval` reads a split, beyond the recipe (each family uses the fields that apply)."""

    stride: int | None = None       # lm: sliding-window stride (default: the window)
    context: int | None = None      # lm: window length (default: the training context)
    batch_size: int = 32            # lm: windows per forward pass
    max_tokens: int | None = None   # lm: score only the first N tokens
    stream: tuple[int, int] | None = None  # lm: (sinks, window) read in order through a sink cache
    knn: Any = None                 # lm: (Datastore, KNNSettings) adds the kNN-LM's metrics
    generate: Any = None            # seq2seq: the recipe's [generate] with --beam applied (a GenerateConfig)
    hyp_out: str | None = None      # seq2seq: write the hypotheses to this file
    tta: bool = False               # images: average over the training augmentations' views (tfx/tasks/vit.py)


@dataclass(frozen=True)
class GenerateSettings:
    """How `tfx generate` decodes: the recipe's [generate] table with the command's overrides
    (`config`, a validated GenerateConfig), and what has no recipe key."""

    config: Any                      # tfx.config.GenerateConfig
    stop: tuple[str, ...] = ()       # lm: end a continuation at any of these strings
    nbest: int | None = None         # seq2seq: print the n best of the beam
    stream: tuple[int, int] | None = None  # lm: (sinks, window) of an attention-sink cache
    generator: Any = None            # torch.Generator for reproducible sampling
    on_text: Callable[[str], None] | None = None  # lm: receives the text as it is generated
    knn: Any = None                  # lm: (Datastore, KNNSettings) samples from the kNN-LM


def holdout_source(recipe, split: str, *, fetch: bool) -> tuple[str | None, float]:
    """(source, fraction): without a valid split, `data.holdout` takes a fraction of train for
    valid, so the train and valid splits both read the training source (fraction 0: no holdout)."""
    holdout = recipe.data.holdout if split != "test" and split_source(recipe, "valid", fetch=fetch) is None \
        else 0.0
    return split_source(recipe, "train" if holdout else split, fetch=fetch), holdout


def holdout_rows(n: int, fraction: float, split: str, *, seed: int, strata: list | None = None) -> list[int]:
    """The rows of `split` (train or valid) among n training rows when `fraction` of them is held out
    for validation: the last rows, or with `strata` (labels) a seeded draw of the same fraction of
    every stratum. The rows keep their order."""
    if strata is None:
        cut = int(n * (1 - fraction))
        return list(range(cut)) if split == "train" else list(range(cut, n))
    import random

    rng, held = random.Random(seed), set()
    for value in sorted(set(strata)):
        rows = [i for i in range(n) if strata[i] == value]
        rng.shuffle(rows)
        held.update(rows[: round(len(rows) * fraction)])
    return [i for i in range(n) if (i in held) == (split != "train")]


def sampling_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """The seed of epoch `epoch`'s sampled segmentations (`stream`: 0 the source or the text, 1 the
    target), a function of (train.seed, epoch, stream) alone: a resumed run samples an epoch as the
    uninterrupted one did, and under torchrun every rank samples the same global batches."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{stream}".encode()).digest()[:8], "little")


def epoch_examples(fixed: list, sample: Callable[[int], list] | None, fits: Callable) -> Callable[[int], list]:
    """Epoch -> the training examples: `fixed` (one deterministic encoding) every epoch, or with subword
    sampling `sample(epoch)`, made once per epoch, where an example whose sample does not `fit` (the
    context, train.max_tokens) keeps its fixed encoding, so every epoch has the same examples."""
    if sample is None:
        return lambda epoch: fixed
    from tfx.data.batching import PerEpoch

    return PerEpoch(lambda epoch: [s if fits(s) else f for s, f in zip(sample(epoch), fixed)])


class Task:
    """Base of the family tasks; see tfx.tasks.lm for the reference implementation."""

    # why the family's training data cannot take subword sampling (tokenizer.sampling_alpha); None: it can
    no_sampling: str | None = None

    def __init__(self, recipe, run_dir=None):
        self.recipe, self.run_dir = recipe, run_dir
        if self.no_sampling and getattr(getattr(recipe, "tokenizer", None), "sampling_alpha", None) is not None:
            raise UsageError(f"tokenizer.sampling_alpha: subword sampling is for the sentence-level families "
                             f"(seq2seq, classifier), not {recipe.family}: {self.no_sampling}; remove the key")

    def tokenizer_texts(self, side: str = "joint") -> list[str]:
        """The texts a new tokenizer is trained on (`side`: src or tgt for separate seq2seq ones)."""
        raise NotImplementedError

    def decoder_batches(self, tokenizer, split: str, max_tokens: int) -> list[dict]:
        """A split as a decoder reads it, for `tfx calibrate-exit`: batches of "tokens" (B, T) decoder
        inputs and "keep" (B, T), the positions that count, plus a seq2seq's "src" and "src_mask"."""
        raise UsageError(f"a {self.recipe.family} model has no decoder to exit early from")

    def vocab_size(self, tokenizer) -> int:
        return tokenizer.vocab_size

    def documents(self, split: str, *, fetch: bool = False) -> list[str] | None:
        """The texts of a split, or None where the recipe has none."""
        from tfx.data.datasets import read_documents

        source = split_source(self.recipe, split, fetch=fetch)
        return None if source is None else read_documents(source, split=split, text_field=self.recipe.data.text_field)
