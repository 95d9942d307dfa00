"""train.tensorboard: every numeric metrics.jsonl value also lands in RUN/tensorboard/ as a scalar
(read back with tensorboard's own event reader); without the package, a clear usage error."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, TINY, sets, tfx_in_process

LM = str(REPO / "recipes" / "lm" / "shakespeare-char.toml")


def test_scalars_equal_the_metrics_rows(tmp_path, small_text):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = tfx_in_process("train", LM, *sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1",
                                          "train.steps=4", "train.eval_every=2", "train.tensorboard=true"),
                       "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    want = {(f"{row.get('split', 'train')}/{k}", row["step"]): v for row in rows for k, v in row.items()
            if k not in ("step", "split") and isinstance(v, (int, float))}
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert {"train/loss", "valid/loss", "valid/perplexity"} <= {tag for tag, _ in got}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in want.items())


def test_without_the_package_it_is_a_usage_error(tmp_path, small_text, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    r = tfx_in_process("train", LM, *sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1",
                                          "train.steps=2", "train.tensorboard=true"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "pip install tensorboard" in r.stderr
