"""MEGABYTE ([model.patches], tfx/models/megabyte.py): position t sees inputs <= t only, across patch
borders as within them, and generation with both levels' caches equals the parallel forward."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, TINY, run_tfx, sets, tfx_in_process
from tfx.config import import_kinds, validate
from tfx.errors import UsageError
from tfx.families import build_model

import_kinds()
V, P = 260, 4


def recipe(position="rope", **patches):
    return validate({"data": {"train": "x.txt"}, "tokenizer": {"kind": "byte"}, "model": {
        "d_model": 16, "n_layers": 2, "n_heads": 2, "context": 16, "position": {"kind": position},
        "patches": {"size": P, "local_d_model": 8, **patches}}})


def model_for(position="rope"):
    torch.manual_seed(0)
    return build_model(recipe(position), vocab_size=V).double().eval()


TOKENS = torch.randint(0, V, (2, 15), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
@pytest.mark.parametrize("prefill", [1, 4, 6])
def test_cached_generation_equals_the_parallel_forward(position, prefill):
    model = model_for(position)
    want, _ = model(TOKENS)
    state = model.new_state(2, TOKENS.shape[1])
    first, state = model(TOKENS[:, :prefill], state)
    steps = [first] + [model(TOKENS[:, t:t + 1], state)[0] for t in range(prefill, TOKENS.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-10, atol=1e-10)
    assert state.length == TOKENS.shape[1]


def test_position_t_sees_inputs_up_to_t_only_across_patch_borders():
    model = model_for()
    T = 14
    tokens = TOKENS[:1, :T]
    g = model.global_embed(tokens).detach().requires_grad_(True)  # (1, T, e): what the global model reads
    loc = model.local_stack.embed(tokens).detach().requires_grad_(True)  # (1, T, d_local): the local model's
    h = model.hidden(g, loc)
    r = torch.randn(h.shape[-1], dtype=h.dtype, generator=torch.Generator().manual_seed(0))  # (a layer norm's sum is flat)
    for t in range(T):
        gg, gl = torch.autograd.grad(h[0, t] @ r, (g, loc), retain_graph=True)
        seen_g, seen_l = gg[0].abs().sum(-1) > 0, gl[0].abs().sum(-1) > 0
        k = t // P  # the global model reads inputs 1 .. kP for patch k; the local one kP .. t
        assert seen_g.tolist() == [1 <= j <= k * P for j in range(T)], t
        assert seen_l.tolist() == [k * P <= j <= t for j in range(T)], t


def test_changing_a_byte_changes_no_earlier_logits():
    model = model_for()
    want, _ = model(TOKENS)
    for j in (3, 4, 9):
        changed = TOKENS.clone()
        changed[:, j] = (changed[:, j] + 1) % V
        got, _ = model(changed)
        torch.testing.assert_close(got[:, :j], want[:, :j], rtol=0, atol=0)
        assert not torch.allclose(got[:, j], want[:, j])


@pytest.mark.parametrize("change, needle", [
    ({"model.context": 18}, "must divide"),
    ({"model.memory": {"kind": "xl", "mem_len": 8}}, "segment memory"),
    ({"model.exit": {"kind": "calm"}}, "CALM"),
    ({"model.attention": {"kind": "lsh"}}, "no KV cache"),
])
def test_refused_combinations(change, needle):
    raw = {"data": {"train": "x.txt"}, "tokenizer": {"kind": "byte"}, "model": {
        "d_model": 16, "n_layers": 2, "n_heads": 2, "context": 16, "position": {"kind": "rope"},
        "patches": {"size": P}}}
    for key, value in change.items():
        raw["model"][key.split(".")[1]] = value
    with pytest.raises(UsageError, match=needle):
        validate(raw)
    with pytest.raises(UsageError, match="decoder-only"):
        validate({"family": "classifier", "data": {"train": "x.tsv"}, "model": {"context": 16,
                  "patches": {"size": P}}})


def test_train_eval_generate_end_to_end(tmp_path, shakespeare):
    env = {"TFX_DATA": str(shakespeare)}
    out = tmp_path / "mb"
    run_tfx("train", str(REPO / "recipes/lm/shakespeare-char.toml"),
            *sets(*TINY, "tokenizer.kind=\"byte\"", "model.patches.size=4", "model.patches.local_d_model=16",
                  "train.steps=6", "train.eval_every=6"), "--out", str(out), env=env, check=True)
    ev = json.loads(tfx_in_process("eval", str(out), "--split", "valid", "--max-tokens", "256", "--json",
                                   env=env).stdout)
    assert ev["tokens"] == 256 and ev["bits_per_byte"] > 0
    text = run_tfx("generate", str(out), "ROMEO:", "--max-new-tokens", "40", "--seed", "1", check=True).stdout
    assert len(text) > 0
    proc = tfx_in_process("eval", str(out), "--split", "valid", "--stream-window", "8", env=env)
    assert proc.returncode == 2 and "MEGABYTE" in proc.stderr and "Traceback" not in proc.stderr
    proc = tfx_in_process("knn", "build", str(out), env=env)
    assert proc.returncode == 2 and "Megabyte" in proc.stderr and "Traceback" not in proc.stderr
