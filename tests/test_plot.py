"""tfx plot: curves of real runs drawn with matplotlib (the points drawn are the logged ones),
--metrics lists them, tokens and time are logged and continue across --resume, bad input is a
clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, run_tfx, sets, tfx_in_process

from tfx.errors import UsageError
from tfx.plot import curves, plot_runs, read_rows

LM = "recipes/lm/shakespeare-char.toml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_text) -> list[Path]:
    """Two tiny char runs (lr 1e-2 and 3e-3), 12 steps, validated every 4."""
    root = tmp_path_factory.mktemp("plotruns")
    out = []
    for name, lr in (("fast", "1e-2"), ("slow", "3e-3")):
        run = root / name
        run_tfx("train", LM, *sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1",
                                   "train.steps=12", "train.eval_every=4", "train.save_every=4",
                                   f"train.optimizer.lr={lr}"), "--out", str(run), check=True)
        out.append(run)
    return out


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_rows_log_tokens_and_time(runs):
    train = [r for r in rows(runs[0]) if "split" not in r]
    assert [r["seen_tokens"] for r in train] == [4 * 32 * r["step"] for r in train]  # batch 4 x context 32 a step
    valid = [r for r in rows(runs[0]) if r.get("split") == "valid"]
    assert [r["seen_tokens"] for r in valid] == [4 * 32 * r["step"] for r in valid]
    times = [r["train_time"] for r in train]
    assert all(b > a > 0 for a, b in zip(times, times[1:]))


def test_resume_continues_tokens_and_time(runs, tmp_path, small_text):
    """Cut at step 8 (train.steps = 8) and resumed to 12: tokens go on from the checkpoint's count
    (a run that started again from 0 would log 128 at step 9), time keeps growing."""
    run = tmp_path / "cut"
    args = sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1", "train.eval_every=4",
                "train.save_every=4", "train.optimizer.lr=1e-2")
    run_tfx("train", LM, *args, "--set", "train.steps=8", "--out", str(run), check=True)
    run_tfx("train", "--resume", str(run), "--set", "train.steps=12", check=True)
    train = [r for r in rows(run) if "split" not in r]
    whole = [r for r in rows(runs[0]) if "split" not in r]
    assert [(r["step"], r["seen_tokens"]) for r in train] == [(r["step"], r["seen_tokens"]) for r in whole]
    times = [r["train_time"] for r in train]
    assert all(b > a for a, b in zip(times, times[1:]))


def test_curves_are_the_logged_points(runs):
    found = curves(read_rows(runs[0]))
    assert {"train.loss", "train.lr", "train.tokens_per_s", "valid.loss", "valid.perplexity"} <= set(found)
    assert [row["step"] for row, _ in found["valid.loss"]] == [4, 8, 12]
    assert [v for _, v in found["train.loss"]] == [r["loss"] for r in rows(runs[0]) if "split" not in r]


def test_plot_draws_each_run_in_each_panel(runs, tmp_path):
    import matplotlib.image

    out = tmp_path / "curves.png"
    drawn = plot_runs(runs, out, names=["loss", "valid.perplexity"], x="tokens")
    assert drawn == {"train.loss": {"fast": 12, "slow": 12}, "valid.loss": {"fast": 3, "slow": 3},
                     "valid.perplexity": {"fast": 3, "slow": 3}}
    picture = matplotlib.image.imread(out)
    assert picture.shape[1] > 3 * picture.shape[0] > 0  # three panels side by side


def test_cli(runs, tmp_path):
    listed = run_tfx("plot", *map(str, runs), "--metrics")
    assert listed.returncode == 0 and "valid.loss(3)" in listed.stdout and "train.loss(12)" in listed.stdout
    out = tmp_path / "p.png"
    proc = run_tfx("plot", *map(str, runs), "--y", "valid.loss", "--x", "time", "--labels", "a,b", "--out", str(out))
    assert proc.returncode == 0 and out.read_bytes()[:4] == b"\x89PNG", proc.stderr
    assert "valid.loss (a 3 points, b 3 points)" in proc.stderr
    for bad, says in [(["--y", "valid.bleu", "--out", str(out)], "no curve named valid.bleu"),
                      (["--x", "epoch", "--out", str(out)], "--x 'epoch'"),
                      (["--out", str(tmp_path / "p.txt")], ".png, .pdf or .svg"),
                      (["--labels", "one", "--out", str(out)], "1 labels for 2 runs"),
                      ([], "give --out")]:
        proc = tfx_in_process("plot", *map(str, runs), *bad)  # the error paths: no start-up each
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, (bad, proc.stderr)
    missing = tfx_in_process("plot", str(tmp_path / "nope"), "--out", str(out))
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr


def test_unknown_curve_names_what_there_is(runs, tmp_path):
    with pytest.raises(UsageError, match="they logged: .*train.loss"):
        plot_runs(runs, tmp_path / "x.png", names=["valid.accuracy"])
