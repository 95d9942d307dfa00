"""The commands as plain functions: train, eval and generate over a run directory."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

from tfx import config as C
from tfx.data.batching import PackedBlocks
from tfx.errors import RunError, UsageError
from tfx.metrics import lm_metrics


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data

def split_source(recipe, split: str, *, fetch: bool) -> str | None:
    """The file (or hf: name) of a split; a named corpus is fetched on first use when `fetch`."""
    value = getattr(recipe.data, split)
    if value or not recipe.data.corpus:
        return value
    from tfx.data import corpora

    path = corpora.split_path(recipe.data.corpus, split)
    if not path.is_file():
        if not fetch:
            raise UsageError(f"corpus {recipe.data.corpus!r} is not fetched; run: tfx data get {recipe.data.corpus}")
        corpora.get_corpus(recipe.data.corpus, log=log)
    return str(path) if path.is_file() else None


def _read_split(recipe, tokenizer, source: str, split: str) -> tuple[torch.Tensor, int]:
    from tfx.data.datasets import count_bytes, encode_documents, read_documents

    docs = read_documents(source, split=split, text_field=recipe.data.text_field)
    return encode_documents(tokenizer, docs), count_bytes(docs)


def load_split(recipe, tokenizer, split: str, *, fetch: bool = False) -> tuple[torch.Tensor, int] | None:
    """(token stream, UTF-8 bytes of its text) of a split; None where the recipe has none.

    Without a valid split, `data.holdout` gives the last fraction of the training stream to valid.
    """
    holdout = recipe.data.holdout if split != "test" and split_source(recipe, "valid", fetch=fetch) is None else 0.0
    source = split_source(recipe, "train" if holdout else split, fetch=fetch)
    if source is None:
        return None
    ids, n_bytes = _read_split(recipe, tokenizer, source, "train" if holdout else split)
    if not holdout:
        return ids, n_bytes
    cut = int(ids.numel() * (1 - holdout))
    part = ids[:cut] if split == "train" else ids[cut:]
    return part, len(tokenizer.decode(part.tolist()).encode("utf-8"))


# ----------------------------------------------------------------------------- runs

def load_run(run_dir: str | Path, *, checkpoint: str = "best", overrides: Iterable[str] = ()):
    """(recipe, tokenizer, model) of a saved run, weights from `best` (if any) or `last`."""
    from tfx.data.tokenizers import load_tokenizer
    from tfx.models import build_model
    from tfx.train.checkpoint import load_weights

    run = Path(run_dir)
    if not (run / "recipe.toml").is_file():
        raise UsageError(f"{run}: not a tfx run directory (no recipe.toml)")
    recipe = C.load_recipe(run / "recipe.toml", list(overrides), files=False)
    tokenizer = load_tokenizer(run / "tokenizer")
    model = build_model(recipe, vocab_size=tokenizer.vocab_size)
    weights = run / "best.safetensors"
    if checkpoint == "last" or not weights.is_file():
        weights = run / "model.safetensors"
    load_weights(model, weights)
    model.eval()
    return recipe, tokenizer, model


def train(recipe_path: str | None, *, overrides: list[str], out: str | None, resume: str | None) -> dict:
    """Train a new run from a recipe, or continue `resume` (a run directory) bit for bit."""
    from tfx.config import recipe_dict, to_toml
    from tfx.data.tokenizers import load_tokenizer, train_tokenizer
    from tfx.models import build_model
    from tfx.train.checkpoint import atomic_write_text
    from tfx.train.loop import autocast_for, select_device, train_loop

    if resume:
        run_dir = Path(resume)
        if not (run_dir / "state" / "LATEST").is_file():
            raise UsageError(f"--resume {run_dir}: no checkpoint there to resume from")
        recipe = C.load_recipe(run_dir / "recipe.toml", overrides)
    else:
        if recipe_path is None:
            raise UsageError("give a RECIPE to train, or --resume RUN")
        recipe = C.load_recipe(recipe_path, overrides)
        run_dir = Path(out or Path("runs") / recipe.name)
        if (run_dir / "state").exists() or (run_dir / "model.safetensors").exists():
            raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                             f"or pick another --out")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    run_dir.mkdir(parents=True, exist_ok=True)

    if resume:
        tokenizer = load_tokenizer(run_dir / "tokenizer")
    else:
        source = split_source(recipe, "train", fetch=True)
        from tfx.data.datasets import read_documents

        log(f"training the {recipe.tokenizer.kind} tokenizer")
        tokenizer = train_tokenizer(recipe.tokenizer, read_documents(source, text_field=recipe.data.text_field))
        tokenizer.save(run_dir / "tokenizer")
    atomic_write_text(run_dir / "recipe.toml", to_toml(recipe_dict(recipe)))

    train_ids, _ = load_split(recipe, tokenizer, "train", fetch=True)
    valid = load_split(recipe, tokenizer, "valid", fetch=True)
    log(f"{run_dir}: {train_ids.numel():,} training tokens, vocabulary {tokenizer.vocab_size}"
        + (f", {valid[0].numel():,} validation tokens" if valid else ", no validation split"))
    torch.manual_seed(recipe.train.seed)  # the initial weights are a function of the seed
    model = build_model(recipe, vocab_size=tokenizer.vocab_size)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    device = select_device(recipe.train.device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    blocks = PackedBlocks(train_ids, block=recipe.model.context, seed=recipe.train.seed, rank=rank, world=world)
    batches = lambda pos: blocks.batches(recipe.train.batch_size, pos)  # noqa: E731
    validate = None
    if valid is not None:
        autocast = autocast_for(device, recipe.train.precision)
        validate = lambda m: evaluate_ids(m, recipe, *valid, device=device, autocast=autocast,  # noqa: E731
                                          max_tokens=recipe.train.eval_tokens)
    try:
        return train_loop(cfg=recipe.train, model=model, batches=batches, validate=validate, run_dir=run_dir,
                          resume=bool(resume), log=log)
    except ValueError as exc:  # data too small for a batch, and the like
        raise RunError(str(exc)) from None


# ----------------------------------------------------------------------------- eval

def evaluate_ids(model, recipe, ids: torch.Tensor, n_bytes: int, *, device, autocast=None,
                 stride: int | None = None, max_tokens: int | None = None, batch_size: int = 32) -> dict:
    from tfx.evaluate import score_stream

    if max_tokens is not None and max_tokens < ids.numel() - 1:
        n_bytes = round(n_bytes * max_tokens / (ids.numel() - 1))
    nll, count = score_stream(model, ids, context=recipe.model.context, stride=stride, batch_size=batch_size,
                              device=device, max_tokens=max_tokens, autocast=autocast)
    return lm_metrics(nll, count, n_bytes)


def evaluate(run_dir: str, *, split: str = "test", data: str | None = None, stride: int | None = None,
             checkpoint: str = "best", batch_size: int = 32, device: str = "auto") -> dict:
    from tfx.data.datasets import count_bytes, encode_documents, read_documents
    from tfx.train.loop import select_device

    recipe, tokenizer, model = load_run(run_dir, checkpoint=checkpoint)
    if data:
        docs = read_documents(data, text_field=recipe.data.text_field)
        ids, n_bytes = encode_documents(tokenizer, docs), count_bytes(docs)
    else:
        loaded = load_split(recipe, tokenizer, split)
        if loaded is None:
            raise UsageError(f"the recipe of {run_dir} has no {split!r} split; give --data FILE")
        ids, n_bytes = loaded
    if ids.numel() < 2:
        raise UsageError("nothing to evaluate: the text is empty")
    dev = select_device(device)
    model.to(dev)
    result = evaluate_ids(model, recipe, ids, n_bytes, device=dev, stride=stride, batch_size=batch_size)
    return {"split": "file" if data else split, **result}


# ----------------------------------------------------------------------------- generate

def generate_lines(run_dir: str, prompts: Iterable[str], *, checkpoint: str = "best", seed: int | None = None,
                   on_text: Callable[[str], None] | None = None, **options) -> Iterable[str]:
    """Yield (prompt, continuation) per prompt, in order. `on_text` streams pieces as they come."""
    from tfx.decoding.generate import generate_text

    recipe, tokenizer, model = load_run(run_dir, checkpoint=checkpoint)
    settings = recipe.generate.model_dump()
    settings.update({k: v for k, v in options.items() if v is not None})
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for prompt in prompts:
        yield prompt, generate_text(model, tokenizer, prompt, generator=generator, on_text=on_text, warn=log,
                                    **settings)
