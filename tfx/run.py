"""The commands as plain functions: train, eval and generate over a run directory.

What differs between families lives in tfx.tasks; this module owns the run directory.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from tfx import config as C
from tfx.errors import RunError, UsageError
from tfx.tasks import get_task
from tfx.tasks.common import log


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
    model = build_model(recipe, tokenizer=tokenizer, run_dir=run)
    load_weights(model, weights_path(run, checkpoint))
    model.eval()
    return recipe, tokenizer, model


def weights_path(run_dir: str | Path, checkpoint: str = "best") -> Path:
    """The weights file load_run reads: best.safetensors if any (unless `last`), else model.safetensors."""
    weights = Path(run_dir) / "best.safetensors"
    return weights if checkpoint != "last" and weights.is_file() else Path(run_dir) / "model.safetensors"


def _new_tokenizer(recipe, task, run_dir: Path):
    """Train the recipe's tokenizer (or take init_from's) and save it into the run."""
    from tfx.data.tokenizers import load_tokenizer, train_tokenizer

    if recipe.init_from:
        shutil.copytree(Path(recipe.init_from) / "tokenizer", run_dir / "tokenizer", dirs_exist_ok=True)
        return load_tokenizer(run_dir / "tokenizer")
    separate = recipe.src_tokenizer is not None
    if separate:
        log(f"training the {recipe.src_tokenizer.kind} source tokenizer")
        train_tokenizer(recipe.src_tokenizer, task.tokenizer_texts("src")).save(run_dir / "tokenizer-src")
    log(f"training the {recipe.tokenizer.kind} {'target ' if separate else ''}tokenizer")
    tokenizer = train_tokenizer(recipe.tokenizer, task.tokenizer_texts("tgt" if separate else "joint"))
    tokenizer.save(run_dir / "tokenizer")
    return tokenizer


def train(recipe_path: str | None, *, overrides: list[str], out: str | None, resume: str | None) -> dict:
    """Train a new run from a recipe, or continue `resume` (a run directory) bit for bit."""
    from tfx.config import recipe_dict, to_toml
    from tfx.data.tokenizers import load_tokenizer
    from tfx.models import build_model, init_from
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
        if recipe.init_from and not (Path(recipe.init_from) / "recipe.toml").is_file():
            raise UsageError(f"init_from: {recipe.init_from!r} is not a tfx run directory (train it first)")
        run_dir = Path(out or Path("runs") / recipe.name)
        if (run_dir / "state").exists() or (run_dir / "model.safetensors").exists():
            raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                             f"or pick another --out")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use {run_dir} as the run directory: {exc.strerror}") from None
    task = get_task(recipe, run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer") if resume else _new_tokenizer(recipe, task, run_dir)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        batches, validate = task.prepare(tokenizer, rank=rank, world=world, run_dir=run_dir)
    except ValueError as exc:  # data too small for a batch, and the like
        raise RunError(str(exc)) from None
    atomic_write_text(run_dir / "recipe.toml", to_toml(recipe_dict(recipe)))
    torch.manual_seed(recipe.train.seed)  # the initial weights are a function of the seed
    model = build_model(recipe, tokenizer=tokenizer, run_dir=run_dir)
    if recipe.init_from and not resume:
        init_from(model, recipe.init_from, log=log)
    log(f"{run_dir}: {recipe.family} model with {sum(p.numel() for p in model.parameters()):,} parameters")
    device = select_device(recipe.train.device)
    autocast = autocast_for(device, recipe.train.precision)
    validator = (lambda m: validate(m, device, autocast)) if validate else None
    try:
        return train_loop(cfg=recipe.train, model=model, batches=batches, validate=validator, run_dir=run_dir,
                          resume=bool(resume), log=log)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def evaluate(run_dir: str, *, split: str = "test", data: str | None = None, checkpoint: str = "best",
             device: str = "auto", knn: dict | None = None, **options) -> dict:
    """The family's metrics; `knn` (a dict of lambda/k/temperature overrides, maybe empty) adds the
    kNN-LM's metrics beside the LM's (lm runs with a datastore)."""
    from tfx.train.loop import select_device

    recipe, tokenizer, model = load_run(run_dir, checkpoint=checkpoint)
    if options.get("stream") is not None:
        _need_lm(recipe, "--stream-window")
    knn_pair = _open_knn(run_dir, recipe, knn, checkpoint) if knn is not None else None
    if knn_pair is not None and options.get("stride") is None:
        options["stride"] = (knn_pair[0].saved_settings() or {}).get("stride")  # the windows it was tuned on
    dev = select_device(device)
    model.to(dev)
    result = get_task(recipe, run_dir).evaluate(model, tokenizer, split=split, data=data, device=dev, run_dir=run_dir,
                                                knn=knn_pair, **options)
    spans = learned_spans(model)
    return {"split": "file" if data else split, **result, **({"attention_spans": spans} if spans else {})}


def learned_spans(model) -> list[list[float]]:
    """Adaptive attention spans in tokens, one list of heads per layer (empty without the option)."""
    from tfx.nn.attention.span import AdaptiveSpan

    return [[round(float(s), 1) for s in m.spans().detach()] for m in model.modules() if isinstance(m, AdaptiveSpan)]


def generate_lines(run_dir: str, prompts: Iterable[str], *, checkpoint: str = "best", seed: int | None = None,
                   on_text: Callable[[str], None] | None = None, **options) -> Iterable[tuple[str, str]]:
    """Yield (input line, output) per input, in order. `on_text` streams pieces as they come."""
    recipe, tokenizer, model = load_run(run_dir, checkpoint=checkpoint)
    knn = options.pop("knn", None)
    if options.get("stream_window") is not None:
        _need_lm(recipe, "--stream-window")
    knn_pair = _open_knn(run_dir, recipe, knn, checkpoint) if knn is not None else None
    settings = recipe.generate.model_dump()
    settings.update({k: v for k, v in options.items() if v is not None})
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    yield from get_task(recipe, run_dir).generate(model, tokenizer, prompts, settings=settings, generator=generator,
                                                  on_text=on_text, run_dir=run_dir, knn=knn_pair)


# ----------------------------------------------------------------------------- kNN-LM (Khandelwal et al., 2020)

def _need_lm(recipe, what: str) -> None:
    if recipe.family != "lm":
        raise UsageError(f"{what} needs a decoder-only lm run, not a {recipe.family} run")


def _open_knn(run_dir, recipe, overrides: dict, checkpoint: str):
    """(Datastore, KNNSettings) of a run; warns when the store came from other weights."""
    from tfx.memory.datastore import Datastore, sha256_file
    from tfx.memory.knn import resolve_settings

    _need_lm(recipe, "--knn")
    store = Datastore(run_dir)
    built_with = store.meta.get("checkpoint", {}).get("sha256")
    if built_with and built_with != sha256_file(weights_path(run_dir, checkpoint)):
        log("warning: the kNN datastore was built with other weights than this checkpoint; its keys may not "
            "match (rebuild with tfx knn build)")
    return store, resolve_settings(store, lam=overrides.get("lam"), k=overrides.get("k"),
                                   temperature=overrides.get("temperature"), nprobe=overrides.get("nprobe"),
                                   candidates=overrides.get("candidates"), log=log)


def _source_info(recipe, split: str | None, data: str | None) -> dict:
    """Where a text came from: the file (size, sha256) and, for a holdout split, which part of it."""
    from tfx.memory.datastore import sha256_file
    from tfx.tasks.common import split_source

    info: dict = {"split": None if data else split}
    if data:
        path = data
    else:
        holdout = recipe.data.holdout if split != "test" and split_source(recipe, "valid", fetch=True) is None \
            else 0.0
        path = split_source(recipe, "train" if holdout else split, fetch=True)
        if holdout:
            info["holdout"] = {"fraction": holdout, "part": "tail" if split == "valid" else "head"}
    info["path"] = str(path)
    if path and Path(path).is_file():
        info.update(bytes=Path(path).stat().st_size, sha256=sha256_file(path))
    return info


def knn_build(run_dir: str, *, split: str | None = "train", data: str | None = None, checkpoint: str = "best",
              device: str = "auto", dtype: str = "float16", index: str = "auto", nlist: int | None = None,
              pq_m: int | None = None, pq_bits: int = 8, train_size: int = 100_000, nprobe: int | None = None,
              stride: int | None = None, batch_size: int = 32, max_tokens: int | None = None) -> dict:
    """Write RUN/knn/ (keys, values, faiss index, meta) from a text; returns the meta."""
    from tfx.memory.datastore import build_datastore, plan_index, sha256_file
    from tfx.memory.knn import key_dim
    from tfx.train.loop import select_device

    recipe, tokenizer, model = load_run(run_dir, checkpoint=checkpoint)
    _need_lm(recipe, "tfx knn build")
    task = get_task(recipe, run_dir)
    ids, _ = task.token_stream(tokenizer, split=split, data=data, fetch=True)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    plan = plan_index(index, ids.numel() - 1, key_dim(model), nlist=nlist, pq_m=pq_m, pq_bits=pq_bits,
                      train_size=train_size, nprobe=nprobe)
    weights = weights_path(run_dir, checkpoint)
    dev = select_device(device)
    model.to(dev)
    source = {**_source_info(recipe, split, data), **({"max_tokens": max_tokens} if max_tokens else {})}
    log(f"knn build: {ids.numel() - 1:,} keys of dimension {key_dim(model)} ({dtype}), {plan['kind']} index")
    meta = build_datastore(run_dir, model, ids, context=recipe.model.context, stride=stride, batch_size=batch_size,
                           device=dev, dtype=dtype, plan=plan, source=source,
                           checkpoint={"checkpoint": checkpoint, "weights": weights.name,
                                       "sha256": sha256_file(weights)}, log=log)
    log(f"knn build: wrote {Path(run_dir) / 'knn'} ({meta['count']:,} entries)")
    return meta


def knn_tune(run_dir: str, *, split: str = "valid", data: str | None = None, checkpoint: str = "best",
             device: str = "auto", max_tokens: int | None = 100_000, nprobe: int | None = None,
             candidates: int | None = None, stride: int | None = None, batch_size: int = 32) -> dict:
    """Grid search of the interpolation on a text; saves the best to RUN/knn/settings.json."""
    from tfx.memory.datastore import Datastore
    from tfx.memory.knn import tune
    from tfx.train.loop import select_device

    recipe, tokenizer, model = load_run(run_dir, checkpoint=checkpoint)
    _need_lm(recipe, "tfx knn tune")
    store = Datastore(run_dir)
    ids, _ = get_task(recipe, run_dir).token_stream(tokenizer, split=split, data=data, fetch=True)
    source = _source_info(recipe, split, data)
    built_on = store.meta.get("source", {})
    if source.get("sha256") and (source["sha256"], source.get("holdout")) == (built_on.get("sha256"),
                                                                                built_on.get("holdout")):
        log("warning: tuning on the datastore's own text: every token finds itself, so the settings will "
            "overfit (use a held-out split)")
    dev = select_device(device)
    model.to(dev)
    result = tune(model, store, ids, context=recipe.model.context, stride=stride, batch_size=batch_size,
                  device=dev, max_tokens=max_tokens, nprobe=nprobe, candidates=candidates, log=log)
    best = result["grid"][0]
    saved = {"lambda": best["lambda"], "k": best["k"], "temperature": best["temperature"], "nprobe": nprobe,
             "candidates": candidates,
             "perplexity": best["perplexity"], "base_perplexity": result["base"]["perplexity"],
             "tokens": result["tokens"], "stride": min(stride or recipe.model.context, recipe.model.context),
             "source": source}
    result["saved"] = str(store.save_settings(saved))
    return result


def average(run_dir: str, *, last: int, out: str) -> Path:
    """A new run whose weights are the mean of the `last` newest checkpoints (fairseq-style)."""
    from safetensors.torch import load_file

    from tfx.train.checkpoint import checkpoints, save_weights

    found = checkpoints(run_dir)
    if len(found) < last:
        raise UsageError(f"{run_dir} keeps {len(found)} checkpoint(s), fewer than --last {last}; "
                         f"train with --set train.keep_checkpoints={last}")
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"{target} already exists; pick another --out")
    recipe, tokenizer, model = load_run(run_dir, checkpoint="last")
    chosen = found[-last:]
    total = None
    for path in chosen:
        weights = load_file(str(path / "model.safetensors"))
        total = weights if total is None else {k: total[k] + v for k, v in weights.items()}
    mean = {k: (v / last).to(v.dtype) for k, v in total.items()}
    missing, unexpected = model.load_state_dict(mean, strict=False)
    if unexpected:
        raise RunError(f"unexpected tensors in {chosen[-1]}: {unexpected[:3]}")
    target.mkdir(parents=True, exist_ok=True)
    for name in ("recipe.toml", "labels.json"):
        if (Path(run_dir) / name).is_file():
            shutil.copy(Path(run_dir) / name, target / name)
    for name in ("tokenizer", "tokenizer-src"):
        if (Path(run_dir) / name).is_dir():
            shutil.copytree(Path(run_dir) / name, target / name)
    save_weights(model, target / "model.safetensors")
    log(f"averaged {', '.join(p.name for p in chosen)} into {target}")
    return target
