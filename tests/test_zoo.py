"""Every attention kind x position scheme in the full models: causality by gradient in the LM and
the seq2seq decoder, KV-cache parity where the kind has a cache, one training step in every
family, and the recipe check refusing what cannot work."""
from __future__ import annotations

import json

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.errors import UsageError
from tfx.kinds import STACKS, problems, works_with
from tfx.models import build_model
from tfx.registry import ATTENTION, POSITION

import_kinds()
V, T = 19, 14

# small settings so that a 14-token sequence crosses every part of each kind's pattern
PARAMS: dict[str, dict] = {
    "local": {"window": 3},
    "strided": {"stride": 3},
    "fixed": {"block": 4, "summary": 1},
    "blockwise": {"n_blocks": 4, "shifts": [0, 1]},
    "longformer": {"window": 2, "dilation": [1, 2], "global_tokens": [0, 9]},
    "bigbird": {"block": 2, "window_blocks": 3, "global_blocks": 1, "random_blocks": 1, "random_from": "past"},
    "lsh": {"chunk": 4, "n_hashes": 2},
    "routing": {"n_clusters": 2},
    "performer": {"features": 16},
    "linformer": {"k": 8},
}


def recipe_for(kind: str, position: str, family: str = "lm", **model):
    cfg = {"d_model": 16, "n_layers": 2, "n_heads": 2, "context": 16, "dropout": 0.0,
           "attention": {"kind": kind, **PARAMS.get(kind, {})}, "position": {"kind": position}, **model}
    if family == "seq2seq":
        del cfg["n_layers"]
        cfg.update(encoder_layers=1, decoder_layers=2)
    return validate({"family": family, "data": {"train": "x.txt"}, "model": cfg})


def combos(family: str, need_cache: bool = False, positions: tuple[str, ...] | None = None):
    out = []
    for kind in ATTENTION.names():
        cls = ATTENTION.get(kind)
        for position in positions or POSITION.names():
            ok = works_with(cls, POSITION.get(position)) and all(
                (cls.supports_causal if causal else cls.supports_bidirectional) for _, causal, _ in STACKS[family])
            if ok and (cls.supports_cache or not need_cache):
                out.append(pytest.param(kind, position, id=f"{kind}-{position}"))
    return out


def model_for(kind, position, family="lm", **model):
    torch.manual_seed(0)
    return build_model(recipe_for(kind, position, family, **model), vocab_size=V).double().eval()


def feed_leaf(stack, tokens):
    """Make the embedding output a leaf we can differentiate against."""
    emb = stack.embed(tokens).detach().requires_grad_(True)
    stack.embed.forward = lambda _: emb
    return emb


def assert_causal(out, emb):
    for t in (0, 6, T - 2):
        (grad,) = torch.autograd.grad(out[:, t].sum(), emb, retain_graph=True)
        assert grad[:, t + 1:].abs().max() == 0, f"position {t} sees the future"
        assert grad[:, : t + 1].abs().sum() > 0


TOKENS = torch.randint(4, V, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind, position", combos("lm"))
def test_lm_causality_by_gradient(kind, position):
    model = model_for(kind, position)
    emb = feed_leaf(model.stack, TOKENS)
    assert_causal(model(TOKENS)[0], emb)


@pytest.mark.parametrize("kind, position", combos("seq2seq"))
def test_seq2seq_decoder_causality_by_gradient(kind, position):
    model = model_for(kind, position, "seq2seq")
    src = TOKENS[:, :9]
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    memory = model.encode(src, mask)  # before the patch: the embedding table is shared
    emb = feed_leaf(model.decoder, TOKENS)
    h, _ = model.decoder(TOKENS, source=memory, source_mask=mask)
    assert_causal(model.head(h), emb)


@pytest.mark.parametrize("kind, position", combos("lm", need_cache=True))
def test_lm_cache_parity(kind, position):
    """Prefill + token-by-token logits equal one full forward, for every cache-capable kind."""
    model = model_for(kind, position)
    full, _ = model(TOKENS)
    state = model.new_state(2, 16)
    parts = [model(TOKENS[:, :5], state)[0]] + [model(TOKENS[:, t:t + 1], state)[0] for t in range(5, T)]
    assert state.length == T
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)


# the decoder's self-attention is the LM's code path: every kind, three kinds of position hook
@pytest.mark.parametrize("kind, position", combos("seq2seq", need_cache=True, positions=("rope", "alibi", "xl")))
def test_seq2seq_cache_parity(kind, position):
    model = model_for(kind, position, "seq2seq")
    src, mask = TOKENS[:, :9], torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    memory = model.encode(src, mask)
    full = model.head(model.decoder(TOKENS, source=memory, source_mask=mask)[0])
    state = model.new_state(memory, mask, 16)
    parts = [model(TOKENS[:, :4], state)[0]] + [model(TOKENS[:, t:t + 1], state)[0] for t in range(4, T)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)


def batch_for(family: str) -> dict:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, V, (2, 10), generator=g)
    mask = torch.tensor([[True] * 10, [True] * 7 + [False] * 3])
    if family == "lm":
        return {"input": tokens[:, :-1], "target": tokens[:, 1:]}
    if family == "seq2seq":
        return {"src": tokens, "src_mask": mask, "tgt_in": tokens[:, :-1], "tgt_out": tokens[:, 1:]}
    if family == "mlm":
        return {"input": tokens, "mask": mask, "target": torch.where(mask, tokens, -100)}
    return {"input": tokens, "mask": mask, "label": torch.tensor([0, 1])}


@pytest.mark.parametrize("family", list(STACKS))
@pytest.mark.parametrize("kind", ATTENTION.names())
def test_every_kind_takes_a_training_step_in_every_family(kind, family, tmp_path):
    position = "rope"
    try:
        recipe = recipe_for(kind, position, family)
    except UsageError as exc:
        assert "impossible combination" in str(exc)
        cls = ATTENTION.get(kind)
        assert not (cls.supports_causal and cls.supports_bidirectional and cls.supports_padding)
        return
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b"]))
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=V, run_dir=tmp_path).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _, _ = model.loss(batch_for(family))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_the_recipe_check_gives_the_reason():
    class Fake:  # a bidirectional-only kernel with no bias, like linformer
        supports_causal = False
        supports_bidirectional = supports_padding = True
        supports_bias = supports_score_mods = supports_cache = False

    recipe = recipe_for("dense", "alibi")
    ATTENTION._entries["fake-bidir"] = (Fake, ATTENTION.config_model("dense"))
    try:
        recipe.model.attention.__dict__["kind"] = "fake-bidir"
        found = problems(recipe)
    finally:
        del ATTENTION._entries["fake-bidir"]
    assert any("cannot be causal" in p for p in found)
    assert any("'alibi' adds a bias" in p for p in found)


def test_cli_refuses_a_bidirectional_only_kind_in_a_decoder_and_prints_the_matrix(tmp_path):
    from conftest import tfx_in_process

    text = tmp_path / "t.txt"
    text.write_text("some text\n" * 50)
    proc = tfx_in_process("train", "recipes/lm/shakespeare-char.toml", "--set", f"data.train={text}",
                   "--set", "data.corpus=''", "--set", "model.attention.kind=linformer", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stderr
    assert "'linformer' cannot be causal" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
    matrix = json.loads(tfx_in_process("recipe", "kinds", "--json").stdout)
    rows = {r["kind"]: r for r in matrix["attention"]}
    assert set(rows) == set(ATTENTION.names())
    assert rows["linformer"]["causal"] is False and "alibi" not in rows["linear"]["positions"]
    assert "shaw" in rows["dense"]["positions"] and "shaw" not in rows["local"]["positions"]
