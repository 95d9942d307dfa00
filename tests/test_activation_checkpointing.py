"""train.activation_checkpointing: each block's activations are recomputed in the backward pass, and
training is unchanged by it (the same loss and the same gradients, with dropout, in every family and
memory kind); kernels that change their own state as they run are refused."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, TINY, run_tfx, sets, tfx_in_process
from tfx.config import import_kinds, validate
from tfx.errors import UsageError
from tfx.families import build_model
from tfx.models.lm import IGNORE
from tfx.nn.attention.base import aux_losses
from tfx.nn.layers import Block
from tfx.nn.stack import set_activation_checkpointing

import_kinds()
VOCAB, B, T = 13, 3, 12
MODEL = {"d_model": 16, "n_layers": 2, "n_heads": 2, "context": 16, "dropout": 0.2, "attn_dropout": 0.1}


def recipe_for(family: str, tmp_path, **model):
    (tmp_path / "labels.json").write_text('["neg", "pos", "mixed"]')  # the classifier reads its labels here
    return validate({"family": family, "data": {"train": "x.txt"}, "train": {"label_smoothing": 0.1},
                     "model": {**MODEL, "position": {"kind": "rope"}, **model}})


def batches(family: str) -> list[dict]:
    """Two batches in the family's training format, with padding where the family has it."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        tokens = torch.randint(3, VOCAB, (B, T + 1), generator=g)
        mask = torch.arange(T)[None, :] < torch.tensor([T, T - 3, 5])[:, None]  # (B, T) True = real token
        if family == "lm":
            out.append({"input": tokens[:, :-1], "target": tokens[:, 1:]})
        elif family == "seq2seq":
            tgt = torch.randint(3, VOCAB, (B, T + 1), generator=g)
            out.append({"src": tokens[:, :-1], "src_mask": mask, "tgt_in": tgt[:, :-1],
                        "tgt_out": tgt[:, 1:].masked_fill(~mask, IGNORE)})
        elif family == "classifier":
            out.append({"input": tokens[:, :-1], "mask": mask, "label": torch.tensor([0, 2, 1])})
        else:  # mlm: every third real token predicted
            picked = mask & (torch.arange(T) % 3 == 0)
            out.append({"input": tokens[:, :-1], "mask": mask, "target": tokens[:, :-1].masked_fill(~picked, IGNORE)})
    return out


def train_twice(recipe, tmp_path, family: str, on: bool, segments: int = 2) -> tuple[list, list, dict]:
    """Losses and gradients of `segments` forward + backward passes (a memory carried through them,
    no optimizer step) from the same initial weights and RNG, and how often each stack's blocks ran."""
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=VOCAB, run_dir=tmp_path).train()
    n_stacks = set_activation_checkpointing(model, on)
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, Block):
            module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    torch.manual_seed(1)  # the dropout masks
    losses, grads, state = [], [], None
    for batch in batches(family)[:segments]:
        loss, parts, state = model.loss(batch, state)
        total = loss / 10 + sum(a for a in (aux_losses(model), parts.get("aux_loss")) if a is not None)
        total.backward()
        losses.append(total.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    return losses, grads, {"calls": calls, "stacks": n_stacks, "state": state}


def assert_same_training(recipe, tmp_path, family: str) -> dict:
    off_losses, off_grads, off = train_twice(recipe, tmp_path, family, False)
    on_losses, on_grads, on = train_twice(recipe, tmp_path, family, True)
    torch.testing.assert_close(on_losses, off_losses, rtol=0, atol=0)
    for a, b in zip(on_grads, off_grads):
        assert a.keys() == b.keys() and len(a) > 10
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return {"off": off, "on": on}


@pytest.mark.parametrize("family", ["lm", "seq2seq", "classifier", "mlm"])
def test_every_family_gets_the_same_loss_and_gradients_and_really_recomputes(family, tmp_path):
    """Exactly equal losses and every parameter's gradient over two steps with dropout; every block
    (encoder and decoder) runs twice per step with checkpointing, once without."""
    runs = assert_same_training(recipe_for(family, tmp_path), tmp_path, family)
    expected_stacks = 2 if family == "seq2seq" else 1
    assert runs["on"]["stacks"] == runs["off"]["stacks"] == expected_stacks
    blocks = expected_stacks * MODEL["n_layers"]
    assert len(runs["off"]["calls"]) == blocks and set(runs["off"]["calls"].values()) == {2}  # 2 steps x 1
    assert runs["on"]["calls"].keys() == runs["off"]["calls"].keys() and set(runs["on"]["calls"].values()) == {4}


def test_no_recomputation_without_gradients_or_in_eval(tmp_path):
    recipe = recipe_for("lm", tmp_path)
    model = build_model(recipe, vocab_size=VOCAB)
    set_activation_checkpointing(model, True)
    calls = []
    model.stack.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    batch = batches("lm")[0]
    model.eval()
    model.loss(batch)[0].backward()
    model.train()
    with torch.no_grad():
        model.loss(batch)
    assert len(calls) == 2
    assert set_activation_checkpointing(model, False) == 1 and not model.stack.activation_checkpointing


MEMORIES = {
    "xl": {"mem_len": 8},
    "compressive-conv": {"kind": "compressive", "mem_len": 4, "cmem_len": 4, "rate": 2, "compression": "conv"},
    "compressive-most_used": {"kind": "compressive", "mem_len": 4, "cmem_len": 4, "rate": 2,
                              "compression": "most_used"},
    "memorizing": {"size": 16, "top_k": 4, "mem_len": 4},
    "rmt": {"tokens": 2, "segments": 2},
}


@pytest.mark.parametrize("name", sorted(MEMORIES))
def test_memory_kinds_get_the_same_loss_gradients_and_carried_memory(name, tmp_path):
    """Two consecutive segments, the memory (and its reconstruction loss) carried between them: the
    same losses, gradients and final memory state. Memorizing's kNN layer writes its store as it
    runs, so that one block is not recomputed (3 block calls per segment of 2 layers, not 4)."""
    memory = {"kind": name, **MEMORIES[name]}
    recipe = recipe_for("lm", tmp_path, memory=memory, dropout=0.1)
    runs = assert_same_training(recipe, tmp_path, "lm")
    on, off = runs["on"]["state"].memory, runs["off"]["state"].memory
    torch.testing.assert_close(on.save(), off.save(), rtol=0, atol=0)
    assert on.save(), "the memory carried something"
    # block calls over the 2 segments: twice each; memorizing's kNN layer (-2 of 2: block 0) once;
    # rmt reads each segment in 2 pieces
    expected = {"memorizing": [2, 4], "rmt": [8, 8]}.get(name, [4, 4])
    expected = {f"stack.blocks.{i}": n for i, n in enumerate(expected)}
    assert runs["on"]["calls"] == expected


@pytest.mark.parametrize("attention", [{"kind": "local", "window": 4, "adaptive_span": True},
                                       {"kind": "dense", "adaptive_span": True},
                                       {"kind": "lsh", "chunk": 4}, {"kind": "performer"}])
def test_kernels_with_random_draws_or_penalties_get_the_same_training(attention, tmp_path):
    """lsh draws new rotations in every training forward (restored RNG: the same ones again);
    adaptive span clamps its parameter in place and adds a penalty; performer without redraw."""
    recipe = recipe_for("lm", tmp_path, attention=attention)
    runs = assert_same_training(recipe, tmp_path, "lm")
    assert set(runs["on"]["calls"].values()) == {4}


@pytest.mark.parametrize("attention, reason", [
    ({"kind": "routing"}, "'routing' attention moves its k-means centroids in every training forward"),
    ({"kind": "performer", "redraw": 3}, "'performer' with redraw > 0 counts its training forwards"),
])
def test_kernels_that_change_their_own_state_are_refused(attention, reason, tmp_path):
    model = build_model(recipe_for("lm", tmp_path, attention=attention), vocab_size=VOCAB)
    with pytest.raises(UsageError, match=rf"^train.activation_checkpointing: {reason}.*; or turn it off$"):
        set_activation_checkpointing(model, True)
    assert set_activation_checkpointing(model, False) == 1


def test_train_refuses_a_routing_model_before_training_exit_2(tmp_path):
    text, recipe, out = tmp_path / "t.txt", tmp_path / "r.toml", tmp_path / "run"
    text.write_text("to be or not to be, that is the question\n" * 50)
    recipe.write_text(f'[data]\ntrain = {json.dumps(str(text))}\n[tokenizer]\nkind = "char"\n'
                      '[model.attention]\nkind = "routing"\n[train]\nactivation_checkpointing = true\n'
                      '[train.schedule]\nkind = "cosine"\n')
    proc = tfx_in_process("train", str(recipe), *sets(*TINY), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "train.activation_checkpointing: 'routing' attention moves its k-means centroids" in proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "state").exists()


def test_cli_training_losses_equal_with_and_without_checkpointing(tmp_path, shakespeare):
    """`tfx train` end to end, 3 steps with dropout: metrics.jsonl's losses are the same."""
    losses = []
    for on in ("false", "true"):
        out = tmp_path / on
        run_tfx("train", str(REPO / "recipes/lm/shakespeare-char.toml"),
                *sets(*TINY, "train.steps=3", "train.eval_every=0", "train.eval_tokens=256", "model.dropout=0.2",
                      f"train.activation_checkpointing={on}"),
                "--out", str(out), env={"TFX_DATA": str(shakespeare)}, check=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses.append([(r["step"], r["loss"]) for r in rows if "split" not in r])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
