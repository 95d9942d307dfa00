"""Encoder-only tasks: text classification and masked-LM pretraining (family "mlm")."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator

import torch

from tfx.data.batching import LengthBatches, PackedBlocks, pad
from tfx.errors import UsageError
from tfx.metrics import classification_metrics
from tfx.tasks.common import Task, log, split_source

EVAL_BATCH = 64


class ClassifierTask(Task):
    # ------------------------------------------------------------------ data
    def labelled(self, split: str, *, fetch: bool = False) -> tuple[list[str], list[str]] | None:
        from tfx.data.datasets import read_labelled

        source = split_source(self.recipe, split, fetch=fetch)
        if source is None:
            return None
        d = self.recipe.data
        return read_labelled(source, split=split, text_field=d.text_field, label_field=d.label_field)

    def documents(self, split: str, *, fetch: bool = False) -> list[str] | None:
        from tfx.data.datasets import read_documents

        source = split_source(self.recipe, split, fetch=fetch)
        return None if source is None else read_documents(source, split=split, text_field=self.recipe.data.text_field)

    def tokenizer_texts(self, side: str = "joint") -> list[str]:
        if self.recipe.family == "mlm":
            return self.documents("train", fetch=True)
        return self.labelled("train", fetch=True)[0]

    def encode(self, tokenizer, texts: list[str]) -> list[list[int]]:
        """[CLS] (the BOS id) + tokens, cut to the context."""
        context = self.recipe.model.context
        return [[tokenizer.bos_id] + tokenizer.encode(t)[: context - 1] for t in texts]

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
    def prepare(self, tokenizer, *, rank: int, world: int, run_dir: Path, **_):
        if self.recipe.family == "mlm":
            return self._prepare_mlm(tokenizer, rank=rank, world=world)
        recipe = self.recipe
        texts, labels = self.labelled("train", fetch=True)
        path = Path(run_dir) / "labels.json"
        if not path.is_file():
            from tfx.train.checkpoint import atomic_write_text

            atomic_write_text(path, json.dumps(sorted(set(labels))))
        names = json.loads(path.read_text(encoding="utf-8"))
        rows, ids = self.encode(tokenizer, texts), self.label_ids(labels, names, "train")
        order = LengthBatches([len(r) for r in rows], seed=recipe.train.seed, max_tokens=recipe.train.max_tokens,
                              batch_size=recipe.train.batch_size, rank=rank, world=world)

        def batches(position) -> Iterator:
            for idx, pos in order.batches(position):
                chosen = idx.tolist()
                yield self.collate(tokenizer, [rows[i] for i in chosen], [ids[i] for i in chosen]), pos

        valid = self.labelled("valid", fetch=True)
        log(f"{len(rows):,} training examples, labels {', '.join(names)}"
            + (f", {len(valid[0]):,} validation examples" if valid else ", no validation split"))
        if valid is None:
            return batches, None
        return batches, lambda model, device, autocast: self.classify_eval(
            model, tokenizer, *valid, names=names, device=device, autocast=autocast, where="valid")

    def _prepare_mlm(self, tokenizer, *, rank: int, world: int):
        from tfx.data.datasets import encode_documents

        recipe = self.recipe
        stream = encode_documents(tokenizer, self.documents("train", fetch=True))
        blocks = PackedBlocks(stream, block=recipe.model.context, seed=recipe.train.seed, rank=rank, world=world)

        def batches(position) -> Iterator:
            for batch, pos in blocks.batches(recipe.train.batch_size, position):
                g = torch.Generator().manual_seed(recipe.train.seed * 7919 + pos.epoch * 1_000_003 + pos.cursor)
                yield self.mask(tokenizer, batch["input"], g), pos

        valid_docs = self.documents("valid", fetch=True)
        log(f"{stream.numel():,} training tokens for masked-LM pretraining")
        if valid_docs is None:
            return batches, None
        valid = encode_documents(tokenizer, valid_docs)
        return batches, lambda model, device, autocast: self.mlm_eval(model, tokenizer, valid, device=device,
                                                                      autocast=autocast)

    def mask(self, tokenizer, tokens: torch.Tensor, generator: torch.Generator) -> dict:
        from tfx.models.encoder import mask_tokens

        specials = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id)
        vocab = tokenizer.vocab_size + 1
        inputs, target = mask_tokens(tokens, prob=self.recipe.train.mask_prob, mask_id=vocab - 1, vocab=vocab,
                                     special=specials, generator=generator)
        return {"input": inputs, "target": target}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def mlm_eval(self, model, tokenizer, stream: torch.Tensor, *, device, autocast=None,
                 max_tokens: int | None = 200_000) -> dict:
        """Masked-token loss over the stream's blocks, with a fixed masking seed."""
        was = model.training
        model.eval()
        context = self.recipe.model.context
        stream = stream[:max_tokens] if max_tokens else stream
        n = stream.numel() // context
        if n == 0:
            raise UsageError("the validation text is shorter than one context")
        blocks = stream[: n * context].view(n, context).long()
        g = torch.Generator().manual_seed(12345)
        total, count = 0.0, 0
        for i in range(0, n, EVAL_BATCH):
            batch = {k: v.to(device) for k, v in self.mask(tokenizer, blocks[i:i + EVAL_BATCH], g).items()}
            with (autocast or contextlib.nullcontext)():
                loss, _, _ = model.loss(batch)
            total, count = total + float(loss), count + model.count_tokens(batch)
        model.train(was)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}

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

    def classify_eval(self, model, tokenizer, texts, labels, *, names, device, autocast=None, where="") -> dict:
        gold = self.label_ids(labels, names, where)
        probs = self.probabilities(model, tokenizer, texts, device=device, autocast=autocast)
        nll = -probs[torch.arange(len(gold)), torch.tensor(gold)].clamp_min(1e-12).log().mean()
        return {"loss": float(nll), **classification_metrics(probs.argmax(-1).tolist(), gold, names)}

    def evaluate(self, model, tokenizer, *, split: str, data: str | None, device, run_dir, **_) -> dict:
        from tfx.data.datasets import encode_documents, read_documents, read_labelled

        d = self.recipe.data
        if self.recipe.family == "mlm":
            docs = read_documents(data, text_field=d.text_field) if data else self.documents(split)
            if docs is None:
                raise UsageError(f"the recipe has no {split!r} split; give --data FILE")
            return self.mlm_eval(model, tokenizer, encode_documents(tokenizer, docs), device=device, max_tokens=None)
        if data:
            pairs = read_labelled(data, text_field=d.text_field, label_field=d.label_field)
        else:
            pairs = self.labelled(split)
            if pairs is None:
                raise UsageError(f"the recipe has no {split!r} split; give --data FILE")
        from tfx.models import labels_of

        return self.classify_eval(model, tokenizer, *pairs, names=labels_of(run_dir), device=device,
                                  where=data or split)

    def generate(self, model, tokenizer, lines, *, settings: dict, run_dir, **_):
        if self.recipe.family == "mlm":
            raise UsageError("a masked-LM run does not generate; fine-tune a classifier from it (init_from)")
        from tfx.models import labels_of

        names = labels_of(run_dir)
        k = min(settings.get("top_k") or 1, len(names))
        device = next(model.parameters()).device
        lines = list(lines)
        probs = self.probabilities(model, tokenizer, lines, device=device)
        for line, p in zip(lines, probs):
            top = p.topk(k)
            yield line, "\t".join(f"{names[i]}\t{float(v):.4f}" for v, i in zip(top.values, top.indices.tolist()))
