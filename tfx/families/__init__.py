"""The family registry: which model families exist and what each one is made of.

A family (lm, seq2seq, classifier, mlm, ...) is one `Family` record, registered by the module of
the same name in this package. It names the model builder, the task (data -> batches, validation,
evaluation, generation; tfx/tasks/), the self-attention stacks it has (which the recipe checks
against the attention kind) and what its validation reports. Nothing outside this package and a
family's own modules compares a family's name: code asks the record instead.

Adding a family is a model module, a task module, and one module here that registers it.
"""
from __future__ import annotations

from pathlib import Path

from tfx.families.base import FAMILY, Family, StackSpec, family_names, family_of, need_text_lm
from tfx.families import classifier, lm, mim, mlm, seq2seq, vit  # noqa: F401  (the registrations, one module per family)

__all__ = ["FAMILY", "Family", "StackSpec", "family_of", "family_names", "need_text_lm", "build_model",
           "init_encoder", "init_weights", "get_task"]


def build_model(recipe, *, tokenizer=None, vocab_size: int | None = None, run_dir: str | Path | None = None):
    """The recipe's model, built by its family (`vocab_size` defaults to the tokenizer's)."""
    vocab = vocab_size if vocab_size is not None else tokenizer.vocab_size
    return family_of(recipe).build(recipe, vocab, Path(run_dir) if run_dir is not None else None)


def get_task(recipe, run_dir: str | Path | None = None):
    """The recipe's task (tfx/tasks/), as its family names it."""
    return family_of(recipe).task()(recipe, run_dir)


def init_weights(model, source, *, where: str, same_family: bool, log) -> None:
    """`init_from`: a run of the same family gives every tensor both models have (continued
    pretraining, fine-tuning: an lm into an lm, seq2seq into seq2seq, ...); another family gives its
    encoder (an mlm or mim run into a classifier or vit). Tensors of this model that the source
    lacks (a new memory's gate, a new head) keep their fresh start and are named in the log; a
    tensor both have with another shape is refused."""
    if not same_family:
        return init_encoder(model, source, where=where, log=log)
    from tfx.errors import UsageError

    import torch

    theirs, ours = source.state_dict(), model.state_dict()
    bad = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if bad:
        raise UsageError(f"init_from: {where} does not fit this recipe's model: {bad[0]} is "
                         f"{tuple(theirs[bad[0]].shape)} there and {tuple(ours[bad[0]].shape)} here (use the same "
                         f"model sizes and tokenizer)")
    shared = [k for k in ours if k in theirs]
    if not shared:
        raise UsageError(f"init_from: {where} has no tensor this model has")
    with torch.no_grad():
        model.load_state_dict({**ours, **{k: theirs[k] for k in shared}})
    new = [k for k in ours if k not in theirs]
    log(f"initialised from {where}: {len(shared)} of {len(ours)} tensors"
        + (f"; new: {', '.join(new[:4])}{' ...' if len(new) > 4 else ''}" if new else ""))


def init_encoder(model, source, *, where: str, log) -> None:
    """Start `model.encoder` from `source`'s encoder (an already loaded run, e.g. MLM pretraining)."""
    from tfx.errors import UsageError

    if not hasattr(source, "encoder") or not hasattr(model, "encoder"):
        raise UsageError(f"init_from: {where} has no encoder to start from")
    # the encoder, and what feeds it where both models have it (a ViT's patch embedding and [CLS])
    parts = ["encoder"] + [p for p in ("patches", "cls") if getattr(model, p, None) is not None
                           and getattr(source, p, None) is not None]
    theirs = {f"{p}.{k}" if k else p: v for p in parts for k, v in _state(getattr(source, p)).items()}
    ours = {f"{p}.{k}" if k else p: v for p in parts for k, v in _state(getattr(model, p)).items()}
    bad = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    if bad:
        raise UsageError(f"init_from: the encoder of {where} does not fit this recipe's model "
                         f"(first mismatch: {bad[0]}); use the same model settings as the pretraining run")
    import torch

    with torch.no_grad():
        for p in parts:
            part = getattr(model, p)
            if isinstance(part, torch.nn.Parameter):
                part.copy_(getattr(source, p))
            else:
                part.load_state_dict(getattr(source, p).state_dict())
    log(f"{' and '.join(parts)} initialised from {where} ({len(theirs)} tensors); the head is new")


def _state(part) -> dict:
    """A module's state_dict, or {"": tensor} for a bare parameter ([CLS])."""
    import torch

    return {"": part.detach()} if isinstance(part, torch.nn.Parameter) else part.state_dict()
