"""`tfx convert`: a tfx run to a Hugging Face model directory and back, for the architectures tfx
expresses exactly (one module per architecture in this package, listed in ARCHS).

An architecture module has
    NAME, MODEL_TYPES (config.json model_type values it reads), FAMILIES ({tfx family: HF architecture}),
    to_tfx(config, tensors, family, hf_dir) -> Imported   HF config + tensors -> recipe [model] + tfx tensors
    export_problems(recipe) -> list[str]                   why a run is not of this architecture ([] = it is)
    from_tfx(recipe, model, tokenizer, run_dir) -> (config, tensors)
(hf_dir and run_dir: the folders, for what a module reads beside the weights: BERT's [MASK] token, labels.)

Import checks every tensor both ways (each HF tensor used, each tfx tensor given, the same shapes),
refuses a setting tfx cannot express with its reason, and writes the run through a temporary folder.
"""
from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tfx.convert.hfdir import is_hf_dir, read_config, read_tensors, write_hf_dir
from tfx.errors import RunError, UsageError

ARCHS = ("gpt2", "llama", "bert", "marian")  # modules of this package


@dataclass
class Imported:
    """What an architecture module makes of an HF model: the recipe's family and [model] table, the
    tfx state_dict, the HF tensor names it used or may ignore, the tokenizer's vocabulary size (the
    encoder families add a [MASK] row past it), and a classifier's label names."""

    family: str
    model: dict
    state: dict[str, torch.Tensor]
    used: set[str]
    vocab_size: int
    ignored: set[str] = field(default_factory=set)  # buffers with no weights in them (causal masks, ...)
    labels: list[str] | None = None
    extra: dict = field(default_factory=dict)  # more recipe tables (generate defaults, ...)


def arch_module(name: str):
    return importlib.import_module(f"tfx.convert.{name}")


def arch_for(model_type: str):
    for name in ARCHS:
        module = arch_module(name)
        if model_type in module.MODEL_TYPES:
            return module
    supported = ", ".join(t for n in ARCHS for t in arch_module(n).MODEL_TYPES)
    raise UsageError(f"model_type {model_type!r}: tfx converts {supported}")


def convert(src: str | Path, out: str | Path, *, family: str | None = None, tokenizer: str | Path | None = None,
            arch: str | None = None, checkpoint: str = "best", force: bool = False,
            log: Callable[[str], None] = print) -> str:
    """Import (SRC is an HF model directory) or export (SRC is a tfx run); returns "import" or "export"."""
    from tfx.rundir import is_run

    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise UsageError("the output must be another folder than the source")
    if out.exists() and not force:
        raise UsageError(f"{out} exists: give another folder, or --force to replace it")
    if is_run(src):
        export_run(src, out, arch=arch, checkpoint=checkpoint, log=log)
        return "export"
    if is_hf_dir(src):
        import_hf(src, out, family=family, tokenizer=tokenizer, log=log)
        return "import"
    raise UsageError(f"{src}: neither a tfx run (recipe.toml) nor a Hugging Face model directory (config.json)")


def import_hf(hf_dir: Path, out: Path, *, family: str | None, tokenizer: str | Path | None,
              log: Callable[[str], None]) -> None:
    from tfx import config as C
    from tfx.families import build_model
    from tfx.train.checkpoint import save_weights

    config = read_config(hf_dir)
    module = arch_for(config["model_type"])
    if family and module.FAMILIES.get(family) is None:
        raise UsageError(f"--family {family}: a {module.NAME} model converts to {', '.join(module.FAMILIES)}")
    tensors = read_tensors(hf_dir)
    imp = module.to_tfx(config, tensors, family, hf_dir=hf_dir)
    unused = sorted(set(tensors) - imp.used - imp.ignored)
    if unused:
        raise UsageError(f"{hf_dir}: {len(unused)} tensors tfx has no place for (first: {unused[0]}): "
                         f"not a plain {module.NAME} model")
    tok = import_tokenizer(hf_dir, imp.vocab_size, tokenizer)
    # no training data came with the weights: the recipe names the model directory (eval takes --data FILE)
    raw = {"name": out.name, "family": imp.family, "data": {"train": str(hf_dir.resolve())}, "tokenizer": tok.config.model_dump(),
           "model": imp.model, **imp.extra}
    recipe = C.validate(raw, f"{hf_dir} (converted)")
    from tfx.rundir.files import RECIPE, TOKENIZER, atomic_write_text

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if imp.labels is not None:  # in the model's id order (a new run's would be sorted)
            import json

            from tfx.tasks.classifier import LABELS

            atomic_write_text(tmp / LABELS, json.dumps(imp.labels))
        model = build_model(recipe, tokenizer=tok, run_dir=tmp)
        load_exactly(model, imp.state, module.NAME)

        tok.save(tmp / TOKENIZER)
        save_weights(model, tmp / "model.safetensors")
        atomic_write_text(tmp / RECIPE, C.to_toml(C.recipe_dict(recipe)))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(t.numel() for t in imp.state.values())
    log(f"imported {hf_dir} ({module.NAME}, {len(tensors)} tensors, {n:,} numbers) as the {imp.family} run {out}")


def load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """Load `state` into `model`, refusing any tensor missing, left over or of another shape."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    extra = [k for k in state if k not in ours]
    shapes = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or extra or shapes:
        what = (f"no value for {missing[0]}" if missing else f"no place for {extra[0]}" if extra else
                f"{shapes[0]} is {tuple(state[shapes[0]].shape)}, the model's is {tuple(ours[shapes[0]].shape)}")
        raise RunError(f"the {arch} tensors do not fit the tfx model they describe: {what}")
    with torch.no_grad():
        model.load_state_dict({k: state[k].to(ours[k].dtype) for k in ours})


def import_tokenizer(hf_dir: Path, vocab_size: int, given: str | Path | None):
    """The run's tokenizer: `given` (a tfx tokenizer folder or run) or the HF model's tokenizer.json."""
    from tfx.data.tokenizers import load_tokenizer

    if given is not None:
        given = Path(given)
        tok = load_tokenizer(given / "tokenizer" if (given / "recipe.toml").is_file() else given)
        if tok.vocab_size != vocab_size:
            raise UsageError(f"--tokenizer {given}: {tok.vocab_size} ids, the model has {vocab_size}")
        return tok
    if not (hf_dir / "tokenizer.json").is_file():
        raise UsageError(f"{hf_dir}: no tokenizer.json (a Hugging Face fast tokenizer) to import; give "
                         "--tokenizer DIR, a tfx tokenizer (or run) with the model's ids")
    from tfx.data.tokenizer_hf import HFTokenizer

    try:
        return HFTokenizer.from_hf_dir(hf_dir, vocab_size=vocab_size)
    except ValueError as exc:
        raise UsageError(f"{hf_dir / 'tokenizer.json'}: {exc}") from None


def export_run(run: Path, out: Path, *, arch: str | None, checkpoint: str, log: Callable[[str], None]) -> None:
    from tfx.rundir import load_run

    recipe, tokenizer, model = load_run(run, checkpoint=checkpoint)
    names = [arch] if arch is not None else list(ARCHS)
    if arch is not None and arch not in ARCHS:
        raise UsageError(f"--arch {arch}: one of {', '.join(ARCHS)}")
    reasons = {}
    for name in names:
        module = arch_module(name)
        if module.FAMILIES.get(recipe.family) is None:
            reasons[name] = f"converts {', '.join(module.FAMILIES)} runs, not {recipe.family}"
            continue
        problems = module.export_problems(recipe)
        if problems:
            reasons[name] = "; ".join(problems)
            continue
        config, tensors = module.from_tfx(recipe, model, tokenizer, run_dir=run)
        write_hf_dir(out, config, tensors, tokenizer)
        tok = "" if hasattr(tokenizer, "save_hf") else f" (weights only: a {tokenizer.kind} tokenizer has no " \
                                                       f"Hugging Face form here)"
        log(f"exported {run} as a {name} model to {out}{tok}")
        return
    raise UsageError(f"{run}: no Hugging Face architecture expresses this run exactly: "
                     + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
