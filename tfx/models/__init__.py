"""Model families; `build_model(recipe, tokenizer=...)` picks the family's class."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from tfx.errors import UsageError


def labels_of(run_dir: str | Path) -> list[str]:
    return json.loads((Path(run_dir) / "labels.json").read_text(encoding="utf-8"))


def build_model(recipe, *, tokenizer=None, vocab_size: int | None = None, run_dir: str | Path | None = None) -> nn.Module:
    """The recipe's model. Encoder-only families get one extra id past the tokenizer: [MASK]."""
    vocab = vocab_size if vocab_size is not None else tokenizer.vocab_size
    if recipe.family == "lm":
        from tfx.models.lm import LanguageModel

        return LanguageModel(recipe.model, vocab_size=vocab)
    if recipe.family == "seq2seq":
        from tfx.models.seq2seq import Seq2Seq

        src_vocab = None
        if recipe.src_tokenizer is not None:
            from tfx.data.tokenizers import load_tokenizer

            src_vocab = load_tokenizer(Path(run_dir) / "tokenizer-src").vocab_size
        return Seq2Seq(recipe.model, vocab_size=vocab, src_vocab_size=src_vocab,
                       label_smoothing=recipe.train.label_smoothing)
    from tfx.models.encoder import Classifier, MaskedLM

    if recipe.family == "mlm":
        return MaskedLM(recipe.model, vocab_size=vocab + 1, mask_prob=recipe.train.mask_prob)
    return Classifier(recipe.model, vocab_size=vocab + 1, n_labels=len(labels_of(run_dir)))


def init_from(model: nn.Module, run_dir: str, *, log) -> None:
    """Start `model.encoder` from the encoder of another run (e.g. an MLM pretraining run)."""
    from tfx.run import load_run

    _, _, source = load_run(run_dir)
    if not hasattr(source, "encoder") or not hasattr(model, "encoder"):
        raise UsageError(f"init_from: {run_dir} has no encoder to start from")
    theirs = source.encoder.state_dict()
    ours = model.encoder.state_dict()
    bad = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    if bad:
        raise UsageError(f"init_from: the encoder of {run_dir} does not fit this recipe's model "
                         f"(first mismatch: {bad[0]}); use the same model settings as the pretraining run")
    model.encoder.load_state_dict(theirs)
    log(f"encoder initialised from {run_dir} ({len(theirs)} tensors); the head is new")
