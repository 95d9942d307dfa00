#!/usr/bin/env python
"""Greedy decoding speed of tfx against HF transformers' GPT2LMHeadModel, the same weights in both.

    python scripts/compare_hf_generate.py RUN [--prompt-len 16] [--new-tokens 500] [--repeats 5]

RUN is a tfx lm run with GPT-2's architecture (learned positions, layernorm, gelu, biases, tied
embeddings), e.g. recipes/lm/nanogpt-cpu.toml trained with --set model.context=1024. Its weights
are copied into a GPT2LMHeadModel (exact GELU), the logits of both are checked to agree, and then
the two generate alternately, batch 1, from the same prompt: HF's `generate(use_cache=True)` and
tfx's cached decode loop (`tfx bench generate`). Prints both tokens/s (new tokens over the whole
generation, prefill included), their ratio and whether the greedy texts are identical.
Needs `pip install transformers` (the bench extra); never a runtime dependency of tfx.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfx.bench.generate import decode_once  # noqa: E402
from tfx.decoding.generate import decode_step  # noqa: E402
from tfx.run import load_run  # noqa: E402


def gpt2_from_tfx(model, recipe):
    """A GPT2LMHeadModel holding the tfx LM's weights (Conv1D weights are transposed Linears)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = recipe.model
    problems = [f"{k} is {v!r}" for k, v, want in [
        ("position", m.position.kind, "learned"), ("norm", m.norm, "layernorm"), ("ffn", m.ffn, "gelu"),
        ("bias", m.bias, True), ("tie_embeddings", m.tie_embeddings, True), ("attention", m.attention.kind, "dense"),
    ] if v != want]
    if problems or (m.n_kv_heads or m.n_heads) != m.n_heads:
        sys.exit(f"the run is not GPT-2 shaped: {', '.join(problems) or 'grouped kv heads'}")
    stack = model.stack
    d_ff = stack.blocks[0].ffn.up.out_features
    cfg = GPT2Config(vocab_size=stack.embed.num_embeddings, n_positions=m.context, n_embd=m.d_model,
                     n_layer=m.n_layers, n_head=m.n_heads, n_inner=d_ff, activation_function="gelu",
                     layer_norm_epsilon=m.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(cfg).eval()
    t = hf.transformer
    with torch.no_grad():
        t.wte.weight.copy_(stack.embed.weight)
        t.wpe.weight.copy_(stack.pos.table.weight)
        for block, h in zip(stack.blocks, t.h):
            for src, dst in [(block.norm1, h.ln_1), (block.norm2, h.ln_2)]:
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
            for src, dst in [(block.attn.qkv, h.attn.c_attn), (block.attn.out, h.attn.c_proj),
                             (block.ffn.up, h.mlp.c_fc), (block.ffn.down, h.mlp.c_proj)]:
                dst.weight.copy_(src.weight.T)
                dst.bias.copy_(src.bias)
        t.ln_f.weight.copy_(stack.norm.weight)
        t.ln_f.bias.copy_(stack.norm.bias)
    hf.tie_weights()
    return hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="tfx decodes through torch.compile (generate.compile)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()

    recipe, tokenizer, model = load_run(args.run)
    if args.prompt_len + args.new_tokens > model.context:
        sys.exit(f"prompt + new tokens ({args.prompt_len + args.new_tokens}) exceed the run's context "
                 f"({model.context}): train it with --set model.context=1024")
    hf = gpt2_from_tfx(model, recipe)
    prompt = torch.randint(0, tokenizer.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(prompt)[0]
        theirs = hf(prompt).logits
    gap = (ours - theirs).abs().max().item()
    print(f"same weights: max |logit difference| {gap:.2e}", file=sys.stderr)
    if gap > 1e-3:
        sys.exit("the two models disagree: the comparison would not be like for like")

    def run_hf():
        with torch.inference_mode():
            start = time.perf_counter()
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                              pad_token_id=0)
            return time.perf_counter() - start, out[0, args.prompt_len:].tolist()

    step = decode_step(model, args.compile)

    def run_tfx():
        start = time.perf_counter()
        _, _, out = decode_once(model, prompt, args.new_tokens, contextlib.nullcontext, step)
        return time.perf_counter() - start, out[0].tolist()

    run_hf(), run_tfx()  # warm-up
    times = {"hf": [], "tfx": []}
    texts = {}
    for r in range(args.repeats):  # alternate, so drifts in the machine's speed hit both
        for name, fn in (("hf", run_hf), ("tfx", run_tfx)):
            seconds, texts[name] = fn()
            times[name].append(seconds)
        print(f"repeat {r + 1}: hf {args.new_tokens / times['hf'][-1]:,.0f} tok/s, "
              f"tfx {args.new_tokens / times['tfx'][-1]:,.0f} tok/s", file=sys.stderr)
    rate = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
    result = {"new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "threads": torch.get_num_threads(),
              "tfx_compile": args.compile,
              "hf_tokens_per_s": rate["hf"], "tfx_tokens_per_s": rate["tfx"], "ratio": rate["tfx"] / rate["hf"],
              "same_tokens": texts["hf"] == texts["tfx"], "max_logit_gap": gap}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"HF transformers {rate['hf']:,.0f} tok/s | tfx {rate['tfx']:,.0f} tok/s | "
              f"ratio {result['ratio']:.2f}x | same greedy tokens: {result['same_tokens']}")


if __name__ == "__main__":
    main()
