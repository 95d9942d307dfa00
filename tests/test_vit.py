"""The vit family: the patch embedding and pooling by their definitions, image sizes and position
schemes, and the CLI end to end on a small learnable image set (train, eval, generate, resume, bad input)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_tfx, sets, tfx_in_process
from tfx.config import validate
from tfx.errors import UsageError
from tfx.models.vit import VisionTransformer


def vit(position: str = "learned", pool: str = "cls", size=(8, 8), **model) -> VisionTransformer:
    recipe = validate({"family": "vit", "data": {"train": "x.npz"},
                       "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "context": 16, "patch": 4, "pool": pool,
                                 "position": {"kind": position}, **model}})
    torch.manual_seed(0)
    return VisionTransformer(recipe.model, channels=2, image_size=size, n_labels=3).double().eval()


def test_the_patch_embedding_is_one_linear_map_per_patch_in_raster_order():
    model = vit()
    images = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    x, grid = model.embed(images)
    assert grid == (2, 2, 1) and x.shape == (2, 5, 16)
    w = model.patches.weight.reshape(16, -1)  # (d_model, C * 4 * 4)
    for n, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        patch = images[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(2, -1)  # (B, C * 16)
        torch.testing.assert_close(x[:, 1 + n], patch @ w.T + model.patches.bias)
    torch.testing.assert_close(x[:, 0], model.cls[0].expand(2, -1))


def test_the_conv_stem_is_a_3x3_convolution_and_gelu_before_the_patches():
    model = vit(stem=3)
    images = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    x, _ = model.embed(images)
    conv = model.stem[0]
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    features = torch.zeros(2, 3, 8, 8, dtype=torch.float64)  # the convolution written out, pixel by pixel
    for i in range(8):
        for j in range(8):
            window = padded[:, :, i:i + 3, j:j + 3].reshape(2, -1)
            features[:, :, i, j] = window @ conv.weight.reshape(3, -1).T + conv.bias
    features = torch.nn.functional.gelu(features)
    w = model.patches.weight.reshape(16, -1)
    patch = features[:, :, 4:8, 0:4].reshape(2, -1)  # row 1, column 0: the third patch
    torch.testing.assert_close(x[:, 3], patch @ w.T + model.patches.bias)
    changed = images.clone()
    changed[:, :, 3, 3] += 1.0  # the last pixel of patch (0, 0): its 3 x 3 neighbourhood reaches every other patch
    y, _ = model.embed(changed)
    assert all((y[:, n] != x[:, n]).any() for n in range(1, 5))
    changed = images.clone()
    changed[:, :, 0, 0] += 1.0  # a corner pixel reaches patch (0, 0) only
    y, _ = model.embed(changed)
    assert (y[:, 1] != x[:, 1]).any() and torch.equal(y[:, 2:], x[:, 2:])


def test_masked_image_modelling_refuses_the_stem_with_the_reason():
    from tfx.models.mim import MaskedImageModel

    recipe = validate({"family": "mim", "data": {"train": "x.npz"}, "model": {"patch": 4, "stem": 8}})
    with pytest.raises(UsageError, match="masked neighbours"):
        MaskedImageModel(recipe.model, channels=1, image_size=(8, 8))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_pooling_is_the_cls_output_or_the_mean_of_the_patches(pool):
    model = vit(pool=pool)
    images = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    x, grid = model.embed(images)
    h, _ = model.encoder(None, embeds=x, grid=grid)
    expected = h[:, 0] if pool == "cls" else h.mean(1)
    assert h.shape[1] == (5 if pool == "cls" else 4)
    torch.testing.assert_close(model(images), model.head(expected))


@pytest.mark.parametrize("position", ["learned_2d", "sinusoidal_2d", "rope_2d", "none"])
def test_2d_positions_take_images_of_another_size(position):
    model = vit(position)
    out = model(torch.randn(2, 2, 12, 16, dtype=torch.float64))  # a 3 x 4 grid instead of 2 x 2
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope"])
def test_1d_positions_refuse_another_size_with_the_reason(position):
    model = vit(position)
    with pytest.raises(UsageError, match="trained on 8 x 8.*learned_2d"):
        model(torch.randn(1, 2, 12, 12, dtype=torch.float64))
    with pytest.raises(UsageError, match="does not divide the 10 x 8"):
        model(torch.randn(1, 2, 10, 8, dtype=torch.float64))
    with pytest.raises(UsageError, match="3 channel"):
        model(torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_the_recipe_check_keeps_images_and_text_apart():
    with pytest.raises(UsageError, match="reads images"):
        validate({"family": "vit", "data": {"train": "x.npz"}, "tokenizer": {"kind": "char"}})
    with pytest.raises(UsageError, match="'rope_2d' places positions on a grid"):
        validate({"data": {"train": "x.txt"}, "model": {"position": {"kind": "rope_2d"}}})
    with pytest.raises(UsageError, match="'window' works on a grid"):
        validate({"family": "classifier", "data": {"train": "x.tsv"}, "model": {"attention": {"kind": "window"}}})
    with pytest.raises(UsageError, match="model.stem: a convolution over image pixels"):
        validate({"data": {"train": "x.txt"}, "model": {"stem": 16}})
    with pytest.raises(UsageError, match="context \\(16\\) is shorter than the 4 x 4 patches"):
        vit(size=(16, 16))


# ----------------------------------------------------------------------------- CLI, end to end

def pattern_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8 x 8 grey images of 2-pixel stripes, horizontal (label 0) or vertical (1), or a checkerboard
    of 2 x 2 squares (2), at a random phase, with noise: every patch shows its class."""
    g = np.random.default_rng(seed)
    labels = g.integers(0, 3, n)
    r, c = np.indices((8, 8))
    images = np.empty((n, 8, 8), np.uint8)
    for i, label in enumerate(labels):
        dr, dc = g.integers(0, 2, 2)
        rows, cols = (r + dr) // 2 % 2, (c + dc) // 2 % 2
        on = [rows, cols, rows ^ cols][label]
        images[i] = on * 150 + g.integers(0, 90, (8, 8))
    return images, labels


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    classes = np.array(["horizontal", "vertical", "checked"])
    for split, n, seed in (("train", 300, 0), ("valid", 60, 1), ("test", 60, 2)):
        images, labels = pattern_images(n, seed)
        np.savez(root / f"{split}.npz", images=images, labels=labels, classes=classes)
    return root


VIT = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.context=8",
       "model.patch=4", "train.batch_size=16", "train.threads=1", "train.log_every=1", "train.eval_every=0",
       "train.schedule.warmup=5", "train.optimizer.lr=0.003", "tokenizer.shift=1", "tokenizer.flip=false"]


def data_sets(root) -> list[str]:
    return [f"data.corpus=''", f"data.train={root / 'train.npz'}", f"data.valid={root / 'valid.npz'}",
            f"data.test={root / 'test.npz'}"]


@pytest.fixture(scope="module")
def vit_run(image_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "vit"
    proc = tfx_in_process("train", "recipes/vision/fashion-mnist.toml", "--out", str(run),
                          *sets(*data_sets(image_data), *VIT, "train.steps=120", "train.max_minutes=5"))
    assert proc.returncode == 0, proc.stderr
    return run


def test_train_then_eval_learns_the_patterns(vit_run):
    proc = tfx_in_process("eval", str(vit_run), "--split", "test", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["accuracy"] >= 0.9, result
    assert set(json.loads((vit_run / "labels.json").read_text())) == {"horizontal", "vertical", "checked"}


def test_generate_labels_image_paths_one_line_each_with_per_line_errors(vit_run, tmp_path):
    from PIL import Image

    images, labels = pattern_images(3, 7)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    lines = [str(paths[0]), str(tmp_path / "missing.png"), str(tmp_path / "rgb.png"), "", str(paths[1]), str(paths[2])]
    proc = run_tfx("generate", str(vit_run), "-", "--top-k", "2", input="\n".join(lines) + "\n")  # a real stdin
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    out = proc.stdout.split("\n")[:-1]
    assert len(out) == len(lines) and out[1] == out[2] == out[3] == ""
    names = ["horizontal", "vertical", "checked"]
    assert [o.split("\t")[0] for o in (out[0], out[4], out[5])] == [names[i] for i in labels]
    assert len(out[0].split("\t")) == 4 and "line 2: " in proc.stderr and "missing.png: no such file" in proc.stderr
    assert "line 3: " in proc.stderr and "3 channel" in proc.stderr and "3 input line(s)" in proc.stderr


def test_bad_image_data_exits_2_naming_the_file(vit_run, image_data, tmp_path):
    np.savez(tmp_path / "odd.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array(["checked", "sideways"] * 2))
    proc = tfx_in_process("eval", str(vit_run), "--data", str(tmp_path / "odd.npz"))
    assert proc.returncode == 2 and "'sideways' was not in the training data" in proc.stderr
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 no")
    proc = tfx_in_process("eval", str(vit_run), "--data", str(tmp_path / "corrupt.npz"))
    assert proc.returncode == 2 and "corrupt.npz: not a readable .npz" in proc.stderr and "Traceback" not in proc.stderr
    np.savez(tmp_path / "one.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array(["a"] * 4))
    proc = tfx_in_process("train", "recipes/vision/fashion-mnist.toml", "--out", str(tmp_path / "r"),
                          *sets(*data_sets(image_data), f"data.train={tmp_path / 'one.npz'}", *VIT))
    assert proc.returncode == 2 and "one.npz: the training images have one class ('a')" in proc.stderr


def test_a_resumed_run_sees_the_same_augmented_batches(image_data, tmp_path):
    common = [*data_sets(image_data), *VIT, "tokenizer.flip=true", "model.dropout=0.1", "train.save_every=3"]
    whole = tfx_in_process("train", "recipes/vision/fashion-mnist.toml", "--out", str(tmp_path / "whole"),
                           *sets(*common, "train.steps=6"))
    assert whole.returncode == 0, whole.stderr
    cut = tfx_in_process("train", "recipes/vision/fashion-mnist.toml", "--out", str(tmp_path / "cut"),
                         *sets(*common, "train.steps=3"))
    assert cut.returncode == 0, cut.stderr
    resumed = tfx_in_process("train", "--resume", str(tmp_path / "cut"), *sets("train.steps=6"))
    assert resumed.returncode == 0, resumed.stderr

    def losses(run):
        return [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r and "step" in r and "valid" not in json.dumps(r)]

    assert len(losses("whole")) == 6 and losses("cut") == losses("whole")


def test_an_efficientvit_block_relu_linear_attention_and_dwconv_trains_on_any_grid():
    model = vit("rope_2d", pool="mean", attention={"kind": "linear", "feature": "relu"}, ffn="dwconv").train()
    images = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    loss, _, _ = model.loss({"image": images, "label": torch.tensor([0, 1, 2, 0])})
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.eval()(torch.randn(1, 2, 12, 8, dtype=torch.float64)).shape == (1, 3)


def test_test_time_augmentation_views_and_eval(vit_run, image_data):
    """--tta: the mean of the class probabilities over the image, its mirror (tokenizer.flip) and their
    one-pixel shifts (tokenizer.shift), each view checked against the transform written out."""
    from tfx.data.tokenizers import load_tokenizer
    from tfx.rundir import load_run
    from tfx.tasks.vit import views

    codec = load_tokenizer(vit_run / "tokenizer")  # shift 1, no flip: the image and 4 shifts
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4) + 1
    got = [v(x) for v in views(codec)]
    up = torch.zeros_like(x)
    up[..., 1:, :] = x[..., :-1, :]  # view(dy=-1) reads the row above: the image moves down
    assert len(got) == 5 and torch.equal(got[0], x) and torch.equal(got[1], up)
    both = [v(x) for v in views(SimpleNamespace(config=SimpleNamespace(flip=True, shift=1)))]
    assert len(both) == 10 and torch.equal(both[1], x.flip(-1)) and torch.equal(both[6], got[1].flip(-1))
    assert len(views(SimpleNamespace(config=SimpleNamespace(flip=True, shift=0)))) == 2
    assert len(views(SimpleNamespace(config=SimpleNamespace(flip=False, shift=0)))) == 1
    plain = json.loads(tfx_in_process("eval", str(vit_run), "--split", "test", "--json").stdout)
    proc = tfx_in_process("eval", str(vit_run), "--split", "test", "--json", "--tta")
    assert proc.returncode == 0, proc.stderr
    tta = json.loads(proc.stdout)
    recipe, codec, model = load_run(vit_run)
    data = np.load(image_data / "test.npz")
    names = json.loads((vit_run / "labels.json").read_text())
    gold = torch.tensor([names.index(c) for c in data["classes"][data["labels"]]])
    with torch.no_grad():
        images = codec.tensor(data["images"][..., None])
        p = sum(model(v(images)).softmax(-1) for v in views(codec)) / 5
    assert tta["accuracy"] == pytest.approx((p.argmax(-1) == gold).float().mean().item())
    assert tta["loss"] != plain["loss"]


def test_tta_is_refused_for_a_text_run(tmp_path, small_text):
    from conftest import TINY

    run = tmp_path / "lm"
    proc = tfx_in_process("train", "recipes/lm/shakespeare-char.toml", "--out", str(run),
                          *sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1",
                                "train.steps=1", "train.eval_every=0"))
    assert proc.returncode == 0, proc.stderr
    r = tfx_in_process("eval", str(run), "--split", "valid", "--tta")
    assert r.returncode == 2 and "--tta averages over image views" in r.stderr and "Traceback" not in r.stderr
