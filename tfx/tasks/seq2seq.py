"""The translation task: sentence pairs in token-budget batches, BLEU/chrF with sacreBLEU, beams."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from tfx.data.batching import LengthBatches, pad
from tfx.errors import UsageError
from tfx.models.lm import IGNORE
from tfx.tasks.common import (EvalOptions, GenerateSettings, Task, epoch_examples, holdout_rows, holdout_source, log,
                              sampling_seed)

TRANSLATE_BATCH = 32  # sentences per decoding batch


class Seq2SeqTask(Task):
    def pairs(self, split: str, *, fetch: bool = False) -> tuple[list[str], list[str]] | None:
        """(sources, targets) of a split; without a valid split, `data.holdout` takes the last
        fraction of the training pairs for validation."""
        from tfx.data.datasets import read_pairs

        source, holdout = holdout_source(self.recipe, split, fetch=fetch)
        if source is None:
            return None
        d = self.recipe.data
        src, tgt = read_pairs(source, split="train" if holdout else split, src_lang=d.src_lang, tgt_lang=d.tgt_lang)
        if not holdout:
            return src, tgt
        rows = holdout_rows(len(src), holdout, split, seed=0)
        return [src[i] for i in rows], [tgt[i] for i in rows]

    def tokenizer_texts(self, side: str = "joint") -> list[str]:
        src, tgt = self.pairs("train", fetch=True)
        return {"src": src, "tgt": tgt}.get(side, src + tgt)

    def source_tokenizer(self, tokenizer):
        """The run's separate source tokenizer (tokenizer-src/), or the joint one."""
        if self.recipe.src_tokenizer is None:
            return tokenizer
        if getattr(self, "_src_tok", None) is None:
            from tfx.data.tokenizers import load_tokenizer

            self._src_tok = load_tokenizer(Path(self.run_dir) / "tokenizer-src")
        return self._src_tok

    def encode(self, tokenizer, src: list[str], tgt: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
        """Source ids end with EOS; target ids are the bare tokens (BOS/EOS added in collate)."""
        src_tok = self.source_tokenizer(tokenizer)
        return [(src_tok.encode(s) + [src_tok.eos_id], tokenizer.encode(t) if tgt is not None else [])
                for s, t in zip(src, tgt if tgt is not None else src)]

    def collate(self, tokenizer, examples: list[tuple[list[int], list[int]]]) -> dict:
        bos, eos, padding = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        src = pad([s for s, _ in examples], padding)
        return {"src": src, "src_mask": src != padding,
                "tgt_in": pad([[bos] + t for _, t in examples], padding),
                "tgt_out": pad([t + [eos] for _, t in examples], IGNORE)}

    def sampler(self, tokenizer, src: list[str], tgt: list[str]) -> Callable[[int], list] | None:
        """Epoch -> the pairs' ids as `encode` lays them out, with sampled segmentations where the recipe
        samples subwords (tokenizer.sampling_alpha; src_tokenizer.sampling_alpha for a separate source
        tokenizer); a side that does not sample keeps its best segmentation. None where neither does."""
        from tfx.data.tokenizers import sampling_kind, training_sampler

        r, src_tok = self.recipe, self.source_tokenizer(tokenizer)
        src_key = "tokenizer" if r.src_tokenizer is None else "src_tokenizer"
        on_src = training_sampler(getattr(r, src_key), src_tok, src_key)
        on_tgt = training_sampler(r.tokenizer, tokenizer)
        if on_src is None and on_tgt is None:
            return None
        log("subword sampling: the training pairs are segmented anew each epoch ("
            + ", ".join(f"{side} {sampling_kind(tok, getattr(r, key))}" for side, key, tok, on in
                        (("source", src_key, src_tok, on_src), ("target", "tokenizer", tokenizer, on_tgt)) if on)
            + ")")

        def sample(epoch: int) -> list[tuple[list[int], list[int]]]:
            seed = r.train.seed
            s = on_src(src, sampling_seed(seed, epoch, 0)) if on_src else [src_tok.encode(x) for x in src]
            t = on_tgt(tgt, sampling_seed(seed, epoch, 1)) if on_tgt else [tokenizer.encode(x) for x in tgt]
            return [(a + [src_tok.eos_id], b) for a, b in zip(s, t)]

        return sample

    def prepare(self, tokenizer):
        recipe = self.recipe
        src, tgt = self.pairs("train", fetch=True)
        limit = min(recipe.model.context, recipe.data.max_len or recipe.model.context)
        budget = recipe.train.max_tokens
        size = lambda e: max(len(e[0]), len(e[1]) + 1)  # noqa: E731
        short = lambda e: len(e[0]) <= limit and len(e[1]) + 1 <= limit  # noqa: E731
        fits = lambda e: short(e) and (budget is None or size(e) <= budget)  # noqa: E731
        kept = [(s, t, e) for s, t, e in zip(src, tgt, self.encode(tokenizer, src, tgt)) if short(e)]
        if len(kept) < len(src):
            log(f"dropped {len(src) - len(kept):,} training pairs longer than {limit} tokens")
        examples = [e for _, _, e in kept]
        sample = self.sampler(tokenizer, [s for s, _, _ in kept], [t for _, t, _ in kept])
        of_epoch = epoch_examples(examples, sample, fits)  # with sampling: the same pairs, segmented anew
        resample = None if sample is None else lambda epoch: [size(e) for e in of_epoch(epoch)]
        order = LengthBatches([size(e) for e in examples], seed=recipe.train.seed, max_tokens=budget,
                              batch_size=recipe.train.batch_size, resample=resample)

        def batches(position) -> Iterator:
            for idx, pos in order.batches(position):
                yield self.collate(tokenizer, [of_epoch(pos.epoch)[i] for i in idx.tolist()]), pos

        valid = self.pairs("valid", fetch=True)
        log(f"{len(examples):,} training pairs, {sum(len(t) + 1 for _, t in examples):,} target tokens, "
            f"vocabulary {tokenizer.vocab_size}"
            + (f", {len(valid[0]):,} validation pairs" if valid else ", no validation split"))
        if valid is None:
            return batches, None

        def validate(model, device, autocast) -> dict:
            result = self.score(model, tokenizer, *valid, device=device, autocast=autocast)
            if recipe.train.eval_bleu:
                greedy = recipe.generate.model_copy(update={"beam": 1})
                hyps = list(self.translate(model, tokenizer, valid[0], config=greedy, device=device))
                result.update(bleu_chrf(hyps, valid[1]))
            return result

        return batches, validate

    def decoder_batches(self, tokenizer, split: str, max_tokens: int) -> list[dict]:
        """The split's pairs from the start, teacher-forced target inputs, until max_tokens target tokens."""
        pairs = self.pairs(split, fetch=True)
        if pairs is None:
            raise UsageError(f"the recipe has no {split!r} split")
        context = self.recipe.model.context
        examples, count = [], 0
        for s, t in self.encode(tokenizer, *pairs):
            if count >= max_tokens:
                break
            examples.append((s[:context], t[: context - 1]))
            count += len(examples[-1][1]) + 1
        out = []
        for i in range(0, len(examples), TRANSLATE_BATCH):
            batch = self.collate(tokenizer, examples[i:i + TRANSLATE_BATCH])
            out.append({"tokens": batch["tgt_in"], "keep": batch["tgt_out"] != IGNORE, "src": batch["src"],
                        "src_mask": batch["src_mask"]})
        return out

    @torch.no_grad()
    def score(self, model, tokenizer, src: list[str], tgt: list[str], *, device, autocast=None) -> dict:
        """Per-token loss and perplexity of the references (teacher forcing)."""
        import contextlib

        was = model.training
        model.eval()
        context = self.recipe.model.context
        examples = [(s[:context], t[: context - 1]) for s, t in self.encode(tokenizer, src, tgt)]
        total, count = 0.0, 0
        for i in range(0, len(examples), TRANSLATE_BATCH):
            batch = {k: v.to(device) for k, v in self.collate(tokenizer, examples[i:i + TRANSLATE_BATCH]).items()}
            with (autocast or contextlib.nullcontext)():
                loss, _, _ = model.loss(batch)
            total += float(loss)
            count += model.count_tokens(batch)
        model.train(was)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}

    def translate(self, model, tokenizer, lines: Iterable[str], *, config, device=None,
                  nbest: int = 1) -> Iterator[str | list[tuple[str, float]]]:
        """Detokenized translations of `lines`, in order, decoded in batches of similar length with
        `config` (a GenerateConfig: beam, len_penalty, max_len_a/b)."""
        from tfx.decoding.beam import beam_search, greedy, max_lengths

        beam = config.beam
        lines = list(lines)
        device = device or next(model.parameters()).device
        context = self.recipe.model.context
        encoded = [s for s, _ in self.encode(tokenizer, lines)]
        if any(len(s) > context for s in encoded):
            log(f"warning: sources longer than the context ({context} tokens) are cut to it")
        encoded = [s if len(s) <= context else s[: context - 1] + [tokenizer.eos_id] for s in encoded]
        order = sorted(range(len(lines)), key=lambda i: len(encoded[i]))
        out: dict[int, object] = {}
        for i in range(0, len(order), TRANSLATE_BATCH):
            idx = order[i:i + TRANSLATE_BATCH]
            src = pad([encoded[j] for j in idx], tokenizer.pad_id).to(device)
            mask = src != tokenizer.pad_id
            limits = max_lengths(mask, a=config.max_len_a, b=config.max_len_b, cap=context - 1)
            kw = dict(bos=tokenizer.bos_id, eos=tokenizer.eos_id, max_len=limits)
            if beam == 1 and nbest == 1:
                hyps = [[h] for h in greedy(model, src, mask, **kw)]
            else:
                hyps = beam_search(model, src, mask, beam=beam, nbest=nbest,
                                   len_penalty=config.len_penalty, **kw)
            for j, hs in zip(idx, hyps):
                out[j] = hs
        for j in range(len(lines)):
            hs = out[j]
            if nbest == 1:
                yield tokenizer.decode(hs[0].tokens)
            else:
                yield [(tokenizer.decode(h.tokens), h.normalized) for h in hs]

    def evaluate(self, model, tokenizer, *, split: str, data: str | None, device, options: EvalOptions) -> dict:
        if data:
            from tfx.data.datasets import read_pairs

            d = self.recipe.data
            pairs = read_pairs(data, src_lang=d.src_lang, tgt_lang=d.tgt_lang)
        else:
            pairs = self.pairs(split)
            if pairs is None:
                raise UsageError(f"the recipe has no {split!r} split; give --data FILE")
        src, ref = pairs
        result = self.score(model, tokenizer, src, ref, device=device)
        config = options.generate or self.recipe.generate
        hyps = list(self.translate(model, tokenizer, src, config=config, device=device))
        if options.hyp_out:
            Path(options.hyp_out).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        result.update(bleu_chrf(hyps, ref))
        result["beam"] = config.beam
        return result

    def generate(self, model, tokenizer, lines, settings: GenerateSettings):
        nbest = settings.nbest or 1
        lines = list(lines)
        for line, out in zip(lines, self.translate(model, tokenizer, lines, config=settings.config, nbest=nbest)):
            if nbest == 1:
                yield line, out
            else:
                yield line, "\t".join(f"{text}\t{score:.4f}" for text, score in out)


def bleu_chrf(hyps: list[str], refs: list[str]) -> dict:
    """sacreBLEU's corpus BLEU and chrF of detokenized hypotheses against raw references."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "chrf": c.score, "signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}
