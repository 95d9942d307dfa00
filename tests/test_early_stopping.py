"""train.patience: the run stops after N validations in a row without a better train.best_metric,
saves, says so (log line, metrics.jsonl record), and best.safetensors is its result; the count
survives --resume and reaches every rank; a run that never validates refuses the key."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_tfx, sets, tfx_in_process

from tfx.config import validate
from tfx.data.batching import DataPosition
from tfx.errors import UsageError
from tfx.families import build_model
from tfx.train import checkpoint as ckpt
from tfx.train.loop import train_loop

V = 17
LM = "recipes/lm/shakespeare-char.toml"
# validation losses by step (eval_every = 1): best at 2, then 5 (the count starts again), then three
# worse ones: patience 3 stops at step 8 with best step 5; patience 4 one validation later, at 9
LOSSES = [3.0, 2.5, 2.6, 2.7, 2.4, 2.45, 2.5, 2.6, 2.55, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4]
# accuracies (higher is better; a tie is no improvement): patience 2 stops at step 6, best step 4.
# Read as losses, the same numbers would stop at step 3
ACCURACIES = [0.5, 0.6, 0.55, 0.7, 0.65, 0.7, 0.9, 0.95, 0.97, 0.99]


def recipe(family="lm", **train):
    return validate({"family": family, "data": {"train": "x"},
                     "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "context": 12},
                     "train": {"steps": 14, "device": "cpu", "log_every": 1, "save_every": 0, "eval_every": 1,
                               "precision": "fp32", "threads": 1, "schedule": {"kind": "constant"}, **train}})


def batches(pos: DataPosition):
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, V, (24, 13), generator=g)
    i = pos.cursor
    while True:
        sl = slice(i % 24, i % 24 + 4)
        i += 4
        yield {"input": rows[sl, :-1], "target": rows[sl, 1:]}, DataPosition(0, i)


class Scripted:
    """A validator returning the scripted numbers in turn (the sequence goes on across a resume),
    keeping a copy of the weights it was shown at each validation."""

    def __init__(self, metric: str, values: list[float], after=lambda n: None):
        self.metric, self.values, self.weights, self.after = metric, values, [], after

    def __call__(self, model) -> dict:
        self.weights.append({k: v.clone() for k, v in model.state_dict().items()})
        value = self.values[len(self.weights) - 1]
        self.after(len(self.weights))
        return {"loss": value} if self.metric == "loss" else {"loss": 1.0, self.metric: value}


def train(run: Path, r, validator, *, resume=False) -> list[str]:
    logs = []
    torch.manual_seed(0)
    model = build_model(recipe(), vocab_size=V)  # any model: the loop only reads the validation numbers
    run.mkdir(exist_ok=True)
    train_loop(cfg=r.train, model=model, batches=batches, validate=validator, run_dir=run, resume=resume,
               log=logs.append)
    return logs


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trainer_json(run: Path) -> dict:
    return json.loads((ckpt.latest_checkpoint(run) / "trainer.json").read_text())


def same_weights(path: Path, weights: dict) -> bool:
    model = build_model(recipe(), vocab_size=V)
    ckpt.load_weights(model, path)
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family, metric, values, patience, stop, best", [
    ("lm", "loss", LOSSES, 3, 8, 5),
    ("classifier", "accuracy", ACCURACIES, 2, 6, 4),
])
def test_stops_after_patience_validations_without_improvement(tmp_path, family, metric, values, patience, stop,
                                                               best):
    """It stops at the validation after `patience` non-improving ones (lower loss, higher accuracy),
    saves that step, logs one line, writes the record, and best.safetensors is the best step's."""
    validator = Scripted(metric, values)
    logs = train(tmp_path, recipe(family, patience=patience, best_metric=metric), validator)
    assert len(validator.weights) == stop  # one validation per step, none after the stop
    assert ckpt.latest_checkpoint(tmp_path).name == f"ckpt-{stop:08d}"
    assert trainer_json(tmp_path).items() >= {"step": stop, "early_stopped": stop, "best_step": best,
                                              "bad_validations": patience}.items()
    assert records(tmp_path)[-1] == {"step": stop, "early_stop": True, "best_step": best, "best_metric": metric,
                                     "best": values[best - 1], "patience": patience}
    assert logs[-1] == (f"early stop at step {stop}: no better valid {metric} in {patience} validations (best "
                        f"{values[best - 1]:.4f} at step {best}); the run's result is best.safetensors")
    assert same_weights(tmp_path / "best.safetensors", validator.weights[best - 1])
    assert same_weights(tmp_path / "model.safetensors", validator.weights[stop - 1])
    assert not same_weights(tmp_path / "best.safetensors", validator.weights[stop - 1])  # the steps differ


class Clock:
    """tfx.train.loop's `time`: a millisecond per reading, and a minute's jump when asked."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.001
        return self.now


@pytest.mark.parametrize("cut", ["steps", "max_minutes"])
def test_a_cut_run_resumed_stops_where_the_whole_one_does(tmp_path, monkeypatch, cut):
    """Cut at step 7 (two validations into the bad run) by train.steps = 7 or by train.max_minutes
    (its clock jumps a minute after the 6th validation), then resumed: the count goes on from the
    checkpoint, so it stops at step 8 as the uninterrupted run does, with the same best weights."""
    whole = Scripted("loss", LOSSES)
    train(tmp_path / "whole", recipe(patience=3), whole)
    clock = Clock()
    cut_run = Scripted("loss", LOSSES, after=lambda n: setattr(clock, "now", clock.now + 60 * (n == 6)))
    if cut == "max_minutes":
        monkeypatch.setattr("tfx.train.loop.time", clock)
    logs = train(tmp_path / "cut", recipe(patience=3, **({"steps": 7} if cut == "steps" else {"max_minutes": 1})),
                 cut_run)
    assert cut == "steps" or logs[-1] == "train.max_minutes (1) reached at step 7; saved"
    assert trainer_json(tmp_path / "cut").items() >= {"step": 7, "bad_validations": 2, "best_step": 5,
                                                      "early_stopped": None}.items()
    logs = train(tmp_path / "cut", recipe(patience=3), cut_run, resume=True)
    assert len(cut_run.weights) == 8 and logs[-1].startswith("early stop at step 8:")
    assert same_weights(tmp_path / "cut" / "best.safetensors", whole.weights[4])
    assert [r for r in records(tmp_path / "cut") if "early_stop" in r] == [records(tmp_path / "whole")[-1]]


def test_resuming_a_stopped_run(tmp_path):
    """Resuming a run that stopped early does nothing and says why, with train.steps raised too;
    raising train.patience trains on with the count kept (patience 4: one more validation)."""
    validator = Scripted("loss", LOSSES)
    train(tmp_path, recipe(patience=3), validator)
    for more_steps in ({}, {"steps": 30}):
        logs = train(tmp_path, recipe(patience=3, **more_steps), validator, resume=True)
        assert len(validator.weights) == 8 and ckpt.latest_checkpoint(tmp_path).name == "ckpt-00000008"
        assert logs[-1].startswith("nothing to do: the run stopped early at step 8, with no better valid loss in "
                                   "its last 3 validations (best 2.4000 at step 5) and train.patience = 3")
        assert "--set train.patience=6" in logs[-1]
    logs = train(tmp_path, recipe(patience=4), validator, resume=True)
    assert len(validator.weights) == 9 and logs[-1].startswith("early stop at step 9: no better valid loss in 4")
    assert trainer_json(tmp_path).items() >= {"step": 9, "early_stopped": 9, "best_step": 5}.items()


def _rank_worker(rank: int, port: int, run: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TFX_DIST_TIMEOUT="20")
    from tfx.train import distributed as dist

    torch.set_num_threads(1)
    with dist.process_group("cpu"):
        validator = Scripted("loss", LOSSES)  # called on rank 0 only
        logs = train(Path(run), recipe(patience=3), validator)
        Path(run, f"rank{rank}.json").write_text(json.dumps({"validations": len(validator.weights),
                                                             "last": logs[-1]}))


def test_two_ranks_stop_at_the_same_step(tmp_path):
    """Under torchrun only rank 0 validates; rank 1 learns the decision at that validation and stops at
    the same step (were it to train on, its next collective would find rank 0 gone)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_worker, args=(port, str(tmp_path)), nprocs=2)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["validations"] == 8 and one["validations"] == 0
    assert zero["last"].startswith("early stop at step 8:") and one["last"].startswith("early stop at step 8:")
    assert trainer_json(tmp_path).items() >= {"step": 8, "early_stopped": 8, "best_step": 5}.items()


def test_cli_run_stops_early(tmp_path, small_text):
    """A real char-level run on 60 kB held out 10% for validation, at a learning rate that overshoots:
    validation loss stops improving, the run stops and says so; --resume then does nothing."""
    run = tmp_path / "run"
    proc = run_tfx("train", LM, *sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1",
                                      "train.steps=200", "train.eval_every=5", "train.save_every=0",
                                      "train.log_every=5", "train.optimizer.lr=0.05", "train.patience=2"),
                   "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    stop = next(r for r in records(run) if r.get("early_stop"))
    valid = [r for r in records(run) if r.get("split") == "valid"]
    assert valid[-1]["step"] == stop["step"] < 200 and stop["patience"] == 2
    assert min(valid, key=lambda r: r["loss"])["step"] == stop["best_step"]
    assert [r["step"] for r in valid[-3:]] == [stop["best_step"], stop["step"] - 5, stop["step"]]
    assert f"early stop at step {stop['step']}: no better valid loss in 2 validations" in proc.stderr
    again = tfx_in_process("train", "--resume", str(run))
    assert again.returncode == 0 and f"nothing to do: the run stopped early at step {stop['step']}" in again.stderr


def test_patience_without_validation_is_refused(tmp_path, small_text):
    """Exit 2 before training: eval_every = 0 (refused before the tokenizer: no run directory), and data
    with no validation split (refused before the first step: no checkpoint)."""
    args = sets(*TINY, f"data.train={small_text}", "data.corpus=''", "train.steps=20", "train.patience=2")
    proc = tfx_in_process("train", LM, *args, *sets("train.eval_every=0"), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "train.eval_every = 0 validates only once, at the end" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "a").exists()
    proc = tfx_in_process("train", LM, *args, *sets("train.eval_every=5"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "the data has no validation split: set data.valid, or data.holdout" in proc.stderr
    assert not (tmp_path / "b" / "state").exists()
    with pytest.raises(UsageError, match=r"train.eval_every \(20\) is not below train.steps \(20\)"):
        train(tmp_path / "c", recipe(patience=2, steps=20, eval_every=20), Scripted("loss", LOSSES))
