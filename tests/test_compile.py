"""train.compile: torch.compile'd training steps follow the eager ones (same losses, same weights)."""
from __future__ import annotations

import contextlib
import copy
import shutil

import pytest
import torch

from conftest import REPO, TINY
from tfx import config as C
from tfx.families import build_model
from tfx.registry import OPTIMIZER
from tfx.train.loop import TrainStep

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile on the CPU needs a C++ compiler")


def test_compiled_steps_equal_eager():
    recipe = C.load_recipe(REPO / "recipes/lm/shakespeare-char.toml",
                           [*TINY, "model.n_layers=1", "model.dropout=0.0"], files=False)
    torch.manual_seed(0)
    eager = build_model(recipe, vocab_size=50)
    compiled = copy.deepcopy(eager)
    batches = [torch.randint(0, 50, (4, recipe.model.context + 1)) for _ in range(3)]
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        cfg = recipe.train.model_copy(update={"compile": name == "compiled"})
        step = TrainStep(model, OPTIMIZER.build(cfg.optimizer, model=model), cfg=cfg, autocast=contextlib.nullcontext)
        assert (step.loss == model.loss) == (name == "eager")
        losses[name] = [float(step([{"input": b[:, :-1], "target": b[:, 1:]}], [None])[0]) for b in batches]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_decoding_equals_eager():
    """generate.compile: one-token steps through torch.compile give the eager greedy tokens."""
    from tfx.decoding.generate import generate_ids

    recipe = C.load_recipe(REPO / "recipes/lm/shakespeare-char.toml", [*TINY, "model.n_layers=1"], files=False)
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=50).eval()
    prompt = torch.randint(0, 50, (6,)).tolist()
    eager = generate_ids(model, prompt, max_new_tokens=40, temperature=0)  # crosses the context: a re-prefill
    assert generate_ids(model, prompt, max_new_tokens=40, temperature=0, compile=True) == eager
