"""The decoder-only LM task: packed token blocks, perplexity and bits per byte, continuations."""
from __future__ import annotations

import torch

from tfx.data.batching import PackedBlocks, StreamBlocks
from tfx.errors import UsageError
from tfx.metrics import lm_metrics
from tfx.tasks.common import EvalOptions, GenerateSettings, Task, holdout_source, log, split_source


class LMTask(Task):
    no_sampling = ("its blocks are cut from one token stream of the whole text, encoded once and packed across "
                   "sentences; tfx does not re-encode that stream each epoch")

    def _read(self, tokenizer, source: str, split: str) -> tuple[torch.Tensor, int]:
        from tfx.data.datasets import count_bytes, encode_documents, read_documents

        docs = read_documents(source, split=split, text_field=self.recipe.data.text_field)
        return encode_documents(tokenizer, docs), count_bytes(docs)

    def tokenizer_texts(self, side: str = "joint") -> list[str]:
        from tfx.data.datasets import read_documents

        source = split_source(self.recipe, "train", fetch=True)
        return read_documents(source, text_field=self.recipe.data.text_field)

    def load_split(self, tokenizer, split: str, *, fetch: bool = False) -> tuple[torch.Tensor, int] | None:
        """(token stream, UTF-8 bytes of its text) of a split; None where the recipe has none.

        Without a valid split, `data.holdout` gives the last fraction of the training stream to valid.
        """
        source, holdout = holdout_source(self.recipe, split, fetch=fetch)
        if source is None:
            return None
        ids, n_bytes = self._read(tokenizer, source, "train" if holdout else split)
        if not holdout:
            return ids, n_bytes
        cut = int(ids.numel() * (1 - holdout))
        part = ids[:cut] if split == "train" else ids[cut:]
        return part, len(tokenizer.decode(part.tolist()).encode("utf-8"))

    def prepare(self, tokenizer):
        """(batches(position) for training, validate(model) or None)."""
        recipe = self.recipe
        train_ids, _ = self.load_split(tokenizer, "train", fetch=True)
        valid = self.load_split(tokenizer, "valid", fetch=True)
        log(f"{train_ids.numel():,} training tokens, vocabulary {tokenizer.vocab_size}"
            + (f", {valid[0].numel():,} validation tokens" if valid else ", no validation split"))
        lanes = recipe.data.blocks == "lanes" or (recipe.data.blocks == "auto" and recipe.model.memory.kind != "none")
        kind = StreamBlocks if lanes else PackedBlocks  # a segment memory reads each lane in order
        blocks = kind(train_ids, block=recipe.model.context, seed=recipe.train.seed)
        batches = lambda pos: blocks.batches(recipe.train.batch_size, pos)  # noqa: E731
        if valid is None:
            return batches, None
        return batches, lambda model, device, autocast: self.score(model, *valid, device=device, autocast=autocast,
                                                                   max_tokens=recipe.train.eval_tokens)

    def score(self, model, ids: torch.Tensor, n_bytes: int, *, device, autocast=None, stride: int | None = None,
              max_tokens: int | None = None, batch_size: int = 32, context: int | None = None,
              stream: tuple[int, int] | None = None) -> dict:
        """LM metrics of a token stream: windows of `context` tokens, or with a segment memory the
        text in order; `stream` = (sinks, window) reads it in order through a sink cache."""
        from tfx.evaluate import score_stream, score_stream_recurrent

        if max_tokens is not None and max_tokens < ids.numel() - 1:
            n_bytes = round(n_bytes * max_tokens / (ids.numel() - 1))
        if stream is not None:
            check_stream(model)
            sinks, window = stream
            nll, count = score_stream_recurrent(
                model, ids, segment=context or self.recipe.model.context, lanes=batch_size, device=device,
                max_tokens=max_tokens, autocast=autocast,
                new_state=lambda b: model.new_stream_state(b, sinks=sinks, window=window))
        elif getattr(model.stack, "recurrent", False):  # a segment memory reads the text in order
            nll, count = score_stream_recurrent(model, ids, segment=context or self.recipe.model.context,
                                                lanes=batch_size, device=device, max_tokens=max_tokens,
                                                autocast=autocast)
        else:
            nll, count = score_stream(model, ids, context=context or self.recipe.model.context, stride=stride,
                                      batch_size=batch_size, device=device, max_tokens=max_tokens,
                                      autocast=autocast)
        return lm_metrics(nll, count, n_bytes)

    def token_stream(self, tokenizer, *, split: str, data: str | None, fetch: bool = False) -> tuple[torch.Tensor, int]:
        """(token stream, UTF-8 bytes) of a file, or else of a split; at least two tokens."""
        if data:
            ids, n_bytes = self._read(tokenizer, data, "train")
        else:
            loaded = self.load_split(tokenizer, split, fetch=fetch)
            if loaded is None:
                raise UsageError(f"the recipe has no {split!r} split; give --data FILE")
            ids, n_bytes = loaded
        if ids.numel() < 2:
            raise UsageError("nothing to evaluate: the text is empty")
        return ids, n_bytes

    def decoder_batches(self, tokenizer, split: str, max_tokens: int) -> list[dict]:
        """Consecutive windows of the context from the start of the split, at most max_tokens."""
        ids, _ = self.token_stream(tokenizer, split=split, data=None, fetch=True)
        context = self.recipe.model.context
        rows = min(ids.numel() // context, max(1, max_tokens // context))
        if rows == 0:
            raise UsageError(f"the {split} split has {ids.numel()} tokens, fewer than one window of {context}")
        windows = ids[:rows * context].view(rows, context).long()
        return [{"tokens": windows, "keep": torch.ones_like(windows, dtype=torch.bool)}]

    def evaluate(self, model, tokenizer, *, split: str, data: str | None, device, options: EvalOptions) -> dict:
        """The LM metrics; with `options.knn` = (Datastore, KNNSettings), the kNN-LM's beside them under
        "knn"; with `options.stream` = (sinks, window), read as one stream per batch lane through a sink cache."""
        o = options
        ids, n_bytes = self.token_stream(tokenizer, split=split, data=data)
        context = o.context or self.recipe.model.context
        if o.stream is not None:
            result = self.score(model, ids, n_bytes, device=device, batch_size=o.batch_size, context=context,
                                stream=o.stream, max_tokens=o.max_tokens)
            lane = (min(ids.numel(), (o.max_tokens or ids.numel()) + 1) - 1) // max(1, o.batch_size)
            return {**result, "sinks": o.stream[0], "window": o.stream[1], "lanes": o.batch_size, "lane_tokens": lane}
        if o.knn is None:
            result = self.score(model, ids, n_bytes, device=device, stride=o.stride, batch_size=o.batch_size,
                                context=context, max_tokens=o.max_tokens)
            return {**result, "context": context}
        from tfx.knn.scoring import knn_token_logprobs

        store, settings = o.knn
        lm, mixed = knn_token_logprobs(model, store, ids, settings, context=context, stride=o.stride,
                                       batch_size=o.batch_size, device=device, log=log)
        knn_result = {**lm_metrics(-float(mixed.sum()), mixed.numel(), n_bytes), **settings.as_dict(),
                      "index": store.kind, "store_size": store.count}
        return {**lm_metrics(-float(lm.sum()), lm.numel(), n_bytes), "context": context,
                "stride": min(o.stride or context, context), "knn": knn_result}

    def generate(self, model, tokenizer, prompts, settings: GenerateSettings):
        """Continuations; with `settings.knn` = (Datastore, KNNSettings) each step samples from the kNN-LM."""
        from contextlib import nullcontext

        from tfx.decoding.generate import generate_text

        c = settings.config
        if settings.stream is not None:
            check_stream(model)
        adjuster = nullcontext()
        if settings.knn is not None:
            from tfx.knn.scoring import KNNAdjuster

            adjuster = KNNAdjuster(model, *settings.knn)
        with adjuster as adjust_logprobs:
            for prompt in prompts:
                yield prompt, generate_text(model, tokenizer, prompt, max_new_tokens=c.max_new_tokens,
                                            temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                            stop=list(settings.stop), compile=c.compile, stream=settings.stream,
                                            generator=settings.generator, on_text=settings.on_text, warn=log,
                                            adjust_logprobs=adjust_logprobs)


def check_stream(model) -> None:
    """A clear error where the model cannot read through a sink cache."""
    from tfx.nn.memory.sinks import stream_problems

    if problems := stream_problems(model.stack):
        raise UsageError("; ".join(problems))
