"""Every shipped recipe loads, builds at tiny size and takes a training step; optimizer groups."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY
from tfx.config import load_recipe
from tfx.models import build_model
from tfx.registry import OPTIMIZER
from tfx.train.optim import param_groups

RECIPES = sorted((REPO / "recipes").rglob("*.toml"))


def test_there_are_shipped_recipes():
    names = {p.name for p in RECIPES}
    assert {"shakespeare-char.toml", "shakespeare-bpe.toml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recipe_builds_tiny_and_takes_a_step(path: Path, precision: str):
    recipe = load_recipe(path, [*TINY, f"train.precision={precision}"], files=False)
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=50)
    opt = OPTIMIZER.build(recipe.train.optimizer, model=model)
    x = torch.randint(0, 50, (2, recipe.model.context + 1))
    batch = {"input": x[:, :-1], "target": x[:, 1:]}
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, _, _ = model.loss(batch)
    (loss / model.count_tokens(batch)).backward()
    opt.step()
    assert torch.isfinite(loss) and abs(float(loss.detach()) / x[:, 1:].numel() - torch.log(torch.tensor(50.0))) < 0.5
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_no_weight_decay_on_norms_biases_and_embeddings():
    recipe = load_recipe(REPO / "recipes/lm/nanogpt-cpu.toml", TINY, files=False)
    model = build_model(recipe, vocab_size=50)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith(("qkv.weight", "out.weight", "up.weight", "down.weight")) for n in decayed)
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "stack.embed.weight" in skipped and "stack.pos.table.weight" in skipped
    assert any("norm" in n for n in skipped) and any(n.endswith(".bias") for n in skipped)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
