"""family = "mim": SimMIM's masking and loss by their definitions, and pretraining -> init_from -> a vit
classifier through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import sets, tfx_in_process
from test_vit import VIT, data_sets, image_data  # noqa: F401  (the fixture)
from tfx.config import validate
from tfx.models.mim import MaskedImageModel, patch_pixels
from tfx.tasks.mim import mask_patches


def test_patch_pixels_are_the_patches_in_raster_order():
    images = torch.randn(2, 3, 8, 12)
    pixels = patch_pixels(images, 4)  # a 2 x 3 grid
    assert pixels.shape == (2, 6, 48)
    for n, (r, c) in enumerate((r, c) for r in range(2) for c in range(3)):
        patch = images[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]  # (B, C, 4, 4)
        torch.testing.assert_close(pixels[:, n], patch.permute(0, 2, 3, 1).reshape(2, -1))


def test_mask_patches_hides_the_same_number_in_every_image_and_is_seeded():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    masked = mask_patches(64, 49, 0.5, g())
    assert (masked.sum(1) == 24).all() and torch.equal(masked, mask_patches(64, 49, 0.5, g()))
    assert masked.float().mean(0).min() > 0.2  # every patch position gets masked in some image
    assert (mask_patches(3, 4, 0.01, g()).sum(1) == 1).all()


def model() -> MaskedImageModel:
    recipe = validate({"family": "mim", "data": {"train": "x.npz"},
                       "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "context": 8, "patch": 4}})
    torch.manual_seed(0)
    return MaskedImageModel(recipe.model, channels=1, image_size=(8, 8)).double()


def test_the_loss_is_the_squared_error_of_the_masked_patches_only():
    m = model()
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    masked = torch.tensor([[True, False, False, True], [False, True, False, False]])
    loss, _, _ = m.loss({"image": images, "masked": masked})
    predicted, target = m.reconstruct(images, masked), patch_pixels(images, 4)
    expected = sum(((predicted[b, n] - target[b, n]) ** 2).mean() for b, n in masked.nonzero().tolist())
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, images)
    pixel_grad = patch_pixels(grad, 4).abs().sum(-1)  # (B, 4): how each patch's pixels move the loss
    assert (pixel_grad[masked] > 0).all()  # a masked patch: it is the target
    assert (pixel_grad[~masked] > 0).all()  # a visible one: the encoder reads it
    # a masked patch's pixels do not reach the encoder: only the [MASK] vector does
    out = m.reconstruct(images, masked)
    (seen,) = torch.autograd.grad(out.sum(), images)
    assert (patch_pixels(seen, 4).abs().sum(-1)[masked] == 0).all()


def test_pretraining_then_init_from_starts_the_classifier_from_the_encoder(image_data, tmp_path):  # noqa: F811
    mim = tmp_path / "mim"
    common = [*data_sets(image_data), *VIT]
    proc = tfx_in_process("train", "recipes/vision/mim-fashion-mnist.toml", "--out", str(mim),
                          *sets(*common, "train.steps=20"))
    assert proc.returncode == 0, proc.stderr
    losses = [r["loss"] for r in map(json.loads, (mim / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert losses[-1] < losses[0]
    assert tfx_in_process("generate", str(mim), "x.png").returncode == 2
    ev = tfx_in_process("eval", str(mim), "--split", "test", "--json")
    assert ev.returncode == 0 and json.loads(ev.stdout)["patches"] == 60 * 2  # half of 4 patches, 60 images
    vit = tmp_path / "vit"
    proc = tfx_in_process("train", "recipes/vision/fashion-mnist-pretrained.toml", "--out", str(vit),
                          *sets(*common, f"init_from={mim}", "train.steps=1", "train.optimizer.lr=1e-9"))
    assert proc.returncode == 0, proc.stderr
    assert "encoder and patches and cls initialised from" in proc.stderr
    from tfx.run import load_run

    pre, fine = load_run(str(mim))[2], load_run(str(vit), checkpoint="last")[2]
    for name, p in pre.state_dict().items():
        if not name.startswith(("head", "mask_token")):
            torch.testing.assert_close(fine.state_dict()[name], p, atol=1e-6, rtol=0)
    bad = tfx_in_process("train", "recipes/vision/fashion-mnist-pretrained.toml", "--out", str(tmp_path / "bad"),
                         *sets(*common, f"init_from={mim}", "model.d_model=16", "train.steps=1"))
    assert bad.returncode == 2 and "does not fit" in bad.stderr
