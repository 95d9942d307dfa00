"""Every attention kind x position scheme in the full models: causality by gradient at every
position in the LM and the seq2seq decoder, KV-cache parity where the kind has a cache (the
seq2seq decoder with every position scheme it accepts), one training step with a gradient for
every parameter in every family (every kind and every position scheme the recipe check accepts
there, as a covering set rather than the full product: see step_combos), and the recipe check
refusing what cannot work."""
from __future__ import annotations

import json

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.errors import UsageError
from tfx.kinds import problems
from tfx.families import build_model, family_names
from tfx.registry import ATTENTION, POSITION

import_kinds()
V, T = 19, 14
FAMILIES = tuple(family_names())  # lm, seq2seq, classifier, mlm, vit, mim

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
    if family in ("vit", "mim"):  # 6 x 6 images, patches of 2: a 3 x 3 grid, mean pooling (window attention has no [CLS])
        cfg.update(patch=2, pool="mean")
    return validate({"family": family, "data": {"train": "x.txt"}, "model": cfg})


def accepted(kind: str, position: str, family: str) -> bool:
    """What `tfx recipe check` accepts (tfx.kinds.problems, through validate)."""
    try:
        recipe_for(kind, position, family)
    except UsageError as exc:
        assert "impossible combination" in str(exc), exc
        return False
    return True


def combos(family: str, need_cache: bool = False, positions: tuple[str, ...] | None = None):
    out = []
    for kind in ATTENTION.names():
        for position in positions or POSITION.names():
            if accepted(kind, position, family) and (ATTENTION.get(kind).supports_cache or not need_cache):
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


def probes(x: torch.Tensor) -> torch.Tensor:
    """The batch repeated once per position: copy t of the batch probes position t."""
    return x.repeat(T, *([1] * (x.dim() - 1)))


def assert_causal(out, emb):
    """d out[t] / d x[t+1:] == 0 at every position t, in one backward pass: the inputs are
    `probes(batch)` and the sequences of copy t (independent of the others) differentiate out[t]."""
    B = out.shape[0] // T
    picked = out.view(T, B, T, -1)[torch.arange(T), :, torch.arange(T)]  # (T, B, V): copy t, position t
    (grad,) = torch.autograd.grad(picked.sum(), emb)
    grad = grad.view(T, B, T, -1)
    for t in range(T):
        assert grad[t, :, t + 1:].abs().sum() == 0, f"position {t} sees the future"
        assert grad[t, :, : t + 1].abs().sum() > 0


TOKENS = torch.randint(4, V, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind, position", combos("lm"))
def test_lm_causality_by_gradient(kind, position):
    model = model_for(kind, position).float()  # exact zeros do not need float64
    tokens = probes(TOKENS[:1])
    emb = feed_leaf(model.stack, tokens)
    assert_causal(model(tokens)[0], emb)


@pytest.mark.parametrize("kind, position", combos("seq2seq"))
def test_seq2seq_decoder_causality_by_gradient(kind, position):
    model = model_for(kind, position, "seq2seq").float()  # exact zeros do not need float64
    src = TOKENS[1:, :9]
    mask = torch.tensor([[True] * 6 + [False] * 3])  # a padded source
    memory = model.encode(src, mask)  # before the patch: the embedding table is shared
    emb = feed_leaf(model.decoder, probes(TOKENS[1:]))
    h, _ = model.decoder(probes(TOKENS[1:]), source=probes(memory), source_mask=probes(mask))
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


# the decoder's self-attention is the LM's code path: every cache-capable kind x every position
# scheme the recipe check accepts for a seq2seq model
@pytest.mark.parametrize("kind, position", combos("seq2seq", need_cache=True))
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
    if family == "vit":
        return {"image": torch.randn(2, 1, 6, 6, generator=g), "label": torch.tensor([0, 1])}
    if family == "mim":
        return {"image": torch.randn(2, 1, 6, 6, generator=g), "masked": torch.rand(2, 9, generator=g) < 0.5}
    tokens = torch.randint(4, V, (2, 10), generator=g)
    mask = torch.tensor([[True] * 10, [True] * 7 + [False] * 3])
    if family == "lm":
        return {"input": tokens[:, :-1], "target": tokens[:, 1:]}
    if family == "seq2seq":
        return {"src": tokens, "src_mask": mask, "tgt_in": tokens[:, :-1], "tgt_out": tokens[:, 1:]}
    if family == "mlm":
        return {"input": tokens, "mask": mask, "target": torch.where(mask, tokens, -100)}
    return {"input": tokens, "mask": mask, "label": torch.tensor([0, 1])}


def no_gradient_expected(name: str, kind: str, position: str, family: str) -> bool:
    """Parameters that rightly get no gradient from the first step."""
    # DA's scale (1 + e^v) / (1 + e^(v - w·distance)) is 1 for every v while w = 0, its start
    # (test_positions.py::test_da_starts_as_plain_relu_attention): v learns once w has moved.
    return position == "da" and name.endswith("pos.v")


def step_combos():
    """Every kind and every position scheme in every family, as a covering set: each kind once
    per family with a position not yet covered there (the first one it accepts), then dense with
    each position still missing. The full cross product (~300 steps) is too slow for the suite."""
    out = []
    for family in FAMILIES:
        missing = list(POSITION.names())
        for kind in ATTENTION.names():
            fits = [p for p in missing + POSITION.names() if accepted(kind, p, family)]
            if fits:
                out.append((kind, fits[0], family))
                missing = [p for p in missing if p != fits[0]]
        out += [("dense", p, family) for p in missing if accepted("dense", p, family)]
    return out


@pytest.mark.parametrize("kind, position, family",
                         [pytest.param(*c, id="-".join(c)) for c in step_combos()])
def test_every_kind_and_position_takes_a_training_step_in_every_family(kind, position, family, tmp_path):
    recipe = recipe_for(kind, position, family)
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b"]))
    if family in ("vit", "mim"):  # the image "tokenizer": size and channels
        from tfx.data.image_codec import ImageCodec, ImageConfig

        ImageCodec(ImageConfig(), height=6, width=6, channels=1, mean=[0.0], std=[1.0]).save(tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=V, run_dir=tmp_path).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _, _ = model.loss(batch_for(family))
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters()
               if (p.grad is None or p.grad.abs().sum() == 0) and not no_gradient_expected(n, kind, position, family)]
    assert not no_grad, f"no gradient reaches {no_grad}"
    opt.step()
    unchanged = [n for n, p in model.named_parameters()
                 if torch.equal(before[n], p) and not no_gradient_expected(n, kind, position, family)]
    assert not unchanged, f"the step leaves {unchanged} as they were"


def test_every_kind_and_every_position_is_accepted_somewhere():
    """The step test above is not vacuous: each family, kind and position appears in it."""
    params = step_combos()
    assert {f for _, _, f in params} == set(FAMILIES)
    assert {k for k, _, _ in params} == set(ATTENTION.names())
    assert {p for _, p, _ in params} == set(POSITION.names())


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
