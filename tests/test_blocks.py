"""Block variants against their equations written out for a tiny block: post-norm ("Add & Norm",
Vaswani et al. 2017) and He & Hofmann's (2023) simplified parallel block with shaped attention."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tfx.config import import_kinds, validate
from tfx.errors import UsageError
from tfx.families import build_model
from tfx.nn.simplified import SimplifiedBlock

import_kinds()
V = 19


def lm(family: str = "lm", **model):
    cfg = {"d_model": 16, "n_layers": 2, "n_heads": 2, "context": 16, "position": {"kind": "rope"}, **model}
    data = {"train": "x.txt"} if family == "lm" else {"train": "x.tsv"}
    recipe = validate({"family": family, "data": data, "model": cfg})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=V).double().eval()


def shake(model) -> None:
    """Random queries and gains: the simplified block starts as a plain MLP, which would test little."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def heads(x, H):  # (B, T, H*D) -> (B, H, T, D)
    B, T, d = x.shape
    return x.view(B, T, H, d // H).transpose(1, 2)


def layer_norm(norm, x):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def test_post_norm_block_is_add_and_norm_after_each_sublayer():
    model = lm(norm_position="post", position={"kind": "none"})
    shake(model)
    block = model.stack.blocks[0]
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    # the equations: h = LN1(x + MHA(x)), y = LN2(h + W2 gelu(W1 h + b1) + b2)
    q, k, v = (heads(t, 2) for t in (x @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(16, -1))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    w = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf")).softmax(-1)
    mha = (w @ v).transpose(1, 2).reshape(2, 5, 16) @ block.attn.out.weight.T + block.attn.out.bias
    h = layer_norm(block.norm1, x + mha)
    ffn = F.gelu(h @ block.ffn.up.weight.T + block.ffn.up.bias) @ block.ffn.down.weight.T + block.ffn.down.bias
    expected = layer_norm(block.norm2, h + ffn)
    spec_pos = torch.arange(5)
    from tfx.nn.attention.base import AttnSpec

    out = block(x, pos=model.stack.pos, spec=AttnSpec(q_pos=spec_pos, k_pos=spec_pos, causal=True), q_pos=spec_pos)
    torch.testing.assert_close(out, expected)
    assert isinstance(model.stack.norm, torch.nn.Identity)  # no final norm after post-norm blocks
    assert isinstance(lm().stack.norm, torch.nn.LayerNorm)


def shaped_reference(block: SimplifiedBlock, x, *, causal: bool, real=None):
    """out = A h + beta_ff MLP(h), h = LN(x), A_n = alpha_n I + beta_n softmax(q_n k_n^T / sqrt(D)) - gamma_n C,
    C: even weights over the keys each query may see (causal prefix; real keys of a padded row)."""
    B, T, d = x.shape
    attn = block.attn
    H, D = attn.n_heads, attn.d_head
    h = layer_norm(block.norm1, x)
    q, k = (heads(t, H) for t in (h @ attn.qk.weight.T + attn.qk.bias).split(d, -1))
    v = heads(h, H)
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    if real is not None:
        allowed = allowed & real[:, None, None, :]
    soft = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf")).softmax(-1)
    even = allowed.double() / allowed.sum(-1, keepdim=True)
    eye = torch.eye(T, dtype=torch.float64)
    A = (attn.alpha.view(1, H, 1, 1) * eye + attn.beta.view(1, H, 1, 1) * soft - attn.gamma.view(1, H, 1, 1) * even)
    mixed = (A @ v).transpose(1, 2).reshape(B, T, d)
    mlp = F.gelu(h @ block.ffn.up.weight.T + block.ffn.up.bias) @ block.ffn.down.weight.T + block.ffn.down.bias
    return mixed + block.ffn_gain * mlp


def run_block(model, block, x, *, causal, real=None):
    from tfx.nn.attention.base import AttnSpec

    pos = torch.arange(x.shape[1])
    spec = AttnSpec(q_pos=pos, k_pos=pos, causal=causal, key_padding_mask=real)
    return block(x, pos=model.stack.pos if hasattr(model, "stack") else model.encoder.pos, spec=spec, q_pos=pos)


def test_the_simplified_block_is_shaped_attention_plus_the_scaled_mlp_with_no_skip():
    model = lm(block="simplified", position={"kind": "none"})
    shake(model)
    block = model.stack.blocks[1]
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(run_block(model, block, x, causal=True), shaped_reference(block, x, causal=True))
    assert not hasattr(block.attn, "out") and block.attn.qk.weight.shape == (32, 16)  # no value, no projection


def test_shaped_attention_centres_over_the_real_keys_of_a_padded_encoder():
    model = lm("mlm", block="simplified", position={"kind": "none"})
    shake(model)
    block = model.encoder.blocks[0]
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    real = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = run_block(model, block, x, causal=False, real=real)
    torch.testing.assert_close(out[:, :4], shaped_reference(block, x, causal=False, real=real)[:, :4])
    torch.testing.assert_close(out[0], shaped_reference(block, x, causal=False, real=real)[0])


def test_the_simplified_block_starts_as_the_identity_plus_a_tenth_of_the_mlp():
    model = lm(block="simplified")
    block = model.stack.blocks[0]
    assert torch.equal(block.attn.qk.weight[:16], torch.zeros(16, 16))  # W_Q = 0: softmax = C
    assert block.ffn_gain.item() == pytest.approx(0.1)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    h = layer_norm(block.norm1, x)
    torch.testing.assert_close(run_block(model, block, x, causal=True), h + 0.1 * block.ffn(h))


def test_every_gain_of_the_simplified_block_gets_a_gradient():
    model = lm(block="simplified").train()
    shake(model)
    logits, _ = model(torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(4)))
    logits.square().mean().backward()
    block = model.stack.blocks[0]
    for p in (block.attn.alpha, block.attn.beta, block.attn.gamma, block.ffn_gain, block.attn.qk.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("model", [{"norm_position": "post"}, {"block": "simplified"}])
def test_a_cached_decode_equals_the_full_forward(model):
    lm_ = lm(**model)
    shake(lm_)
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    full, _ = lm_(tokens)
    state = lm_.new_state(2, 16)
    parts = [lm_(tokens[:, :4], state)[0]] + [lm_(tokens[:, t:t + 1], state)[0] for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("recipe, reason", [
    ({"model": {"block": "simplified", "attention": {"kind": "linear"}}}, "not known to give a query of zeros"),
    ({"model": {"block": "simplified", "position": {"kind": "alibi"}}}, "changes the attention scores"),
    ({"model": {"block": "simplified", "n_kv_heads": 1}}, "has no value matrix"),
    ({"model": {"block": "simplified", "memory": {"kind": "xl", "mem_len": 8}}}, "segment memory"),
    ({"model": {"block": "simplified", "norm_position": "post"}}, "one norm before both branches"),
    ({"family": "seq2seq", "data": {"train": "x.tsv"}, "model": {"block": "simplified"}}, "no cross-attention"),
])
def test_recipes_the_simplified_block_cannot_serve_are_refused_with_the_reason(recipe, reason):
    recipe = {"data": {"train": "x.txt"}, **recipe}
    with pytest.raises(UsageError, match=reason):
        validate(recipe)
