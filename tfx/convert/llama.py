"""Llama (Touvron et al., 2023) <-> a tfx lm: RMSNorm, SwiGLU, RoPE (half-split pairs, as tfx's), grouped
key/value heads, no biases (or biases everywhere), tied or separate output layer. Mistral without a
sliding window is the same model.

tfx keeps q, k, v in one matrix ([q; k; v] rows) and SwiGLU's gate and value in one ([gate; up] rows).
"""
from __future__ import annotations

import torch

from tfx.convert import Imported
from tfx.convert.common import need, plain_problems, refuse_unless, take, token_ids

NAME = "llama"
MODEL_TYPES = ("llama", "mistral")
FAMILIES = {"lm": "LlamaForCausalLM"}  # tfx family -> HF architecture


def rope_theta(c: dict) -> float:
    """The RoPE base of a config, refusing any scaling (linear, dynamic, yarn, llama3 ...)."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    refuse_unless(kind == "default", NAME, f"rope scaling {kind!r}")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def to_tfx(config: dict, tensors: dict, family: str | None, hf_dir=None) -> Imported:
    c = config
    refuse_unless(c.get("hidden_act", "silu") == "silu", NAME, f"hidden_act {c.get('hidden_act')!r}")
    biases = {bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))}
    refuse_unless(len(biases) == 1, NAME, "attention_bias and mlp_bias differ (tfx has biases everywhere or nowhere)")
    window = c.get("sliding_window")
    refuse_unless(window is None or window >= c.get("max_position_embeddings", 0), NAME, f"sliding_window {window}")
    d, n_layers = need(c, "hidden_size", arch=NAME), need(c, "num_hidden_layers", arch=NAME)
    heads = need(c, "num_attention_heads", arch=NAME)
    bias = biases.pop()
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        return take(tensors, used, name)

    def linear(ours: str, *theirs: str) -> dict:
        out = {f"{ours}.weight": torch.cat([get(f"{t}.weight") for t in theirs])}
        if bias:
            out[f"{ours}.bias"] = torch.cat([get(f"{t}.bias") for t in theirs])
        return out

    state = {"stack.embed.weight": get("model.embed_tokens.weight"), "stack.norm.weight": get("model.norm.weight")}
    for i in range(n_layers):
        p, q = f"stack.blocks.{i}.", f"model.layers.{i}."
        state[p + "norm1.weight"] = get(q + "input_layernorm.weight")
        state[p + "norm2.weight"] = get(q + "post_attention_layernorm.weight")
        attn, mlp = q + "self_attn.", q + "mlp."
        state |= linear(p + "attn.qkv", attn + "q_proj", attn + "k_proj", attn + "v_proj")
        state |= linear(p + "attn.out", attn + "o_proj")
        state |= linear(p + "ffn.up", mlp + "gate_proj", mlp + "up_proj")
        state |= linear(p + "ffn.down", mlp + "down_proj")
    tied = bool(c.get("tie_word_embeddings", False))
    if "lm_head.weight" in tensors or not tied:
        head = get("lm_head.weight")
        refuse_unless(not tied or torch.equal(head, state["stack.embed.weight"]), NAME,
                      "tie_word_embeddings with an lm_head.weight unlike embed_tokens")
    state["head.weight"] = state["stack.embed.weight"] if tied else head
    model = {"d_model": d, "n_layers": n_layers, "n_heads": heads,
             "n_kv_heads": c.get("num_key_value_heads") or heads, "d_head": c.get("head_dim") or d // heads,
             "d_ff": need(c, "intermediate_size", arch=NAME), "context": need(c, "max_position_embeddings", arch=NAME),
             "norm": "rmsnorm", "norm_eps": c.get("rms_norm_eps", 1e-6), "ffn": "swiglu", "bias": bias,
             "tie_embeddings": tied, "position": {"kind": "rope", "base": rope_theta(c)},
             "attention": {"kind": "dense"}}
    ignored = {k for k in tensors if k.endswith("rotary_emb.inv_freq")}  # a buffer in older checkpoints
    return Imported(family="lm", model=model, state=state, used=used,
                    vocab_size=state["stack.embed.weight"].shape[0], ignored=ignored)


def export_problems(recipe) -> list[str]:
    return plain_problems(recipe.model, position="rope", norm="rmsnorm", norm_position="pre", embed_norm=False,
                          ffn="swiglu")


def from_tfx(recipe, model, tokenizer, run_dir=None) -> tuple[dict, dict]:
    m, stack = recipe.model, model.stack
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    H, Hkv, D, F = m.n_heads, stack.n_kv_heads, stack.d_head, stack.blocks[0].ffn.down.in_features
    names = [".weight", ".bias"] if m.bias else [".weight"]
    tensors = {"model.embed_tokens.weight": sd["stack.embed.weight"], "model.norm.weight": sd["stack.norm.weight"]}
    for i in range(m.n_layers):
        p, q = f"stack.blocks.{i}.", f"model.layers.{i}."
        tensors[q + "input_layernorm.weight"] = sd[p + "norm1.weight"]
        tensors[q + "post_attention_layernorm.weight"] = sd[p + "norm2.weight"]
        for n in names:
            for part, size in zip(("q_proj", "k_proj", "v_proj"), sd[p + "attn.qkv" + n].split((H * D, Hkv * D, Hkv * D))):
                tensors[q + "self_attn." + part + n] = size
            tensors[q + "self_attn.o_proj" + n] = sd[p + "attn.out" + n]
            gate, up = sd[p + "ffn.up" + n].split((F, F))
            tensors[q + "mlp.gate_proj" + n], tensors[q + "mlp.up_proj" + n] = gate, up
            tensors[q + "mlp.down_proj" + n] = sd[p + "ffn.down" + n]
    if not m.tie_embeddings:
        tensors["lm_head.weight"] = sd["head.weight"]
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": stack.embed.num_embeddings,
              "hidden_size": m.d_model, "intermediate_size": F, "num_hidden_layers": m.n_layers,
              "num_attention_heads": H, "num_key_value_heads": Hkv, "head_dim": D, "hidden_act": "silu",
              "max_position_embeddings": m.context, "rms_norm_eps": m.norm_eps, "attention_bias": m.bias,
              "mlp_bias": m.bias, "tie_word_embeddings": m.tie_embeddings, "attention_dropout": 0.0,
              "rope_theta": m.position.base, "rope_parameters": {"rope_type": "default", "rope_theta": m.position.base},
              **token_ids(tokenizer)}
    return config, tensors
