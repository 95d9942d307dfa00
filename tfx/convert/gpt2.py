"""GPT-2 (Radford et al., 2019) <-> a tfx lm: learned positions, pre-norm layernorm, GELU, biases.

HF stores GPT-2's linear layers as Conv1D, (in, out) matrices: the transposes of tfx's nn.Linear.
c_attn's outputs are q, k, v one after another, heads contiguous in each, as tfx's qkv is.
"""
from __future__ import annotations

import torch

from tfx.convert import Imported
from tfx.convert.common import need, plain_problems, refuse_unless, take, token_ids

NAME = "gpt2"
MODEL_TYPES = ("gpt2",)
FAMILIES = {"lm": "GPT2LMHeadModel"}  # tfx family -> HF architecture
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}
EXPORT_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# (tfx name in a block, HF name in a block, stored as Conv1D)
BLOCK = [("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.out", "attn.c_proj", True),
         ("norm2", "ln_2", False), ("ffn.up", "mlp.c_fc", True), ("ffn.down", "mlp.c_proj", True)]


def to_tfx(config: dict, tensors: dict, family: str | None, hf_dir=None) -> Imported:
    c = dict(config)
    act = c.get("activation_function", "gelu_new")
    refuse_unless(act in ACTIVATIONS, NAME, f"activation_function {act!r}")
    refuse_unless(c.get("scale_attn_weights", True), NAME, "scale_attn_weights = false")
    refuse_unless(not c.get("scale_attn_by_inverse_layer_idx", False), NAME, "scale_attn_by_inverse_layer_idx")
    refuse_unless(not c.get("add_cross_attention", False), NAME, "add_cross_attention")
    d, n_layers = need(c, "n_embd", arch=NAME), need(c, "n_layer", arch=NAME)
    tied = c.get("tie_word_embeddings", True)
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        return take(tensors, used, prefix + name)

    state = {"stack.embed.weight": get("wte.weight"), "stack.pos.table.weight": get("wpe.weight"),
             "stack.norm.weight": get("ln_f.weight"), "stack.norm.bias": get("ln_f.bias")}
    for i in range(n_layers):
        for ours, theirs, conv in BLOCK:
            w = get(f"h.{i}.{theirs}.weight")
            state[f"stack.blocks.{i}.{ours}.weight"] = w.t() if conv else w
            state[f"stack.blocks.{i}.{ours}.bias"] = get(f"h.{i}.{theirs}.bias")
    if "lm_head.weight" in tensors or not tied:
        head = take(tensors, used, "lm_head.weight")
        refuse_unless(not tied or torch.equal(head, state["stack.embed.weight"]), NAME,
                      "tie_word_embeddings with an lm_head.weight unlike wte")
    state["head.weight"] = state["stack.embed.weight"] if tied else head
    vocab = state["stack.embed.weight"].shape[0]
    model = {"d_model": d, "n_layers": n_layers, "n_heads": need(c, "n_head", arch=NAME),
             "d_ff": c.get("n_inner") or 4 * d, "context": need(c, "n_positions", arch=NAME),
             "norm": "layernorm", "norm_eps": c.get("layer_norm_epsilon", 1e-5), "ffn": ACTIVATIONS[act],
             "bias": True, "tie_embeddings": tied, "position": {"kind": "learned"}, "attention": {"kind": "dense"}}
    ignored = {k for k in tensors if k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers
    return Imported(family="lm", model=model, state=state, used=used, vocab_size=vocab, ignored=ignored)


def export_problems(recipe) -> list[str]:
    m = recipe.model
    problems = plain_problems(m, position="learned", full_heads=True, norm="layernorm", norm_position="pre",
                              bias=True, embed_norm=False)
    if m.ffn not in EXPORT_ACTIVATION:
        problems.append(f"model.ffn is {m.ffn!r} (GPT-2's MLP has one activation: {', '.join(EXPORT_ACTIVATION)})")
    return problems


def from_tfx(recipe, model, tokenizer, run_dir=None) -> tuple[dict, dict]:
    m, stack = recipe.model, model.stack
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = {"transformer.wte.weight": sd["stack.embed.weight"], "transformer.wpe.weight": sd["stack.pos.table.weight"],
               "transformer.ln_f.weight": sd["stack.norm.weight"], "transformer.ln_f.bias": sd["stack.norm.bias"]}
    for i in range(m.n_layers):
        for ours, theirs, conv in BLOCK:
            w = sd[f"stack.blocks.{i}.{ours}.weight"]
            tensors[f"transformer.h.{i}.{theirs}.weight"] = w.t() if conv else w
            tensors[f"transformer.h.{i}.{theirs}.bias"] = sd[f"stack.blocks.{i}.{ours}.bias"]
    if not m.tie_embeddings:
        tensors["lm_head.weight"] = sd["head.weight"]
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": stack.embed.num_embeddings,
              "n_positions": m.context, "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads,
              "n_inner": stack.blocks[0].ffn.down.in_features, "activation_function": EXPORT_ACTIVATION[m.ffn],
              "layer_norm_epsilon": m.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
              "tie_word_embeddings": m.tie_embeddings, **token_ids(tokenizer)}
    return config, tensors

