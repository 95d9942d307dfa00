"""`family = "vit"`: a Vision Transformer image classifier (Dosovitskiy et al., 2021) on the shared stack."""
from __future__ import annotations

from tfx.families.base import Family, StackSpec, register


def build(recipe, vocab_size: int, run_dir=None):
    from tfx.data.image_codec import run_codec
    from tfx.models.vit import VisionTransformer
    from tfx.tasks.classifier import read_labels

    codec = run_codec(run_dir)  # image size and channels
    return VisionTransformer(recipe.model, channels=codec.channels, image_size=codec.size,
                             n_labels=len(read_labels(run_dir)), rdrop=recipe.train.rdrop,
                             label_smoothing=recipe.train.label_smoothing)


def task():
    from tfx.tasks.vit import ImageTask

    return ImageTask


register(Family(
    name="vit", about="images: ViT patches, accuracy, macro-F1, per-class table, confusion; labels image paths",
    stacks=(StackSpec("encoder", causal=False, padded=False),), build=build, task=task,
    metrics=lambda recipe: frozenset({"loss", "accuracy", "macro_f1"}),
    images=True,
))
