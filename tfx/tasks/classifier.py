"""The text-classification task: labelled texts in length batches; accuracy, macro-F1, confusion.

The label names are written to RUN/labels.json when a run starts (sorted, so ids are stable) and
read back here by the model builder, evaluation and generation.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator

import torch

from tfx.data.batching import LengthBatches, pad
from tfx.errors import UsageError
from tfx.metrics import classification_metrics
from tfx.rundir.files import atomic_write_text
from tfx.tasks.common import (EvalOptions, GenerateSettings, Task, epoch_examples, holdout_rows, holdout_source, log,
                              sampling_seed)

EVAL_BATCH = 64
LABELS = "labels.json"


def read_labels(run_dir: str | Path) -> list[str]:
    """The label names of a classifier run, in id order."""
    return json.loads((Path(run_dir) / LABELS).read_text(encoding="utf-8"))


def write_labels(run_dir: str | Path, labels: list[str]) -> list[str]:
    """Fix the label ids of a new run (sorted names); a resumed run keeps the ones it has."""
    path = Path(run_dir) / LABELS
    if not path.is_file():
        atomic_write_text(path, json.dumps(sorted(set(labels))))
    return read_labels(run_dir)


class ClassifierTask(Task):
    # ------------------------------------------------------------------ data
    def labelled(self, split: str, *, fetch: bool = False) -> tuple[list[str], list[str]] | None:
        """(texts, labels) of a split; without a valid split, `data.holdout` takes a seeded,
        stratified fraction of train (the same fraction of every label) for validation."""
        from tfx.data.datasets import read_labelled

        source, holdout = holdout_source(self.recipe, split, fetch=fetch)
        if source is None:
            return None
        d = self.recipe.data
        texts, labels = read_labelled(source, split="train" if holdout else split, text_field=d.text_field,
                                      label_field=d.label_field)
        if not holdout:
            return texts, labels
        rows = holdout_rows(len(texts), holdout, split, seed=self.recipe.train.seed, strata=labels)
        return [texts[i] for i in rows], [labels[i] for i in rows]

    def tokenizer_texts(self, side: str = "joint") -> list[str]:
        return self.labelled("train", fetch=True)[0]

    def encode(self, tokenizer, texts: list[str]) -> list[list[int]]:
        """[CLS] (the BOS id) + tokens, cut to the context."""
        context = self.recipe.model.context
        return [[tokenizer.bos_id] + tokenizer.encode(t)[: context - 1] for t in texts]

    def sampler(self, tokenizer, texts: list[str]) -> Callable[[int], list[list[int]]] | None:
        """Epoch -> the texts' rows as `encode` makes them, with segmentations sampled anew each epoch
        (tokenizer.sampling_alpha, seeded by train.seed and the epoch); None where the recipe samples none."""
        from tfx.data.tokenizers import sampling_kind, training_sampler

        sample = training_sampler(self.recipe.tokenizer, tokenizer)
        if sample is None:
            return None
        log(f"subword sampling: the training texts are segmented anew each epoch "
            f"({sampling_kind(tokenizer, self.recipe.tokenizer)})")
        cut, seed = self.recipe.model.context - 1, self.recipe.train.seed
        return lambda epoch: [[tokenizer.bos_id] + ids[:cut] for ids in sample(texts, sampling_seed(seed, epoch))]

    def collate(self, tokenizer, rows: list[list[int]], labels: list[int] | None = None) -> dict:
        tokens = pad(rows, tokenizer.pad_id)
        batch = {"input": tokens, "mask": tokens != tokenizer.pad_id}
        if labels is not None:
            batch["label"] = torch.tensor(labels, dtype=torch.long)
        return batch

    def label_ids(self, labels: list[str], names: list[str], where: str) -> list[int]:
        index = {name: i for i, name in enumerate(names)}
        unseen = sorted(set(labels) - set(index))
        if unseen:
            raise UsageError(f"{where}: label {unseen[0]!r} was not in the training data "
                             f"(known labels: {', '.join(names)})")
        return [index[x] for x in labels]

    # ------------------------------------------------------------------ training
    def prepare(self, tokenizer):
        recipe = self.recipe
        texts, labels = self.labelled("train", fetch=True)
        names = write_labels(self.run_dir, labels)
        rows, ids = self.encode(tokenizer, texts), self.label_ids(labels, names, "train")
        budget = recipe.train.max_tokens
        sample = self.sampler(tokenizer, texts)
        of_epoch = epoch_examples(rows, sample, lambda row: budget is None or len(row) <= budget)
        order = LengthBatches([len(r) for r in rows], seed=recipe.train.seed, max_tokens=budget,
                              batch_size=recipe.train.batch_size,
                              resample=None if sample is None else lambda epoch: [len(r) for r in of_epoch(epoch)])

        def batches(position) -> Iterator:
            for idx, pos in order.batches(position):
                chosen, current = idx.tolist(), of_epoch(pos.epoch)
                yield self.collate(tokenizer, [current[i] for i in chosen], [ids[i] for i in chosen]), pos

        valid = self.labelled("valid", fetch=True)
        log(f"{len(rows):,} training examples, labels {', '.join(names)}"
            + (f", {len(valid[0]):,} validation examples" if valid else ", no validation split"))
        if valid is None:
            return batches, None
        return batches, lambda model, device, autocast: self.classify_eval(
            model, tokenizer, *valid, names=names, device=device, autocast=autocast, where="valid")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def probabilities(self, model, tokenizer, texts: list[str], *, device, autocast=None) -> torch.Tensor:
        was = model.training
        model.eval()
        rows = self.encode(tokenizer, texts)
        out = []
        for i in range(0, len(rows), EVAL_BATCH):
            batch = {k: v.to(device) for k, v in self.collate(tokenizer, rows[i:i + EVAL_BATCH]).items()}
            with (autocast or contextlib.nullcontext)():
                out.append(model(batch["input"], batch["mask"]).float().softmax(-1).cpu())
        model.train(was)
        return torch.cat(out) if out else torch.empty(0, model.n_labels)

    def classify_eval(self, model, tokenizer, texts, labels, *, names, device, autocast=None, where="",
                      **more) -> dict:
        """Loss and metrics of `probabilities` (`more`: a task's own options of it, e.g. images' tta)."""
        gold = self.label_ids(labels, names, where)
        probs = self.probabilities(model, tokenizer, texts, device=device, autocast=autocast, **more)
        nll = -probs[torch.arange(len(gold)), torch.tensor(gold)].clamp_min(1e-12).log().mean()
        return {"loss": float(nll), **classification_metrics(probs.argmax(-1).tolist(), gold, names)}

    def evaluate(self, model, tokenizer, *, split: str, data: str | None, device, options: EvalOptions) -> dict:
        from tfx.data.datasets import read_labelled

        d = self.recipe.data
        if data:
            pairs = read_labelled(data, text_field=d.text_field, label_field=d.label_field)
        else:
            pairs = self.labelled(split)
            if pairs is None:
                raise UsageError(f"the recipe has no {split!r} split; give --data FILE")
        return self.classify_eval(model, tokenizer, *pairs, names=read_labels(self.run_dir), device=device,
                                  where=data or split)

    def generate(self, model, tokenizer, lines, settings: GenerateSettings):
        names = read_labels(self.run_dir)
        k = min(settings.config.top_k or 1, len(names))
        device = next(model.parameters()).device
        lines = list(lines)
        probs = self.probabilities(model, tokenizer, lines, device=device)
        for line, p in zip(lines, probs):
            top = p.topk(k)
            yield line, "\t".join(f"{names[i]}\t{float(v):.4f}" for v, i in zip(top.values, top.indices.tolist()))
