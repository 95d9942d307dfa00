"""train.ema: validation and best.safetensors see an exponential moving average of the weights,
written out here from the weights of every step; training is untouched; a resume continues the
average bit for bit; the trained weights are put back exactly after each validation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_tfx, sets
from test_early_stopping import V, batches, recipe

from tfx.errors import UsageError
from tfx.families import build_model
from tfx.train import checkpoint as ckpt
from tfx.train.ema import PREFIX, WeightAverage
from tfx.train.loop import train_loop


def test_update_is_the_definition():
    """a_t = d_t a_(t-1) + (1 - d_t) p_t with d_t = min(D, (1 + t) / (10 + t)), a_0 = p_0, for a
    parameter walked through known values; integer tensors (none here) and buffers are not averaged."""
    layer = torch.nn.Linear(1, 1, bias=False)
    values = [0.5, 2.0, -1.0, 3.0, 0.25, 7.0]
    with torch.no_grad():
        layer.weight.fill_(values[0])
    ema = WeightAverage(layer, 0.6)
    expected = values[0]
    for t, v in enumerate(values[1:], start=1):
        with torch.no_grad():
            layer.weight.fill_(v)
        ema.update(layer, t)
        d = min(0.6, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * v
        assert ema.average["weight"].item() == pytest.approx(expected, abs=1e-6)
    assert [ema.factor(t) for t in (1, 2, 8, 100)] == [2 / 11, 3 / 12, 0.5, 0.6]


class Keep:
    """A validator that records the weights it is shown and returns a loss read from them."""

    def __init__(self):
        self.weights = []

    def __call__(self, model) -> dict:
        self.weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"loss": float(sum(p.detach().double().square().sum() for p in model.parameters()))}


def run(path: Path, validator=None, *, resume=False, **train) -> Keep:
    validator = validator or Keep()
    torch.manual_seed(0)
    model = build_model(recipe(**train), vocab_size=V)
    path.mkdir(exist_ok=True)
    train_loop(cfg=recipe(**train).train, model=model, batches=batches, validate=validator, run_dir=path,
               resume=resume, log=lambda line: None)
    return validator


def step_weights(path: Path) -> list[dict]:
    """The trained weights after each step, from a run that saved every step and kept every checkpoint."""
    out = []
    for folder in ckpt.checkpoints(path):
        model = build_model(recipe(), vocab_size=V)
        ckpt.load_weights(model, folder / "model.safetensors")
        out.append({k: v.clone() for k, v in model.named_parameters()})
    return out


def test_validation_sees_the_average_written_out(tmp_path):
    """The weights shown to each validation == the average computed here from every step's trained
    weights (and the initial ones); model.safetensors stays the trained weights; best.safetensors is
    the average at the best validation; the logged training losses are those of a run without it."""
    plain = run(tmp_path / "plain", save_every=1, keep_checkpoints=20, steps=8)
    seen = run(tmp_path / "ema", ema=0.5, save_every=1, keep_checkpoints=20, steps=8)
    trained = step_weights(tmp_path / "ema")
    torch.manual_seed(0)
    initial = dict(build_model(recipe(), vocab_size=V).named_parameters())
    average = {k: v.detach().clone() for k, v in initial.items()}
    for t, weights in enumerate(trained, start=1):
        d = min(0.5, (1 + t) / (10 + t))
        average = {k: d * average[k] + (1 - d) * weights[k] for k in average}
        assert all(torch.allclose(seen.weights[t - 1][k], average[k], atol=1e-7) for k in average)
        assert all(torch.equal(plain.weights[t - 1][k], weights[k]) for k in weights)  # training untouched
        assert not all(torch.equal(seen.weights[t - 1][k], weights[k]) for k in weights)
    losses = lambda p: [r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                        if "split" not in r]
    assert losses(tmp_path / "ema") == losses(tmp_path / "plain")
    valid = [r for r in map(json.loads, (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "valid"]
    best = min(range(len(valid)), key=lambda i: valid[i]["loss"])
    model = build_model(recipe(), vocab_size=V)
    ckpt.load_weights(model, tmp_path / "ema" / "best.safetensors")
    assert all(torch.equal(v, seen.weights[best][k]) for k, v in model.state_dict().items())
    blob = torch.load(ckpt.latest_checkpoint(tmp_path / "ema") / "optim.pt", weights_only=True)
    assert all(torch.allclose(blob[PREFIX + k], average[k], atol=1e-7) for k in average)


def test_resume_continues_the_average(tmp_path):
    """Cut at step 5 and resumed to 12: every later validation sees exactly the weights the
    uninterrupted run's did, and best.safetensors is the same file."""
    whole = run(tmp_path / "whole", ema=0.7, steps=12, save_every=0)
    cut = run(tmp_path / "cut", ema=0.7, steps=5, save_every=0)
    run(tmp_path / "cut", cut, resume=True, ema=0.7, steps=12, save_every=0)
    assert len(cut.weights) == len(whole.weights) == 12
    for a, b in zip(cut.weights, whole.weights):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cut" / "best.safetensors").read_bytes() == (tmp_path / "whole" / "best.safetensors").read_bytes()
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_fsdp_refuses_it():
    from tfx.train import distributed as dist

    with pytest.raises(UsageError, match="train.ema averages whole weights"):
        dist.check_recipe(recipe(ema=0.9, parallel="fsdp"), 2)
    dist.check_recipe(recipe(ema=0.9), 2)  # ddp: every rank holds the whole weights


def test_cli_run_with_ema(tmp_path, small_text):
    """A real char-level run with train.ema: eval of best.safetensors reproduces the best logged
    validation loss (the average's), and a bad decay is a clear error."""
    out = tmp_path / "run"
    args = sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1", "train.steps=30",
                "train.eval_every=10", "train.save_every=10", "train.ema=0.9", "train.eval_tokens=1000000")
    proc = run_tfx("train", "recipes/lm/shakespeare-char.toml", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    valid = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "valid"]
    ev = run_tfx("eval", str(out), "--split", "valid", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["loss"] == pytest.approx(min(r["loss"] for r in valid), abs=1e-5)
    bad = run_tfx("train", "recipes/lm/shakespeare-char.toml", *sets(*TINY, "train.ema=1.0"), "--out",
                  str(tmp_path / "bad"))
    assert bad.returncode == 2 and "train.ema" in bad.stderr and "Traceback" not in bad.stderr
