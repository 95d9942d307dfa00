"""init_from across families: an lm run starts an lm (every tensor, the tokenizer copied), a new
memory's tensors keep their fresh start and are named, a misfit is refused with the tensor's name."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import TINY, run_tfx, sets
from safetensors.torch import load_file

LM = "recipes/lm/shakespeare-char.toml"


@pytest.fixture(scope="module")
def source(tmp_path_factory, small_text):
    run = tmp_path_factory.mktemp("initfrom") / "src"
    run_tfx("train", LM, *sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1",
                               "train.steps=6", "train.eval_every=0"), "--out", str(run), check=True)
    return run


def test_an_lm_continues_from_an_lm(source, tmp_path, small_text):
    """With lr 1e-12 the one step moves no weight by more than ~1e-12: the new run's weights are the
    source's to 1e-9 (a fresh start differs by ~0.02), and its tokenizer is the source's files."""
    out = tmp_path / "ft"
    proc = run_tfx("train", LM, *sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1",
                                      "train.steps=1", "train.eval_every=0", "train.optimizer.lr=1e-12",
                                      f"init_from='{source}'"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    theirs, ours = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.allclose(theirs[k], ours[k], rtol=0, atol=1e-9) for k in theirs)
    assert re.search(rf"initialised from {re.escape(str(source))}: (\d+) of \1 tensors\n", proc.stderr)
    for f in (source / "tokenizer").iterdir():
        assert (out / "tokenizer" / f.name).read_bytes() == f.read_bytes()


def test_new_tensors_are_named_and_misfits_refused(source, tmp_path, small_text):
    common = sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1", "train.steps=1",
                  "train.eval_every=0", f"init_from='{source}'")
    xl = run_tfx("train", LM, *common, "--set", "model.memory.kind='memorizing'", "--out", str(tmp_path / "mem"))
    assert xl.returncode == 0, xl.stderr
    assert "; new: stack.recurrence.gate" in xl.stderr
    wide = run_tfx("train", LM, *common, "--set", "model.d_model=64", "--out", str(tmp_path / "wide"))
    assert wide.returncode == 2 and "does not fit this recipe's model: stack.embed.weight is" in wide.stderr
    assert "Traceback" not in wide.stderr


def test_freeze_keeps_named_parameters(source, tmp_path, small_text):
    """train.freeze = ["embeddings", "blocks:1"] after init_from: those tensors are the source's bit
    for bit after 4 steps (no gradient, no weight decay), every other one moved; a name that matches
    nothing is refused."""
    out = tmp_path / "frozen"
    common = sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1", "train.steps=4",
                  "train.eval_every=0", f"init_from='{source}'")
    proc = run_tfx("train", LM, *common, "--set", "train.freeze=['embeddings', 'blocks:1']", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "train.freeze:" in proc.stderr
    theirs, ours = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    frozen = {k for k in ours if "embed" in k or k.startswith("stack.blocks.0.") or k == "head.weight"}  # tied
    assert frozen and any(k.startswith("stack.blocks.0.") for k in frozen)
    assert all(torch.equal(theirs[k], ours[k]) for k in frozen)
    assert [k for k in ours if k not in frozen and torch.equal(theirs[k], ours[k])] == []
    bad = run_tfx("train", LM, *common, "--set", "train.freeze=['nothing.here']", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "names no parameter" in bad.stderr and "Traceback" not in bad.stderr
