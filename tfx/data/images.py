"""Labelled images from disk: a corpus's .npz split, a folder of class folders, or `hf:NAME`.

Every reader returns an `ImageSet`: images as one uint8 array (N, H, W, C) and a label name per
image. All images of a set have one size and one channel count (a ViT's patch grid is fixed by
them); a file that differs, cannot be decoded or is not an image is a ValueError naming it.

- `PATH.npz` (what `tfx data get fashion-mnist` writes): `images` (N, H, W, C) or (N, H, W) uint8,
  `labels` (N,) int or str, and optionally `classes` (the names of integer labels);
- `DIR/` in the usual layout `DIR/<label>/<image>.png|jpg|jpeg|bmp|gif|webp`, read with Pillow
  (greyscale stays one channel, palette and RGBA images become RGB);
- `hf:NAME` (or `hf:NAME:CONFIG`) through `datasets`, or a dataset saved with `save_to_disk`
  (`hf:/path/to/dir`): the `image` column (or the first Image feature) and `label`.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: list[str]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.labels)


def as_hwc(array: np.ndarray, where: str) -> np.ndarray:
    """An image as uint8 (H, W, C): a 2-D array gets one channel; 1, 3 or 4 channels are kept."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{where}: not an image (array of shape {tuple(a.shape)}; expected H x W x 1|3|4)")
    if a.dtype != np.uint8:
        raise ValueError(f"{where}: pixels are {a.dtype}, expected 8-bit (uint8)")
    return a


def load_image(path: str | Path) -> np.ndarray:
    """One image file as uint8 (H, W, C) with Pillow: L stays 1 channel; LA, P, CMYK... become RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            return as_hwc(np.asarray(im), str(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None


def stack_images(images: list[np.ndarray], names: list[str]) -> np.ndarray:
    """(N, H, W, C) from same-sized images; the first that differs from the first image is named."""
    if not images:
        raise ValueError("no images")
    first = images[0].shape
    for image, name in zip(images, names):
        if image.shape != first:
            raise ValueError(f"{name}: image of shape {image.shape[:2]} x {image.shape[2]} channels, but "
                             f"{names[0]} is {first[:2]} x {first[2]}: all images of a set have one size "
                             f"and channel count")
    return np.stack(images)


def read_npz(path: Path) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z or "labels" not in z:
                raise ValueError(f"{path}: an image .npz needs arrays 'images' and 'labels' (has {', '.join(z.files)})")
            images, labels = z["images"], z["labels"]
            classes = z["classes"].tolist() if "classes" in z else None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    except ValueError as exc:
        raise ValueError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    images = images[..., None] if images.ndim == 3 else images
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{path}: 'images' must be uint8 (N, H, W[, 1|3|4]); got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    if classes is not None and labels.dtype.kind in "iu":
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"{path}: a label id is outside the {len(classes)} classes")
        names = [classes[i] for i in labels.tolist()]
    else:
        names = [str(x) for x in labels.tolist()]
    return ImageSet(images, names)


def read_folder(directory: Path) -> ImageSet:
    """DIR/<label>/<image>: one sub-folder per class (hidden entries are skipped)."""
    classes = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{directory}: no class folders (expected {directory}/<label>/<image>.png)")
    images, labels, names = [], [], []
    for folder in classes:
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        for f in files:
            images.append(load_image(f))
            labels.append(folder.name)
            names.append(str(f))
    if not images:
        raise ValueError(f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return ImageSet(stack_images(images, names), labels)


def read_hf(name: str, split: str) -> ImageSet:
    """`hf:NAME[:CONFIG]` or `hf:DIR` (a DatasetDict or Dataset saved to disk) through `datasets`."""
    import datasets

    spec = name[3:]
    if Path(spec).is_dir():
        loaded = datasets.load_from_disk(spec)
        data = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        repo, _, config = spec.partition(":")
        data = datasets.load_dataset(repo, config or None, split=split)
    column = "image" if "image" in data.column_names else next(
        (c for c, f in data.features.items() if isinstance(f, datasets.Image)), None)
    if column is None or "label" not in data.column_names:
        raise ValueError(f"{name}: an image dataset needs an image column and a 'label' column "
                         f"(has {', '.join(data.column_names)})")
    feature = data.features["label"]
    label_names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    images, labels, names = [], [], []
    for i, row in enumerate(data):
        images.append(as_hwc(np.asarray(row[column].convert("RGB") if row[column].mode not in ("L", "RGB")
                                        else row[column]), f"{name} row {i}"))
        labels.append(label_names[row["label"]] if label_names else str(row["label"]))
        names.append(f"{name} row {i}")
    return ImageSet(stack_images(images, names), labels)


def read_image_set(source: str, *, split: str = "train") -> ImageSet:
    """The labelled images of `source` (see the module's docstring); ValueError naming the problem."""
    if source.startswith("hf:"):
        return read_hf(source, split)
    path = Path(source)
    if path.is_dir():
        return read_folder(path)
    if path.suffix == ".npz":
        return read_npz(path)
    if not path.exists():
        raise ValueError(f"{source}: no such file or folder")
    raise ValueError(f"{source}: images come as a .npz file, a folder of class folders or hf:NAME")
