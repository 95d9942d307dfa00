"""The decoder-only LM: causality by gradient and KV-cache parity for every position scheme."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.families import build_model
from tfx.kinds import works_with
from tfx.registry import ATTENTION, POSITION

import_kinds()
V = 23


def model_for(position: str, **model):
    cfg = {"d_model": 32, "n_layers": 2, "n_heads": 4, "context": 16, "position": {"kind": position}, **model}
    recipe = validate({"data": {"train": "x.txt"}, "model": cfg})
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=V).double().eval()
    if recipe.model.block == "simplified":
        with torch.no_grad():  # it starts with zero queries (softmax = C): give it some to test
            for block in model.stack.blocks:
                block.attn.qk.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(7))
    if model.stack.depth is not None:
        with torch.no_grad():  # positions that halt at different steps
            model.stack.depth.halt.weight.normal_(0, 20.0, generator=torch.Generator().manual_seed(8))
            model.stack.depth.halt.bias.fill_(0.5)
    return model


SCHEMES = [p for p in POSITION.names() if not POSITION.get(p).images_only]  # the 2-D ones: tests/test_vit.py
VARIANTS = {
    "mha-layernorm-gelu": {},
    "gqa-rmsnorm-swiglu": {"n_kv_heads": 2, "norm": "rmsnorm", "ffn": "swiglu", "bias": False},
    "mqa-relu-untied": {"n_kv_heads": 1, "ffn": "relu", "tie_embeddings": False},
    "dwconv": {"ffn": "dwconv"},  # a causal 3-tap depthwise conv in the FFN: generation recomputes the prefix
    "post-norm": {"norm_position": "post"},
    "simplified": {"block": "simplified"},  # shaped attention: schemes without a score bias only
    "universal-act": {"depth": {"kind": "universal", "max_steps": 3}},  # shared blocks, halting per position
    "reversible-chunked": {"reversible": True, "ffn_chunks": 3},  # two streams; schemes without weights in attention
    "per-layer-kinds": {"attention": {"kind": "local", "window": 4, "per_layer": {"kind": ["local", "dense"],
                                                                                  "window": [3, ""]}}},
}


def scheme_fits(position: str, variant: str) -> bool:
    pos = POSITION.get(position)
    if variant == "reversible-chunked":
        return not pos.learns_in_attention
    if variant == "per-layer-kinds":
        return works_with(ATTENTION.get("local"), pos)
    return variant != "simplified" or not (pos.uses_bias or pos.needs_score_mods)


CASES = [(p, v) for v in VARIANTS for p in SCHEMES if scheme_fits(p, v)]


def test_every_scheme_is_covered():
    assert set(SCHEMES) >= {"none", "sinusoidal", "learned", "rope", "alibi"}


@pytest.mark.parametrize("position, variant", CASES)
def test_causality_by_gradient(position, variant):
    """d logits[t] / d embedding[t'] is zero for every t' > t."""
    model = model_for(position, **VARIANTS[variant])
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    emb = model.stack.embed(tokens).detach().requires_grad_(True)
    model.stack.embed.forward = lambda _: emb  # feed the leaf tensor through the normal path
    logits, _ = model(tokens)
    for t in (0, 5, 10):
        (grad,) = torch.autograd.grad(logits[:, t].sum(), emb, retain_graph=True)
        assert grad[:, t + 1:].abs().max() == 0, f"position {t} sees the future"
        assert grad[:, : t + 1].abs().sum() > 0


@pytest.mark.parametrize("position, variant", CASES)
def test_kv_cache_parity(position, variant):
    """Prefill + token-by-token logits equal one full forward."""
    model = model_for(position, **VARIANTS[variant])
    tokens = torch.randint(0, V, (2, 14), generator=torch.Generator().manual_seed(2))
    full, _ = model(tokens)
    state = model.new_state(2, 16)
    parts = [model(tokens[:, :5], state)[0]]
    for t in range(5, 14):
        parts.append(model(tokens[:, t:t + 1], state)[0])
    assert state.length == 14
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_cache_reorder_and_crop():
    model = model_for("rope")
    tokens = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(3))
    state = model.new_state(3, 16)
    model(tokens, state)
    state.reorder(torch.tensor([2, 2, 0]))
    state.crop(4)
    out, _ = model(tokens[[2, 2, 0], 4:5], state)
    ref, _ = model(tokens[[2, 2, 0], :5])
    torch.testing.assert_close(out[:, 0], ref[:, 4], rtol=1e-10, atol=1e-10)


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = model_for("rope")
    assert tied.head.weight is tied.stack.embed.weight
    untied = model_for("rope", tie_embeddings=False)
    assert untied.head.weight is not untied.stack.embed.weight


def test_gpt2_init_scales_residual_projections():
    model = model_for("learned", n_layers=8, d_model=64)
    std_out = model.stack.blocks[0].attn.out.weight.std().item()
    std_qkv = model.stack.blocks[0].attn.qkv.weight.std().item()
    assert abs(std_qkv - 0.02) < 0.003
    assert abs(std_out - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)


def test_sinusoidal_positions_do_not_drown_the_tokens():
    """At init the token part of the input must not be tiny next to the position table (Vaswani et al.
    scale embeddings by sqrt(d_model)); unscaled, tokens were 3% of the signal and MT stalled."""
    model = model_for("sinusoidal", d_model=256, n_heads=4).float()
    tokens = torch.randint(0, V, (1, 16))
    pos = torch.arange(16)
    with torch.no_grad():
        emb = model.stack.embed(tokens)
        both = model.stack.pos.embed(emb, pos)
        table = model.stack.pos.embed(torch.zeros_like(emb), pos)
    token_part = (both - table).pow(2).mean().sqrt()
    assert token_part / table.pow(2).mean().sqrt() > 0.3
