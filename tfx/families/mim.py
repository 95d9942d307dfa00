"""`family = "mim"`: masked image modelling (SimMIM) of a ViT encoder, for `init_from` in a vit classifier."""
from __future__ import annotations

from tfx.families.base import Family, StackSpec, register


def build(recipe, vocab_size: int, run_dir=None):
    from tfx.data.image_codec import run_codec
    from tfx.models.mim import MaskedImageModel

    codec = run_codec(run_dir)
    return MaskedImageModel(recipe.model, channels=codec.channels, image_size=codec.size)


def task():
    from tfx.tasks.mim import MaskedImageTask

    return MaskedImageTask


register(Family(
    name="mim", about="images: masked image modelling (SimMIM), reconstruction loss on the masked patches",
    stacks=(StackSpec("encoder", causal=False, padded=False),), build=build, task=task, images=True,
))
