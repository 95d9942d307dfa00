"""Marian (Junczys-Dowmunt et al., 2018; the opus-mt translation models, HF MarianMTModel) <-> a tfx seq2seq:
post-norm layers with biases, sinusoidal positions (all sines, then all cosines: layout "halves")
added to embeddings scaled by sqrt(d_model), one embedding matrix for the source, the target and
the output layer (a joint vocabulary, tied).

HF keeps q, k and v as three nn.Linear; tfx's self-attention has one qkv Linear whose rows are
[q; k; v] (heads contiguous in each) and its cross-attention a q and a kv = [k; v]. transformers 5.x
saves the tied matrix once (model.shared.weight) and no position table (it is computed); older
saves also hold encoder/decoder.embed_tokens, lm_head and embed_positions, accepted where they
equal the shared matrix and the sinusoid. The output layer's bias (final_logits_bias, a buffer, where
real opus-mt models carry Marian's trained output bias) is tfx's model.head_bias; all zeros: none.
"""
from __future__ import annotations

import torch

from tfx.convert import Imported
from tfx.convert.common import give_pairs, need, plain_problems, refuse_unless, take, take_pairs

NAME = "marian"
MODEL_TYPES = ("marian",)
FAMILIES = {"seq2seq": "MarianMTModel"}  # tfx family -> HF architecture
ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
EXPORT_ACTIVATION = {"silu": "swish", "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
BASE = 10000.0  # HF's MarianSinusoidalPositionalEmbedding: frequencies 10000^(-2i/d)
EPS = 1e-5  # HF's Marian LayerNorms: nn.LayerNorm's default, no config key
TABLE_TOL = 1e-6
# (tfx name in a block, HF name in a layer) of the plain Linear and LayerNorm pairs; qkv and kv are fused
ENCODER = [("attn.out", "self_attn.out_proj"), ("norm1", "self_attn_layer_norm"), ("ffn.up", "fc1"),
           ("ffn.down", "fc2"), ("norm2", "final_layer_norm")]
DECODER = ENCODER + [("cross.q", "encoder_attn.q_proj"), ("cross.out", "encoder_attn.out_proj"),
                     ("norm_cross", "encoder_attn_layer_norm")]
FUSED = {"encoder": [("attn.qkv", "self_attn", ("q", "k", "v"))],
         "decoder": [("attn.qkv", "self_attn", ("q", "k", "v")), ("cross.kv", "encoder_attn", ("k", "v"))]}


def sinusoid(n: int, d: int) -> torch.Tensor:
    """(n, d) Marian's position table, computed in float64: sin(p * 10000^(-2i/d)) in the first d/2
    features, cos in the last d/2 (tfx's sinusoidal layout "halves")."""
    inv = BASE ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def refuse_settings(c: dict) -> None:
    """Refuse the config settings of Marian-family models that tfx's post-norm seq2seq does not express."""
    act = c.get("activation_function", "gelu")
    refuse_unless(act in ACTIVATIONS, NAME, f"activation_function {act!r}")
    # keys of the BART-era MarianConfig that transformers 5.x no longer reads: weights made for a
    # pre-norm stack or an embedding norm would run as the plain post-norm model there too
    refuse_unless(not c.get("normalize_before", False), NAME,
                  "normalize_before = true (pre-norm layers with a final norm per stack)")
    refuse_unless(not (c.get("normalize_embedding", False) or c.get("layernorm_embedding", False)), NAME,
                  "a layernorm_embedding (a norm over the embeddings)")
    refuse_unless(not c.get("add_final_layer_norm", False), NAME, "add_final_layer_norm")
    refuse_unless(c.get("static_position_embeddings", True), NAME,
                  "static_position_embeddings = false (learned positions)")
    refuse_unless(c.get("scale_embedding", False), NAME,
                  "scale_embedding = false (tfx's sinusoidal positions scale the embeddings by sqrt(d_model))")
    refuse_unless(c.get("share_encoder_decoder_embeddings", True), NAME,
                  "share_encoder_decoder_embeddings = false (separate source and target vocabularies; "
                  "an import has one tokenizer)")


def stored_extras(tensors: dict, used: set[str], state: dict, *, prefix: str, context: int, d: int,
                  vocab: int) -> tuple[set[str], bool]:
    """(tensors to ignore, whether there is a head bias): stored position tables must be Marian's
    sinusoid (tfx computes it); a nonzero final_logits_bias becomes state["head.bias"]."""
    ignored: set[str] = set()
    for side in ("encoder", "decoder"):  # a stored position table must be Marian's sinusoid (tfx computes it)
        name = f"{prefix}{side}.embed_positions.weight"
        if name in tensors:
            table = tensors[name]
            refuse_unless(tuple(table.shape) == (context, d), NAME,
                          f"{name} is {tuple(table.shape)}, not (max_position_embeddings, d_model)")
            gap = (table.double() - sinusoid(context, d)).abs().max().item()
            refuse_unless(gap <= TABLE_TOL, NAME, f"{name} is not the sinusoid (off by up to {gap:.3g})")
            ignored.add(name)
    head_bias = "final_logits_bias" in tensors and bool(tensors["final_logits_bias"].any())
    if head_bias:  # trained (opus-mt models have one): the output layer's bias (model.head_bias)
        bias = take(tensors, used, "final_logits_bias")
        refuse_unless(tuple(bias.shape) == (1, vocab), NAME, f"final_logits_bias is {tuple(bias.shape)}")
        state["head.bias"] = bias[0]
    elif "final_logits_bias" in tensors:
        ignored.add("final_logits_bias")  # zeros: no bias

    return ignored, head_bias


def to_tfx(config: dict, tensors: dict, family: str | None, hf_dir=None) -> Imported:
    c = dict(config)
    refuse_settings(c)
    act = c.get("activation_function", "gelu")
    d = need(c, "d_model", arch=NAME)
    refuse_unless(d % 2 == 0, NAME, f"an odd d_model ({d}): Marian's table then has one more sine than tfx's")
    heads = need(c, "encoder_attention_heads", 16, arch=NAME)
    refuse_unless(need(c, "decoder_attention_heads", 16, arch=NAME) == heads, NAME,
                  "decoder_attention_heads != encoder_attention_heads")
    d_ff = need(c, "encoder_ffn_dim", 4096, arch=NAME)
    refuse_unless(need(c, "decoder_ffn_dim", 4096, arch=NAME) == d_ff, NAME, "decoder_ffn_dim != encoder_ffn_dim")
    n_enc, n_dec = need(c, "encoder_layers", 12, arch=NAME), need(c, "decoder_layers", 12, arch=NAME)
    context = need(c, "max_position_embeddings", 1024, arch=NAME)
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        return take(tensors, used, prefix + name)

    # the one tied matrix: model.shared (transformers 5.x stores only it), and any copies of it
    names = [prefix + n for n in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")] \
        + ["lm_head.weight"]
    stored = [n for n in names if n in tensors]
    refuse_unless(bool(stored), NAME, "no shared.weight (no token embeddings)")
    embed = take(tensors, used, stored[0])
    for n in stored[1:]:
        refuse_unless(torch.equal(take(tensors, used, n), embed), NAME,
                      f"{n} unlike {stored[0]} (separate embedding or output matrices)")
    refuse_unless(c.get("tie_word_embeddings", True) or "lm_head.weight" in stored, NAME,
                  "tie_word_embeddings = false with no lm_head.weight")
    vocab = embed.shape[0]
    refuse_unless(c.get("decoder_vocab_size") in (None, vocab), NAME,
                  f"decoder_vocab_size {c.get('decoder_vocab_size')} != the {vocab} rows of the shared embeddings")

    state = {"encoder.embed.weight": embed, "decoder.embed.weight": embed, "head.weight": embed}
    for side, n_layers, pairs in (("encoder", n_enc, ENCODER), ("decoder", n_dec, DECODER)):
        for i in range(n_layers):
            ours, theirs = f"{side}.blocks.{i}.", f"{side}.layers.{i}."
            state.update(take_pairs(tensors, used, [(ours + t, prefix + theirs + h) for t, h in pairs]))
            for t, h, parts in FUSED[side]:
                for p in ("weight", "bias"):
                    state[f"{ours}{t}.{p}"] = torch.cat([get(f"{theirs}{h}.{x}_proj.{p}") for x in parts])

    ignored, head_bias = stored_extras(tensors, used, state, prefix=prefix, context=context, d=d, vocab=vocab)

    model = {"d_model": d, "n_heads": heads, "d_ff": d_ff, "context": context, "n_layers": n_enc,
             "encoder_layers": n_enc, "decoder_layers": n_dec, "norm": "layernorm", "norm_eps": EPS,
             "norm_position": "post", "ffn": ACTIVATIONS[act], "bias": True, "tie_embeddings": True,
             "position": {"kind": "sinusoidal", "layout": "halves", "base": BASE}, "attention": {"kind": "dense"},
             "head_bias": head_bias}
    return Imported(family="seq2seq", model=model, state=state, used=used, vocab_size=vocab, ignored=ignored)


def export_problems(recipe) -> list[str]:
    m = recipe.model
    problems = plain_problems(m, position="sinusoidal", full_heads=True, norm="layernorm", norm_position="post",
                              bias=True, embed_norm=False, tie_embeddings=True)
    if recipe.src_tokenizer is not None:
        problems.append("a separate source vocabulary (src_tokenizer): Marian here has one joint vocabulary")
    p = m.position
    if p.kind == "sinusoidal" and (p.layout != "halves" or p.base != BASE):
        problems.append("model.position is not sinusoidal with layout 'halves' and base 10000")
    if m.ffn not in EXPORT_ACTIVATION:
        problems.append(f"model.ffn is {m.ffn!r} (Marian's feed-forward has one activation: "
                        f"{', '.join(EXPORT_ACTIVATION)})")
    if m.norm_eps != EPS:
        problems.append(f"model.norm_eps is {m.norm_eps}, not {EPS} (Marian's LayerNorms have no other)")
    if m.d_model % 2:
        problems.append(f"an odd d_model ({m.d_model}): Marian's table has one more sine than tfx's")
    return problems


def from_tfx(recipe, model, tokenizer, run_dir=None) -> tuple[dict, dict]:
    m, d = recipe.model, recipe.model.d_model
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    vocab = sd["encoder.embed.weight"].shape[0]
    bias = sd["head.bias"][None] if m.head_bias else torch.zeros(1, vocab)
    tensors = {"model.shared.weight": sd["encoder.embed.weight"], "final_logits_bias": bias}
    layers = {"encoder": len(model.encoder.blocks), "decoder": len(model.decoder.blocks)}
    for side, pairs in (("encoder", ENCODER), ("decoder", DECODER)):
        for i in range(layers[side]):
            ours, theirs = f"{side}.blocks.{i}.", f"model.{side}.layers.{i}."
            tensors.update(give_pairs(sd, [(ours + t, theirs + h) for t, h in pairs]))
            for t, h, parts in FUSED[side]:
                for p in ("weight", "bias"):
                    for x, part in zip(parts, sd[f"{ours}{t}.{p}"].split(d)):
                        tensors[f"{theirs}{h}.{x}_proj.{p}"] = part
    eos = tokenizer.eos_id
    config = {"model_type": "marian", "architectures": ["MarianMTModel"], "vocab_size": vocab,
              "decoder_vocab_size": vocab, "d_model": d, "encoder_layers": layers["encoder"],
              "decoder_layers": layers["decoder"], "encoder_attention_heads": m.n_heads,
              "decoder_attention_heads": m.n_heads, "encoder_ffn_dim": model.encoder.blocks[0].ffn.down.in_features,
              "decoder_ffn_dim": model.decoder.blocks[0].ffn.down.in_features,
              "activation_function": EXPORT_ACTIVATION[m.ffn], "max_position_embeddings": m.context,
              "scale_embedding": True, "share_encoder_decoder_embeddings": True, "tie_word_embeddings": True,
              "is_encoder_decoder": True, "dropout": m.dropout, "attention_dropout": m.attn_dropout,
              "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
              # tfx's seq2seq starts the target with bos (Marian with pad) and forces eos at the length limit
              "pad_token_id": tokenizer.pad_id, "eos_token_id": eos, "decoder_start_token_id": tokenizer.bos_id,
              "forced_eos_token_id": eos}
    return config, tensors
