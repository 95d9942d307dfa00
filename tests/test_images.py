"""Image data: idx files, a .deb read without dpkg, the Fashion-MNIST conversion, .npz / folder / hf:
image sets, and the image codec (the vit family's tokenizer)."""
from __future__ import annotations

import gzip
import io
import lzma
import tarfile

import numpy as np
import pytest
import torch

from tfx.data import corpus_images as ci
from tfx.data.image_codec import ImageCodec, ImageConfig
from tfx.data.images import read_image_set
from tfx.errors import RunError


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format written out by hand: 0, 0, 0x08 (uint8), ndim, sizes as big-endian uint32, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_plain_and_gzipped_and_its_errors():
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(ci.read_idx(idx_bytes(a)), a)
    assert np.array_equal(ci.read_idx(gzip.compress(idx_bytes(a))), a)
    with pytest.raises(RunError, match="bad header"):
        ci.read_idx(b"\x01\x02\x03\x04" + bytes(10), "x.idx")
    with pytest.raises(RunError, match=r"x.idx: the header says \(2, 3, 4\)"):
        ci.read_idx(idx_bytes(a)[:-1], "x.idx")
    with pytest.raises(RunError, match="not a readable gzip"):
        ci.read_idx(gzip.compress(idx_bytes(a))[:20], "y.gz")


def fake_deb(files: dict[str, bytes]) -> bytes:
    """A .deb as dpkg builds one: an ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    def tar_xz(entries: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, blob in entries.items():
                info = tarfile.TarInfo(f"./{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return lzma.compress(buffer.getvalue())

    out = b"!<arch>\n"
    for name, blob in [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"control": b"Package: x\n"})),
                       ("data.tar.xz", tar_xz(files))]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode() + blob + (b"\n" if len(blob) % 2 else b"")
    return out


def test_a_deb_is_read_without_dpkg_and_fashion_mnist_is_split(tmp_path, monkeypatch):
    g = np.random.default_rng(0)
    train_x, test_x = g.integers(0, 256, (7, 28, 28)), g.integers(0, 256, (3, 28, 28))
    train_y, test_y = np.array([0, 1, 2, 9, 4, 5, 6]), np.array([9, 0, 1])
    d = ci.FASHION_DIR
    deb = tmp_path / "x.deb"
    deb.write_bytes(fake_deb({
        f"{d}train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(train_x)),
        f"{d}train-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(train_y)),
        f"{d}t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(test_x)),
        f"{d}t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(test_y)),
        "usr/share/doc/x/README": b"not data",
    }))
    monkeypatch.setattr(ci, "FASHION_VALID", 2)
    files, meta = ci.convert_fashion_mnist(deb)
    assert meta["images"] == {"train": 5, "valid": 2, "test": 3}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    again, _ = ci.convert_fashion_mnist(deb)
    assert again == files  # byte for byte: the checksums hold on every machine
    train, valid, test = (read_image_set(str(tmp_path / f"{s}.npz")) for s in ("train", "valid", "test"))
    assert np.array_equal(train.images[..., 0], train_x[:5]) and np.array_equal(valid.images[..., 0], train_x[5:])
    assert train.labels == [ci.FASHION_CLASSES[i] for i in train_y[:5]] and test.labels[0] == "Ankle boot"
    assert test.shape == (28, 28, 1)


def test_a_deb_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ci.shutil, "which", lambda _: None)  # no apt-get: the HTTP path
    monkeypatch.setattr(ci, "_http_download", lambda package, target: target.write_bytes(b"!<arch>\ntampered"))
    with pytest.raises(RunError, match="not the expected"):
        ci.fetch_deb("dataset-fashion-mnist=1-1", "0" * 64, tmp_path)


def save_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_a_folder_of_class_folders(tmp_path):
    g = np.random.default_rng(1)
    pics = {f"{c}/{i}.png": g.integers(0, 256, (8, 6), dtype=np.uint8) for c in ("cat", "dog") for i in range(2)}
    for name, array in pics.items():
        save_png(tmp_path / "set" / name, array)
    (tmp_path / "set" / "dog" / "notes.txt").write_text("ignored")
    found = read_image_set(str(tmp_path / "set"))
    assert found.labels == ["cat", "cat", "dog", "dog"] and found.shape == (8, 6, 1)
    assert np.array_equal(found.images[2, ..., 0], pics["dog/0.png"])
    save_png(tmp_path / "set" / "dog" / "big.png", np.zeros((9, 6), np.uint8))
    with pytest.raises(ValueError, match=r"big.png: image of shape \(9, 6\)"):
        read_image_set(str(tmp_path / "set"))
    (tmp_path / "set" / "dog" / "big.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="big.png: not a readable image"):
        read_image_set(str(tmp_path / "set"))
    with pytest.raises(ValueError, match="no class folders"):
        read_image_set(str(tmp_path / "set" / "cat"))
    with pytest.raises(ValueError, match="no such file"):
        read_image_set(str(tmp_path / "nowhere"))


def test_npz_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="bad.npz: not a readable .npz"):
        read_image_set(str(bad))
    np.savez(tmp_path / "x.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="needs arrays 'images' and 'labels'"):
        read_image_set(str(tmp_path / "x.npz"))
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4), np.float32), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="must be uint8"):
        read_image_set(str(tmp_path / "f.npz"))


def test_an_hf_dataset_saved_to_disk(tmp_path):
    import datasets
    from PIL import Image

    g = np.random.default_rng(2)
    arrays = [g.integers(0, 256, (5, 5, 3), dtype=np.uint8) for _ in range(3)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])})
    data = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": [1, 0, 1]},
                                      features=features)
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "hf"))
    found = read_image_set(f"hf:{tmp_path / 'hf'}", split="train")
    assert found.labels == ["yes", "no", "yes"] and np.array_equal(found.images[1], arrays[1])


def test_the_codec_standardises_with_the_training_statistics(tmp_path):
    g = np.random.default_rng(3)
    images = g.integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    codec = ImageCodec.train(ImageConfig(), images)
    x = images.astype(np.float64) / 255
    assert np.allclose(codec.mean, x.mean((0, 1, 2))) and np.allclose(codec.std, x.std((0, 1, 2)))
    t = codec.tensor(images)
    assert t.shape == (10, 3, 4, 5)
    assert torch.allclose(t.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(t.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    codec.save(tmp_path / "tok")
    from tfx.data.tokenizers import load_tokenizer

    back = load_tokenizer(tmp_path / "tok")
    assert (back.height, back.width, back.channels, back.mean) == (4, 5, 3, codec.mean)
    assert torch.equal(back.tensor(images), t)
    with pytest.raises(ValueError, match="1 channel"):
        back.check((4, 5, 1), "grey.png")
