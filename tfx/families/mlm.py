"""`family = "mlm"`: masked-LM pretraining of an encoder (BERT's 80/10/10), for `init_from` in a classifier."""
from __future__ import annotations

from tfx.families.base import Family, StackSpec, register


def build(recipe, vocab_size: int, run_dir=None):
    from tfx.models.encoder import MaskedLM

    return MaskedLM(recipe.model, vocab_size=vocab_size + 1, mask_prob=recipe.train.mask_prob,  # + [MASK]
                    word_dropout=recipe.train.word_dropout, rdrop=recipe.train.rdrop)


def task():
    from tfx.tasks.mlm import MLMTask

    return MLMTask


register(Family(
    name="mlm", about="encoder-only, BERT masking (80/10/10): masked-token loss",
    stacks=(StackSpec("encoder", causal=False, padded=True),), build=build, task=task,
))
