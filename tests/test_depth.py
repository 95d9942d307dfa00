"""Universal Transformer depth with ACT (tfx/nn/depth.py) against its definition: unrolled without
halting, ACT's weighted sum and frozen states written out per position, the ponder cost's gradient,
and `tfx eval --json` reporting the steps per position."""
from __future__ import annotations

import json

import torch

from conftest import REPO, TINY, run_tfx, sets
from tfx.config import import_kinds, validate
from tfx.families import build_model

import_kinds()
V = 17


def lm(**depth):
    recipe = validate({"data": {"train": "x.txt"},
                       "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "context": 16, "position": {"kind": "rope"},
                                 "depth": {"kind": "universal", "max_steps": 4, **depth}}})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=V).double().eval()


TOKENS = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))


def step_fn(model):
    """One step of the shared blocks, run by hand (the stack's positions, a causal spec)."""
    from tfx.nn.attention.base import AttnSpec

    stack = model.stack
    pos = torch.arange(TOKENS.shape[1])
    spec = AttnSpec(q_pos=pos, k_pos=pos, causal=True)

    def step(x):
        for block in stack.blocks:
            x = block(x, pos=stack.pos, spec=spec, q_pos=pos)
        return x

    return step


def logits_of(model, y):
    return model.head(model.stack.norm(y)) if hasattr(model, "head") else None


def test_without_halting_it_is_the_shared_blocks_unrolled_max_steps_times():
    model = lm(act=False)
    step = step_fn(model)
    x = model.stack.embed(TOKENS)
    for n in range(1, 5):
        x = step(x + model.stack.depth.timestep[n - 1])
    full, _ = model(TOKENS)
    torch.testing.assert_close(full, logits_of(model, x))
    assert len(model.stack.blocks) == 2 and len(model.stack.passes()) == 8  # shared weights, one cache per pass


def test_a_halting_unit_that_never_fires_gives_the_unrolled_blocks():
    never = lm()
    with torch.no_grad():
        never.stack.depth.halt.bias.fill_(-40.0)
        never.stack.depth.halt.weight.zero_()
    plain = lm(act=False)
    missing, unexpected = plain.load_state_dict(never.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"stack.depth.halt.weight", "stack.depth.halt.bias"}
    torch.testing.assert_close(never(TOKENS)[0], plain(TOKENS)[0], rtol=1e-9, atol=1e-9)


def test_each_position_outputs_acts_weighted_sum_and_keeps_it_once_halted():
    model = lm(halt_epsilon=0.05)
    with torch.no_grad():  # halting that differs between positions and steps
        model.stack.depth.halt.weight.normal_(0, 20.0, generator=torch.Generator().manual_seed(2))
        model.stack.depth.halt.bias.fill_(0.5)
    step, halt = step_fn(model), model.stack.depth.halt
    B, T = TOKENS.shape
    state = model.stack.embed(TOKENS)
    total = [[0.0] * T for _ in range(B)]
    out = torch.zeros_like(state)
    stopped = [[None] * T for _ in range(B)]
    for n in range(4):
        h = step(state + model.stack.depth.timestep[n])
        p = torch.sigmoid(halt(h))[..., 0]
        new_state = h.clone()
        for b in range(B):
            for t in range(T):
                if stopped[b][t] is not None:  # halted: its output, unchanged
                    new_state[b, t] = out[b, t]
                    continue
                if total[b][t] + float(p[b, t]) >= 0.95 or n == 3:  # N: remainder R = 1 - sum of earlier p
                    out[b, t] = out[b, t] + (1 - total[b][t]) * h[b, t]
                    stopped[b][t] = n + 1
                    new_state[b, t] = out[b, t]
                else:
                    out[b, t] = out[b, t] + p[b, t] * h[b, t]
                    total[b][t] += float(p[b, t])
        state = new_state
    steps = {s for row in stopped for s in row}
    assert len(steps) > 1, f"every position halted at the same step {steps}: the test would check little"
    full, _ = model(TOKENS)
    torch.testing.assert_close(full, logits_of(model, out))


def test_the_ponder_cost_trains_the_halting_unit():
    model = lm(ponder_cost=0.5).train()
    model(TOKENS)
    (penalty,) = [m.aux_loss() for m in model.modules() if type(m).__name__ == "UniversalDepth"]
    assert penalty is not None and 0.5 * 1 <= float(penalty) <= 0.5 * 5  # N + R is between 1 and max_steps + 1
    penalty.backward()
    assert model.stack.depth.halt.bias.grad.abs() > 0 and model.stack.depth.halt.weight.grad.abs().sum() > 0
    assert model.stack.depth.aux_loss() is None  # taken once


def test_train_then_eval_reports_the_steps_per_position(tmp_path, small_text):
    run = tmp_path / "ut"
    depth = ["model.depth.kind=\"universal\"", "model.depth.max_steps=3", "model.n_layers=1"]
    data = [f"data.train={small_text}", f"data.valid={small_text}", 'data.corpus=""']
    run_tfx("train", "recipes/lm/shakespeare-char.toml", "--out", str(run),
            *sets(*TINY, *depth, *data, "train.steps=6"), check=True, cwd=REPO)
    result = json.loads(run_tfx("eval", str(run), "--split", "valid", "--json", "--max-tokens", "500",
                                check=True).stdout)
    report = result["depth"]
    assert 1 <= report["mean_steps"] <= 3 and abs(sum(report["steps"].values()) - 1.0) < 1e-3
    assert set(report["steps"]) <= {"1", "2", "3"} and report["positions"] >= 500
