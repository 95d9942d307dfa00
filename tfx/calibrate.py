"""`tfx calibrate-exit RUN --delta D`: the early-exit threshold of a CALM run (tfx/nn/early_exit.py).

Agreement is measured token by token on held-out text read as a decoder reads it (an lm: windows
of the training context; seq2seq: the reference translations, after their sources), each token a
one-token decode step through the KV cache with exits (teacher forcing: the next input is the
text's token, not the model's), and a token agrees when the top token
of the exit it left by is the full model's top token at that position. Candidate thresholds are
quantiles of the exits' confidences over the same text (full model, layers 1..L-1): the 0.95, 0.90,
..., 0 quantiles tried from the highest threshold down until one agrees on fewer than 1 - delta of
the tokens, then four steps between that one and the last that passed; the chosen threshold is the
lowest that passed (CALM's fixed-sequence search, without its statistical test: the numbers are the
sample's own). The result goes to RUN/exit.json, which `tfx generate` and `tfx bench
generate` then use; `--check` reports agreement and layers on another split at that threshold.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from tfx.errors import UsageError

EXIT_FILE = "exit.json"
COARSE_STEP, FINE = 0.05, 4
COARSE = [1 - COARSE_STEP * k for k in range(1, 21)]  # confidence quantiles tried: 0.95, 0.90, ..., 0


def exits_of(model, recipe):
    exits = getattr(model, "exits", None)
    if exits is None:
        raise UsageError(f"this {recipe.family} run has no early exits (train it with [model.exit] "
                         "kind = \"calm\")")
    return exits


def use_exit(model, recipe, run_dir: str | Path, threshold: float | None,
             log: Callable[[str], None] | None = None) -> None:
    """Set the decoding threshold of a CALM run: `threshold` if given, else RUN/exit.json's (from
    `tfx calibrate-exit`), else the recipe's. A run without exits takes only None."""
    exits = getattr(model, "exits", None)
    if exits is None:
        if threshold is not None:
            exits_of(model, recipe)
        return
    if not 0.0 <= (threshold if threshold is not None else 0.0) <= 1.0:
        raise UsageError(f"--exit-threshold: between 0 and 1 (1: the full model), got {threshold}")
    saved = Path(run_dir) / EXIT_FILE
    if threshold is None and saved.exists():
        try:
            calibrated = json.loads(saved.read_text())
            threshold, exits.measure = float(calibrated["threshold"]), calibrated["measure"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{saved}: not a calibration tfx wrote ({exc}); run tfx calibrate-exit again "
                             "or delete it") from None
        if log:
            log(f"early exit: {exits.measure} threshold {threshold:.6g} (calibrated at delta "
                f"{calibrated.get('delta')}; {saved})")
    exits.threshold = threshold if threshold is not None else exits.threshold


class Batch:
    """One decoder batch of a split on the device: its inputs, the positions that count, how a fresh
    decoding state starts and what a full pass needs besides the tokens (a seq2seq's source)."""

    def __init__(self, model, batch: dict, device):
        self.tokens, self.keep = batch["tokens"].to(device), batch["keep"].to(device)
        self.source: dict = {}
        if "src" in batch:  # seq2seq: the encoder's output, once
            mask = batch["src_mask"].to(device)
            self.source = {"source": model.encode(batch["src"].to(device), mask), "source_mask": mask}

    def new_state(self, model):
        B, T = self.tokens.shape
        if self.source:
            return model.new_state(self.source["source"], self.source["source_mask"], T)
        return model.new_state(B, T)


def decoder_of(model):
    """The stack that carries the exits: a seq2seq's decoder, an lm's stack."""
    return getattr(model, "decoder", None) or model.stack


@torch.no_grad()
def decode_with_exits(model, batch: Batch, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(top tokens, exit layers), both (B, T), of teacher-forced one-token steps over the batch."""
    exits = model.exits
    exits.threshold = threshold
    state = batch.new_state(model)
    tops, layers = [], []
    for t in range(batch.tokens.shape[1]):
        logits, used = exits.run(decoder_of(model), model.head, batch.tokens[:, t:t + 1], state)
        tops.append(logits[:, -1].argmax(-1))
        layers.append(used[:, -1])
    return torch.stack(tops, 1), torch.stack(layers, 1)


@torch.no_grad()
def full_pass(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(the full model's top tokens (B, T), every exit's confidence before the last at the positions
    that count, pooled (N,))."""
    exits, stack = model.exits, decoder_of(model)
    outputs: list = []
    h, _ = stack(batch.tokens, outputs=outputs, **batch.source)
    before = [stack.enter(batch.tokens, None, **batch.source)[0]] + outputs[:-2]  # each layer's input
    conf = [exits.confidence(i, exits.norms[i](outputs[i]), outputs[i], before[i], model.head)[batch.keep]
            for i in range(len(outputs) - 1)]
    return model.head(h).argmax(-1), torch.cat(conf)


def measure_at(model, batches: list[Batch], fulls: list[torch.Tensor], threshold: float) -> dict:
    """Agreement with the full model and mean layers used over the batches' positions that count."""
    agree, layers, n = 0.0, 0.0, 0
    for batch, full in zip(batches, fulls):
        tops, used = decode_with_exits(model, batch, threshold)
        agree += float((tops == full)[batch.keep].double().sum())
        layers += float(used[batch.keep].double().sum())
        n += int(batch.keep.sum())
    return {"threshold": threshold, "agreement": round(agree / n, 5), "mean_layers": round(layers / n, 4)}


def calibrate_exit(run_dir: str, *, delta: float, split: str = "valid", check: str | None = "test",
                   measure: str | None = None, max_tokens: int = 16384, checkpoint: str = "best",
                   device: str = "auto", log: Callable[[str], None] = print) -> dict:
    """Pick and save RUN's exit threshold (see the module's doc); returns what exit.json holds."""
    from tfx.families import get_task
    from tfx.rundir import load_run
    from tfx.rundir.files import atomic_write_text
    from tfx.train.loop import select_device

    if not 0 < delta < 1:
        raise UsageError(f"--delta: a fraction of tokens between 0 and 1, got {delta}")
    recipe, tokenizer, model = load_run(run_dir, checkpoint=checkpoint)
    exits = exits_of(model, recipe)
    if measure is not None:
        if measure == "classifier" and exits.classifier is None:
            raise UsageError("--measure classifier: this run trained no exit classifier "
                             f"(its model.exit.measure is {recipe.model.exit.measure!r})")
        exits.measure = measure
    dev = select_device(device)
    model.to(dev)
    task = get_task(recipe, run_dir)

    def read(name: str) -> tuple[list[Batch], list[torch.Tensor], torch.Tensor]:
        batches = [Batch(model, b, dev) for b in task.decoder_batches(tokenizer, name, max_tokens)]
        passes = [full_pass(model, b) for b in batches]
        return batches, [top for top, _ in passes], torch.cat([c for _, c in passes])

    batches, fulls, confidences = read(split)
    tokens = sum(int(b.keep.sum()) for b in batches)
    log(f"calibrate-exit: {run_dir}, {exits.measure} confidence, {tokens:,} {split} tokens, delta {delta}")
    pooled = confidences.float()
    tried: list[dict] = []
    layers = len(decoder_of(model).blocks)
    chosen = {"threshold": 1.0, "agreement": 1.0, "mean_layers": float(layers)}

    def descend(levels: list[float]) -> float | None:
        """Try the confidence quantiles at `levels` from the highest threshold down; the level that
        failed first, or None."""
        nonlocal chosen
        for level in levels:
            threshold = round(float(torch.quantile(pooled, level)), 6)
            if threshold >= 1.0 or any(t["threshold"] == threshold for t in tried):
                continue
            result = measure_at(model, batches, fulls, threshold)
            tried.append({"quantile": round(level, 4), **result})
            log(f"  threshold {threshold:.6g} (quantile {level:.3f}): agreement {result['agreement']:.4f}, "
                f"mean layers {result['mean_layers']:.3f}")
            if result["agreement"] < 1 - delta:
                return level
            chosen = result
        return None

    failed = descend(COARSE)
    if failed is not None:  # finer steps between the last level that passed and the one that failed
        above = failed + COARSE_STEP
        descend([above - COARSE_STEP * k / (FINE + 1) for k in range(1, FINE + 1)])
    out = {"measure": exits.measure, "delta": delta, "split": split, "tokens": tokens, "layers": layers, **chosen,
           "tried": tried}
    if check:
        test, test_fulls, _ = read(check)
        out["check"] = {"split": check, "tokens": sum(int(b.keep.sum()) for b in test),
                        **measure_at(model, test, test_fulls, chosen["threshold"])}
    atomic_write_text(Path(run_dir) / EXIT_FILE, json.dumps(out, indent=1) + "\n")
    return out
