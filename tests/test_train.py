"""The training loop in process: gradient accumulation, NaN stop, checkpoint safety."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tfx.config import validate
from tfx.data.batching import DataPosition
from tfx.errors import RunError
from tfx.families import build_model
from tfx.train import checkpoint as ckpt
from tfx.train.loop import train_loop

V = 17


def recipe(**train):
    return validate({"data": {"train": "x"}, "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "context": 12},
                     "train": {"steps": 3, "device": "cpu", "log_every": 1, "save_every": 0, **train}})


def fixed_batches(batch_size: int):
    """Rows with different numbers of ignored targets, so per-token normalisation matters."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, V, (24, 13), generator=g)
    target = rows[:, 1:].clone()
    for r in range(24):
        target[r, : (r * 5) % 11] = -100  # 0..10 ignored tokens per row

    def batches(pos: DataPosition):
        i = pos.cursor
        while True:
            sl = slice(i % 24, i % 24 + batch_size)
            i += batch_size
            yield {"input": rows[sl, :-1], "target": target[sl]}, DataPosition(0, i)

    return batches


def train_weights(tmp_path: Path, name: str, *, batch_size: int, grad_accum: int) -> dict:
    r = recipe(batch_size=batch_size, grad_accum=grad_accum, precision="fp32")
    torch.manual_seed(0)
    model = build_model(r, vocab_size=V)
    run = tmp_path / name
    run.mkdir()
    train_loop(cfg=r.train, model=model, batches=fixed_batches(batch_size), validate=None, run_dir=run,
               resume=False, log=lambda m: None)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    one = train_weights(tmp_path, "one", batch_size=8, grad_accum=1)
    accum = train_weights(tmp_path, "accum", batch_size=4, grad_accum=2)
    for key in one:
        torch.testing.assert_close(accum[key], one[key], rtol=1e-5, atol=1e-6)
    moved = train_weights(tmp_path, "other", batch_size=4, grad_accum=1)
    assert any(not torch.allclose(moved[k], one[k]) for k in one)  # the comparison can fail


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    r = recipe(steps=6, save_every=2, log_every=1)
    torch.manual_seed(0)
    model = build_model(r, vocab_size=V)
    real_loss = model.loss
    calls = {"n": 0}

    def poisoned(batch, state=None):
        calls["n"] += 1
        loss, logs, state = real_loss(batch, state)
        return (loss * float("nan") if calls["n"] >= 4 else loss), logs, state

    model.loss = poisoned
    with pytest.raises(RunError, match=r"loss became nan by step 4.*checkpoint \(step 2\) is kept"):
        train_loop(cfg=r.train, model=model, batches=fixed_batches(4), validate=None, run_dir=tmp_path,
                   resume=False, log=lambda m: None)
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt-00000002"
    fresh = build_model(r, vocab_size=V)
    ckpt.load_weights(fresh, tmp_path / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_checkpoint_round_trip_needs_no_pickle(tmp_path):
    r = recipe(steps=2, save_every=1)
    model = build_model(r, vocab_size=V)
    train_loop(cfg=r.train, model=model, batches=fixed_batches(4), validate=None, run_dir=tmp_path, resume=False,
               log=lambda m: None)
    latest = ckpt.latest_checkpoint(tmp_path)
    blob = torch.load(latest / "optim.pt", weights_only=True)  # raises if anything needs unpickling of code
    assert set(blob) == {"optimizer", "rng_cpu"}
    assert json.loads((latest / "trainer.json").read_text())["step"] == 2
    assert len(list((tmp_path / "state").glob("ckpt-*"))) == 1  # older checkpoints pruned


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_give_a_clear_error(tmp_path, damage):
    r = recipe()
    model = build_model(r, vocab_size=V)
    path = tmp_path / "model.safetensors"
    ckpt.save_weights(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(RunError, match="cannot load weights"):
        ckpt.load_weights(build_model(r, vocab_size=V), path)


@pytest.mark.parametrize("metric, best_step", [("loss", 3), ("accuracy", 2)])
def test_best_checkpoint_follows_best_metric(tmp_path, metric, best_step):
    """best.safetensors holds the weights of the validation with the lowest loss, or the highest
    accuracy when train.best_metric says so; the two differ on purpose here."""
    r = validate({"family": "classifier", "data": {"train": "x"},
                  "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "context": 12},
                  "train": {"steps": 3, "device": "cpu", "log_every": 1, "save_every": 0, "eval_every": 1,
                            "best_metric": metric}})
    torch.manual_seed(0)
    model = build_model(recipe(), vocab_size=V)  # any model: the loop only reads the validation numbers
    scripted = [{"loss": 0.6, "accuracy": 0.5}, {"loss": 0.7, "accuracy": 0.8}, {"loss": 0.5, "accuracy": 0.7}]
    seen = []

    def validate_fn(m):
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return scripted[len(seen) - 1]

    train_loop(cfg=r.train, model=model, batches=fixed_batches(4), validate=validate_fn, run_dir=tmp_path,
               resume=False, log=lambda m: None)
    assert len(seen) == 3
    best = build_model(recipe(), vocab_size=V)
    ckpt.load_weights(best, tmp_path / "best.safetensors")
    for key, value in best.state_dict().items():
        assert torch.equal(value, seen[best_step - 1][key])
    assert not all(torch.equal(best.state_dict()[k], seen[0][k]) for k in seen[0])  # the steps differ


def test_best_metric_must_be_reported_by_the_family():
    with pytest.raises(Exception, match="reports loss"):
        validate({"data": {"train": "x"}, "train": {"best_metric": "accuracy"}})
    with pytest.raises(Exception, match="need train.eval_bleu"):
        validate({"family": "seq2seq", "data": {"train": "x"}, "train": {"best_metric": "bleu"}})
    assert validate({"family": "seq2seq", "data": {"train": "x"},
                     "train": {"best_metric": "bleu", "eval_bleu": True}}).train.best_metric == "bleu"


def test_resume_of_a_run_that_died_before_its_first_checkpoint_starts_it_again(tmp_path, small_text):
    """--resume of a run with a recipe but no checkpoint trains it from step 0 (and says so); what the
    dead run left (its metrics, a best.safetensors) does not leak into the new one."""
    from conftest import tfx_in_process

    args = ["recipes/lm/shakespeare-char.toml", "--set", f"data.train={small_text}", "--set", "data.corpus=''",
            "--set", "model.n_layers=1", "--set", "model.context=32", "--set", "train.steps=4",
            "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.threads=1"]
    whole = tfx_in_process("train", *args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    dead = tmp_path / "dead"
    dead.mkdir()
    for name in ("recipe.toml", "tokenizer"):  # what a run killed during its first steps has
        src = tmp_path / "whole" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dead / name)
    (dead / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0, "lr": 0.0}\n{"step": 2, "lo')
    (dead / "best.safetensors").write_bytes(b"stale")
    again = tfx_in_process("train", "--resume", str(dead))
    assert again.returncode == 0, again.stderr
    assert "starting it again from step 0" in again.stderr
    losses = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert losses(dead) == losses(tmp_path / "whole") and len(losses(dead)) == 4
    assert (dead / "state" / "LATEST").is_file() and not (dead / "best.safetensors").exists()
    nothing = tfx_in_process("train", "--resume", str(tmp_path / "nowhere"))
    assert nothing.returncode == 2 and "no checkpoint there to resume from" in nothing.stderr


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16", "avx2"}, "bf16"), ({"amx_bf16"}, "bf16"),
                                             ({"avx2", "avx512f"}, "fp32"), (set(), "fp32")])
def test_precision_auto_follows_the_cpus_native_bf16(monkeypatch, flags, expected):
    from tfx.train import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
    chosen, why = precision.resolve_precision("auto", torch.device("cpu"))
    assert chosen == expected and why.startswith("auto: ") and ("has" in why)
    assert precision.resolve_precision("fp32", torch.device("cpu"))[0] == "fp32"  # an explicit choice stays
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: expected == "bf16")
    assert precision.resolve_precision("auto", torch.device("cuda"))[0] == expected


@pytest.mark.parametrize("native", [True, False])
def test_training_with_precision_auto_equals_the_precision_it_picks(tmp_path, monkeypatch, native):
    from tfx.train import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"} if native else {"avx2"})
    runs = {}
    for name in ("auto", "bf16" if native else "fp32"):
        r = recipe(precision=name, batch_size=4)
        torch.manual_seed(0)
        model = build_model(r, vocab_size=V)
        (tmp_path / name).mkdir()
        messages = []
        train_loop(cfg=r.train, model=model, batches=fixed_batches(4), validate=None, run_dir=tmp_path / name,
                   resume=False, log=messages.append)
        runs[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        if name == "auto":
            assert any(m.startswith(f"train.precision = 'auto': {'bf16' if native else 'fp32'}") for m in messages)
    assert runs["auto"] == runs["bf16" if native else "fp32"]
