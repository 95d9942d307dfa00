"""The commands as plain functions: train, eval, generate, knn and average over a run directory.

What differs between families lives in their tasks (tfx/tasks/, named by tfx/families/); the run
directory's layout, writes and loading live in tfx/rundir/.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from tfx import config as C
from tfx.errors import RunError, UsageError
from tfx.families import family_of, get_task, need_text_lm
from tfx.rundir import load_run, weights_path  # noqa: F401  (re-exported: tfx.run.load_run)
from tfx.rundir.files import (BEST, METRICS, RECIPE, SRC_TOKENIZER, STATE, TOKENIZER, WEIGHTS, atomic_write_text,
                              sha256_file)
from tfx.tasks.common import EvalOptions, GenerateSettings, log
from tfx.train import distributed as dist


def new_tokenizer(recipe, task, run_dir: Path):
    """Train the recipe's tokenizer (or take init_from's) and save it into the run."""
    from tfx.data.stats import vocab_warning
    from tfx.data.tokenizers import load_tokenizer, train_tokenizer

    if recipe.init_from:
        shutil.copytree(Path(recipe.init_from) / TOKENIZER, run_dir / TOKENIZER, dirs_exist_ok=True)
        if (Path(recipe.init_from) / SRC_TOKENIZER).is_dir():  # a seq2seq run's separate source side
            shutil.copytree(Path(recipe.init_from) / SRC_TOKENIZER, run_dir / SRC_TOKENIZER, dirs_exist_ok=True)
        return load_tokenizer(run_dir / TOKENIZER)
    separate = recipe.src_tokenizer is not None

    def trained(cfg, side: str, key: str):
        texts = task.tokenizer_texts(side)
        tok = train_tokenizer(cfg, texts)
        warning = vocab_warning(cfg, tok, texts, key=key)  # a vocabulary large for the text (tfx.data.stats)
        if warning:
            log(warning)
        return tok

    if separate:
        log(f"training the {recipe.src_tokenizer.kind} source tokenizer")
        trained(recipe.src_tokenizer, "src", "src_tokenizer").save(run_dir / SRC_TOKENIZER)
    log(f"training the {recipe.tokenizer.kind} {'target ' if separate else ''}tokenizer")
    tokenizer = trained(recipe.tokenizer, "tgt" if separate else "joint", "tokenizer")
    tokenizer.save(run_dir / TOKENIZER)
    return tokenizer


def train(recipe_path: str | None, *, overrides: list[str], out: str | None, resume: str | None) -> dict:
    """Train a new run from a recipe, or continue `resume` (a run directory) bit for bit."""
    from tfx.train.early_stop import check as check_patience
    from tfx.train.launch import lost_contact
    from tfx.train.loop import select_device

    if resume:
        run_dir = Path(resume)
        recipe = C.load_recipe(run_dir / RECIPE, overrides) if (run_dir / RECIPE).is_file() else None
        if not (run_dir / STATE / "LATEST").is_file():
            if recipe is None:
                raise UsageError(f"--resume {run_dir}: no checkpoint there to resume from")
            log(f"--resume {run_dir}: the run stopped before its first checkpoint; starting it again from "
                f"step 0 with its saved recipe")
            resume = None
    else:
        if recipe_path is None:
            raise UsageError("give a RECIPE to train, or --resume RUN")
        recipe = C.load_recipe(recipe_path, overrides)
        if recipe.init_from and not (Path(recipe.init_from) / RECIPE).is_file():
            raise UsageError(f"init_from: {recipe.init_from!r} is not a tfx run directory (train it first)")
        run_dir = Path(out or Path("runs") / recipe.name)
        if (run_dir / STATE).exists() or (run_dir / WEIGHTS).exists():
            raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                             f"or pick another --out")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    dist.check_recipe(recipe, dist.world())
    check_patience(recipe.train)  # before the tokenizer and the data: what the recipe alone says
    with lost_contact(run_dir), dist.process_group(select_device(recipe.train.device).type):
        return _train(recipe, run_dir, resume)  # a failed collective: one line, exit 1 (tfx.train.launch)


def _train(recipe, run_dir: Path, resume: str | None) -> dict:
    """`train` once the run directory is chosen (and, under torchrun, the process group is up).
    Rank 0 writes the run's files (tokenizer, labels, recipe) while the other ranks wait, then
    read its tokenizer; every rank builds the same global batches and the training step takes its rows of each (tfx.train.distributed.shard)."""
    from tfx.config import recipe_dict, to_toml
    from tfx.data.tokenizers import load_tokenizer
    from tfx.families import build_model, init_weights
    from tfx.nn.stack import set_activation_checkpointing
    from tfx.train.loop import autocast_for, select_device, train_loop

    first = dist.rank() == 0
    task = get_task(recipe, run_dir)
    if first:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot use {run_dir} as the run directory: {exc.strerror}") from None
        if not resume:  # what a run that died before its first checkpoint left: not this run's
            for stale in (METRICS, BEST):
                (run_dir / stale).unlink(missing_ok=True)
        tokenizer = load_tokenizer(run_dir / TOKENIZER) if resume else new_tokenizer(recipe, task, run_dir)
        batches, validate = _prepare(task, tokenizer)  # a classifier writes its labels.json here
        atomic_write_text(run_dir / RECIPE, to_toml(recipe_dict(recipe)))
        dist.barrier()
    else:
        dist.barrier()  # rank 0's tokenizer and labels are on disk
        tokenizer = load_tokenizer(run_dir / TOKENIZER)
        batches, validate = _prepare(task, tokenizer)
    torch.manual_seed(recipe.train.seed)  # the initial weights are a function of the seed
    model = build_model(recipe, tokenizer=tokenizer, run_dir=run_dir)
    set_activation_checkpointing(model, recipe.train.activation_checkpointing)
    if recipe.init_from and not resume:
        source_recipe, _, source = load_run(recipe.init_from)
        init_weights(model, source, where=recipe.init_from, same_family=family_of(source_recipe) is family_of(recipe),
                     log=log)
    log(f"{run_dir}: {recipe.family} model with {sum(p.numel() for p in model.parameters()):,} parameters")
    if recipe.train.freeze:
        from tfx.train.freeze import freeze

        tensors, count = freeze(model, recipe.train.freeze)
        log(f"train.freeze: {tensors} tensors ({count:,} parameters) kept as they start")
    device = select_device(recipe.train.device)
    autocast = autocast_for(device, recipe.train.precision)
    validator = (lambda m: validate(m, device, autocast)) if validate else None
    try:
        return train_loop(cfg=recipe.train, model=model, batches=batches, validate=validator, run_dir=run_dir,
                          resume=bool(resume), log=log)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def _prepare(task, tokenizer):
    try:
        return task.prepare(tokenizer)  # the global batches, on every rank
    except ValueError as exc:  # data too small for a batch, and the like
        raise RunError(str(exc)) from None


def evaluate(run_dir: str, *, split: str = "test", data: str | None = None, checkpoint: str = "best",
             device: str = "auto", knn: dict | None = None, stride: int | None = None, context: int | None = None,
             batch_size: int = 32, max_tokens: int | None = None, stream: tuple[int, int] | None = None,
             beam: int | None = None, hyp_out: str | None = None, lm_infinite: int | None = None,
             tta: bool = False) -> dict:
    """The family's metrics; `knn` (a dict of lambda/k/temperature overrides, maybe empty) adds the
    kNN-LM's metrics beside the LM's (lm runs with a datastore); `lm_infinite` (global tokens) reads a
    dense run with LM-Infinite; `tta`: test-time augmentation (image families); see EvalOptions for the rest."""
    from tfx.nn.depth import depth_report, reset_depth_tallies
    from tfx.train.loop import select_device

    recipe, tokenizer, model = load_infinite(run_dir, checkpoint, lm_infinite)
    if stream is not None:
        need_text_lm(recipe, "--stream-window")
    if tta and not family_of(recipe).images:
        raise UsageError(f"--tta averages over image views: a {recipe.family} run reads text")
    knn_pair = _open_knn(run_dir, recipe, knn, checkpoint) if knn is not None else None
    if knn_pair is not None and stride is None:
        stride = (knn_pair[0].saved_settings() or {}).get("stride")  # the windows it was tuned on
    options = EvalOptions(stride=stride, context=context, batch_size=batch_size, max_tokens=max_tokens,
                          stream=stream, knn=knn_pair, hyp_out=hyp_out, tta=tta,
                          generate=C.generate_settings(recipe.generate, {"beam": beam}))  # refused like a recipe value
    dev = select_device(device)
    model.to(dev)
    reset_depth_tallies(model)
    result = get_task(recipe, run_dir).evaluate(model, tokenizer, split=split, data=data, device=dev, options=options)
    spans = learned_spans(model)
    depth = depth_report(model)  # universal depth: steps per position
    return {"split": "file" if data else split, **result, **({"attention_spans": spans} if spans else {}),
            **({"depth": depth} if depth else {})}


def load_infinite(run_dir: str, checkpoint: str, global_tokens: int | None):
    """load_run, or with `global_tokens` the dense LM run read with LM-Infinite's attention."""
    from tfx.nn.attention.lm_infinite import swap_overrides
    from tfx.rundir import is_run

    if global_tokens is None or not is_run(run_dir):
        return load_run(run_dir, checkpoint=checkpoint)
    saved = C.load_recipe(Path(run_dir) / RECIPE, files=False)
    need_text_lm(saved, "--lm-infinite")
    return load_run(run_dir, checkpoint=checkpoint, overrides=swap_overrides(saved, global_tokens))


def learned_spans(model) -> list[list[float]]:
    """Adaptive attention spans in tokens, one list of heads per layer (empty without the option)."""
    from tfx.nn.attention.span import AdaptiveSpan

    return [[round(float(s), 1) for s in m.spans().detach()] for m in model.modules() if isinstance(m, AdaptiveSpan)]


def generate_lines(run_dir: str, prompts: Iterable[str], *, checkpoint: str = "best", seed: int | None = None,
                   on_text: Callable[[str], None] | None = None, knn: dict | None = None,
                   stop: Iterable[str] = (), nbest: int | None = None, stream_window: int | None = None,
                   sinks: int | None = None, exit_threshold: float | None = None, lm_infinite: int | None = None,
                   **overrides) -> Iterable[tuple[str, str]]:
    """Yield (input line, output) per input, in order. `on_text` streams pieces as they come.
    `overrides` are keys of the recipe's [generate] table (None = the recipe's value), validated as
    the recipe's own values are; a bad one is a UsageError naming it. `exit_threshold`: a CALM run's
    (default: RUN/exit.json's, else the recipe's)."""
    from tfx.calibrate import use_exit

    recipe, tokenizer, model = load_infinite(run_dir, checkpoint, lm_infinite)
    config = C.generate_settings(recipe.generate, overrides)
    use_exit(model, recipe, run_dir, exit_threshold, log)  # CALM's early exits, where calibrated
    if knn is not None and getattr(getattr(model, "exits", None), "threshold", 1.0) < 1:
        raise UsageError("--knn: the kNN-LM's keys are the last layer's feed-forward inputs, which a token that "
                         "exits early never reaches; add --exit-threshold 1 (the full model)")
    if stream_window is not None:
        need_text_lm(recipe, "--stream-window")
    knn_pair = _open_knn(run_dir, recipe, knn, checkpoint) if knn is not None else None
    settings = GenerateSettings(
        config=config, stop=tuple(stop), nbest=nbest, knn=knn_pair, on_text=on_text,
        stream=(sinks or 0, stream_window) if stream_window else None,
        generator=torch.Generator().manual_seed(seed) if seed is not None else None)
    yield from get_task(recipe, run_dir).generate(model, tokenizer, prompts, settings)


# ----------------------------------------------------------------------------- kNN-LM (Khandelwal et al., 2020)

def _open_knn(run_dir, recipe, overrides: dict, checkpoint: str):
    """(Datastore, KNNSettings) of a run; warns when the store came from other weights."""
    from tfx.knn.datastore import Datastore
    from tfx.knn.scoring import resolve_settings

    need_text_lm(recipe, "--knn")
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
    from tfx.tasks.common import holdout_source

    info: dict = {"split": None if data else split}
    if data:
        path, holdout = data, 0.0
    else:
        path, holdout = holdout_source(recipe, split, fetch=True)
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
    from tfx.knn.datastore import build_datastore, plan_index
    from tfx.knn.keys import key_dim
    from tfx.train.loop import select_device

    recipe, tokenizer, model = load_run(run_dir, checkpoint=checkpoint)
    need_text_lm(recipe, "tfx knn build")
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
    from tfx.knn.datastore import Datastore
    from tfx.knn.scoring import tune
    from tfx.train.loop import select_device

    recipe, tokenizer, model = load_run(run_dir, checkpoint=checkpoint)
    need_text_lm(recipe, "tfx knn tune")
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
        weights = load_file(str(path / WEIGHTS))
        total = weights if total is None else {k: total[k] + v for k, v in weights.items()}
    mean = {k: (v / last).to(v.dtype) for k, v in total.items()}
    missing, unexpected = model.load_state_dict(mean, strict=False)
    if unexpected:
        raise RunError(f"unexpected tensors in {chosen[-1]}: {unexpected[:3]}")
    target.mkdir(parents=True, exist_ok=True)
    for item in Path(run_dir).iterdir():  # the recipe, tokenizers and what a task saved (labels.json)
        if item.is_dir() and item.name in (TOKENIZER, SRC_TOKENIZER):
            shutil.copytree(item, target / item.name)
        elif item.is_file() and item.suffix in (".toml", ".json") and not item.name.startswith("."):
            shutil.copy(item, target / item.name)
    save_weights(model, target / WEIGHTS)
    log(f"averaged {', '.join(p.name for p in chosen)} into {target}")
    return target
