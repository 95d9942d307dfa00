"""The masked-LM task (family "mlm"): packed blocks of documents, BERT masking, masked-token loss."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from tfx.data.batching import PackedBlocks
from tfx.errors import UsageError
from tfx.tasks.common import EvalOptions, GenerateSettings, Task, holdout_source, log

EVAL_BATCH = 64


class MLMTask(Task):
    no_sampling = ("its blocks are cut from one token stream of the documents, encoded once and packed across "
                   "sentences; tfx does not re-encode that stream each epoch")

    def tokenizer_texts(self, side: str = "joint") -> list[str]:
        return self.documents("train", fetch=True)

    def stream(self, tokenizer, split: str, *, fetch: bool = False) -> torch.Tensor | None:
        """The token stream of a split's documents; without a valid split, `data.holdout` gives the
        last fraction of the training stream to valid (as the lm family does)."""
        from tfx.data.datasets import encode_documents, read_documents

        source, holdout = holdout_source(self.recipe, split, fetch=fetch)
        if source is None:
            return None
        docs = read_documents(source, split="train" if holdout else split, text_field=self.recipe.data.text_field)
        ids = encode_documents(tokenizer, docs)
        cut = int(ids.numel() * (1 - holdout))
        return ids if not holdout else ids[:cut] if split == "train" else ids[cut:]

    def prepare(self, tokenizer):
        recipe = self.recipe
        stream = self.stream(tokenizer, "train", fetch=True)
        blocks = PackedBlocks(stream, block=recipe.model.context, seed=recipe.train.seed)

        def batches(position) -> Iterator:
            for batch, pos in blocks.batches(recipe.train.batch_size, position):
                g = torch.Generator().manual_seed(recipe.train.seed * 7919 + pos.epoch * 1_000_003 + pos.cursor)
                yield self.mask(tokenizer, batch["input"], g), pos

        valid = self.stream(tokenizer, "valid", fetch=True)
        log(f"{stream.numel():,} training tokens for masked-LM pretraining")
        if valid is None:
            return batches, None
        return batches, lambda model, device, autocast: self.mlm_eval(model, tokenizer, valid, device=device,
                                                                      autocast=autocast)

    def mask(self, tokenizer, tokens: torch.Tensor, generator: torch.Generator) -> dict:
        from tfx.models.encoder import mask_tokens

        specials = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id)
        vocab = tokenizer.vocab_size + 1
        inputs, target = mask_tokens(tokens, prob=self.recipe.train.mask_prob, mask_id=vocab - 1, vocab=vocab,
                                     special=specials, generator=generator)
        return {"input": inputs, "target": target}

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

    def evaluate(self, model, tokenizer, *, split: str, data: str | None, device, options: EvalOptions) -> dict:
        from tfx.data.datasets import encode_documents, read_documents

        if data:
            ids = encode_documents(tokenizer, read_documents(data, text_field=self.recipe.data.text_field))
        else:
            ids = self.stream(tokenizer, split)
            if ids is None:
                raise UsageError(f"the recipe has no {split!r} split; give --data FILE")
        return self.mlm_eval(model, tokenizer, ids, device=device, max_tokens=None)

    def generate(self, model, tokenizer, lines, settings: GenerateSettings):
        raise UsageError("a masked-LM run does not generate; fine-tune a classifier from it (init_from)")
