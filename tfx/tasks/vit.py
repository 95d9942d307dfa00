"""The image-classification task (family vit): labelled images in shuffled batches; the classifier's
report (accuracy, macro-F1, per-class table, confusion); `generate` labels image paths.

The run's "tokenizer" is an ImageCodec (tfx/data/image_codec.py): the image size and channels the
model is built for and the training pixels' mean and std. Label names go to RUN/labels.json as
for text classifiers. Training batches are `train.batch_size` images in a seeded order; the
codec's `shift` / `flip` augment them with a generator seeded by (train.seed, epoch, batch), so a
resumed run sees the same pixels as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import numpy as np
import torch

from tfx.data.batching import LengthBatches
from tfx.errors import UsageError
from tfx.tasks.classifier import EVAL_BATCH, ClassifierTask, read_labels, write_labels
from tfx.tasks.common import EvalOptions, GenerateSettings, holdout_rows, holdout_source, log, sampling_seed


def augment(x: torch.Tensor, *, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W): each image moved by up to `shift` pixels in each direction (a crop of the image
    padded with `shift` zeros of the normalised scale, i.e. the mean) and mirrored left-right with
    probability 1/2."""
    B, _, H, W = x.shape
    if flip:
        mirror = torch.rand(B, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    if shift:
        padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (B,), generator=generator).tolist()
        dx = torch.randint(0, 2 * shift + 1, (B,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    return x


def views(codec) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Test-time augmentation from the codec's own training augmentations: the image, its mirror
    (codec.flip), and each of those moved by one pixel up, down, left and right (codec.shift > 0; the
    border filled as `augment` fills it), so 1, 2, 5 or 10 views."""
    def moved(dy: int, dx: int):
        def view(x: torch.Tensor) -> torch.Tensor:
            H, W = x.shape[-2:]
            return torch.nn.functional.pad(x, (1, 1, 1, 1))[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
        return view

    base = [lambda x: x] + ([lambda x: x.flip(-1)] if codec.config.flip else [])
    shifts = [moved(dy, dx) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))] if codec.config.shift else []
    return base + [(lambda s, b: lambda x: s(b(x)))(s, b) for b in base for s in shifts]


class ImageTask(ClassifierTask):
    # ------------------------------------------------------------------ data
    def labelled(self, split: str, *, fetch: bool = False) -> tuple[np.ndarray, list[str]] | None:
        """(images uint8 (N, H, W, C), labels) of a split; without a valid split, `data.holdout` takes
        a seeded, stratified fraction of train for validation."""
        from tfx.data.images import read_image_set

        source, holdout = holdout_source(self.recipe, split, fetch=fetch)
        if source is None:
            return None
        try:
            data = read_image_set(source, split="train" if holdout else split)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if not holdout:
            return data.images, data.labels
        rows = holdout_rows(len(data), holdout, split, seed=self.recipe.train.seed, strata=data.labels)
        return data.images[rows], [data.labels[i] for i in rows]

    def tokenizer_texts(self, side: str = "joint"):
        """What the ImageCodec is fitted on: the training images."""
        from tfx.data.images import ImageSet

        images, labels = self.labelled("train", fetch=True)
        return ImageSet(images, labels)

    def vocab_size(self, tokenizer) -> int:
        return 0

    def checked(self, codec, images: np.ndarray, where: str) -> np.ndarray:
        try:
            codec.check(images.shape, where)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return images

    # ------------------------------------------------------------------ training
    def image_batches(self, codec, images: np.ndarray, more: Callable[[torch.Tensor, torch.Generator], dict]):
        """position -> the training batches from `position` on: `train.batch_size` images in a seeded order,
        standardised, augmented as the recipe's [tokenizer] says (not the codec's: init_from copies that),
        plus `more(indices, generator)`; the generator is seeded by (train.seed, epoch, batch), so a resumed
        run draws what the uninterrupted one did."""
        recipe, cfg = self.recipe, self.recipe.tokenizer
        order = LengthBatches([1] * len(images), seed=recipe.train.seed, batch_size=recipe.train.batch_size)

        def batches(position) -> Iterator:
            for idx, pos in order.batches(position):
                g = torch.Generator().manual_seed(sampling_seed(recipe.train.seed, pos.epoch, pos.cursor) % 2**63)
                x = codec.tensor(images[idx.numpy()])
                if cfg.shift or cfg.flip:
                    x = augment(x, shift=cfg.shift, flip=cfg.flip, generator=g)
                yield {"image": x, **more(idx, g)}, pos

        return batches

    def split_images(self, codec, split: str, data: str | None) -> tuple[np.ndarray, list[str]]:
        """(images, labels) that `tfx eval` reads: the file or folder `data`, else the recipe's split;
        images of another channel count than the run's are refused (UsageError naming the source)."""
        from tfx.data.images import read_image_set

        if data:
            try:
                found = read_image_set(data, split=split)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            images, labels = found.images, found.labels
        else:
            pairs = self.labelled(split)
            if pairs is None:
                raise UsageError(f"the recipe has no {split!r} split; give --data PATH")
            images, labels = pairs
        return self.checked(codec, images, data or split), labels

    def prepare(self, codec):
        recipe = self.recipe
        images, labels = self.labelled("train", fetch=True)
        names = write_labels(self.run_dir, labels)
        if len(names) < 2:
            where = holdout_source(recipe, "train", fetch=False)[0]
            raise UsageError(f"{where}: the training images have one class ({names[0]!r}); a classifier needs "
                             "two or more")
        ids = torch.tensor(self.label_ids(labels, names, "train"))
        images = self.checked(codec, images, "train")
        batches = self.image_batches(codec, images, lambda idx, g: {"label": ids[idx]})
        valid = self.labelled("valid", fetch=True)
        h, w, c = images.shape[1:]
        log(f"{len(images):,} training images of {h} x {w} x {c}, {len(names)} labels"
            + (f", {len(valid[0]):,} validation images" if valid else ", no validation split"))
        if valid is None:
            return batches, None
        v_images = self.checked(codec, valid[0], "valid")
        return batches, lambda model, device, autocast: self.classify_eval(
            model, codec, v_images, valid[1], names=names, device=device, autocast=autocast, where="valid")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def probabilities(self, model, codec, images: np.ndarray, *, device, autocast=None,
                      tta: bool = False) -> torch.Tensor:
        """(N, labels) class probabilities; `tta`: their mean over the views of `views(codec)`."""
        was = model.training
        model.eval()
        out = []
        transforms = views(codec) if tta else [lambda x: x]
        for i in range(0, len(images), EVAL_BATCH):
            x = codec.tensor(images[i:i + EVAL_BATCH]).to(device)
            with (autocast or contextlib.nullcontext)():
                out.append(sum(model(t(x)).float().softmax(-1).cpu() for t in transforms) / len(transforms))
        model.train(was)
        return torch.cat(out) if out else torch.empty(0, model.n_labels)

    def evaluate(self, model, codec, *, split: str, data: str | None, device, options: EvalOptions) -> dict:
        images, labels = self.split_images(codec, split, data)
        return self.classify_eval(model, codec, images, labels, names=read_labels(self.run_dir), device=device,
                                  where=data or split, tta=options.tta)

    def generate(self, model, codec, lines, settings: GenerateSettings):
        """Each line an image path -> `label<TAB>probability` (the top-k pairs with --top-k); a line whose
        file is missing or unreadable gets an empty output line and its reason on stderr, and the
        command exits 2 after the last line."""
        from tfx.data.images import load_image

        names = read_labels(self.run_dir)
        k = min(settings.config.top_k or 1, len(names))
        device = next(model.parameters()).device
        failed = []
        for n, line in enumerate(lines, 1):
            path = line.strip()
            try:
                image = load_image(path) if path else None
                if image is None:
                    raise ValueError("empty line (expected an image path)")
                codec.check(image.shape, path)
                p = self.probabilities(model, codec, image[None], device=device)[0]
            except (ValueError, UsageError) as exc:
                failed.append(n)
                print(f"tfx: line {n}: {exc}", file=sys.stderr, flush=True)
                yield line, ""
                continue
            top = p.topk(k)
            yield line, "\t".join(f"{names[i]}\t{float(v):.4f}" for v, i in zip(top.values, top.indices.tolist()))
        if failed:
            raise UsageError(f"{len(failed)} input line(s) could not be labelled (line {', '.join(map(str, failed[:10]))}"
                             + (", ..." if len(failed) > 10 else "") + "); their output lines are empty")
