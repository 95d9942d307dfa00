"""`family = "seq2seq"`: an encoder-decoder Transformer (Vaswani et al., 2017) for translation."""
from __future__ import annotations

from pathlib import Path

from tfx.families.base import Family, StackSpec, register


def build(recipe, vocab_size: int, run_dir=None):
    from tfx.models.seq2seq import Seq2Seq

    src_vocab = None
    if recipe.src_tokenizer is not None:  # a separate source vocabulary, saved by the run
        from tfx.data.tokenizers import load_tokenizer

        src_vocab = load_tokenizer(Path(run_dir) / "tokenizer-src").vocab_size
    return Seq2Seq(recipe.model, vocab_size=vocab_size, src_vocab_size=src_vocab,
                   label_smoothing=recipe.train.label_smoothing, word_dropout=recipe.train.word_dropout,
                   rdrop=recipe.train.rdrop)


def task():
    from tfx.tasks.seq2seq import Seq2SeqTask

    return Seq2SeqTask


def metrics(recipe) -> frozenset[str]:
    return frozenset({"loss", "bleu", "chrf"} if recipe.train.eval_bleu else {"loss"})


register(Family(
    name="seq2seq", about="encoder-decoder: sacreBLEU BLEU and chrF, loss; translates lines",
    stacks=(StackSpec("encoder", causal=False, padded=True), StackSpec("decoder", causal=True, padded=False, cross=True)),
    build=build, task=task, metrics=metrics, metrics_hint="bleu and chrf need train.eval_bleu = true",
    two_sided=True,
))
