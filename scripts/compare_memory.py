#!/usr/bin/env python
"""Memory features on the Shakespeare character LM, at the same model size and number of steps:
validation perplexity and training tokens/s of the base LM, Transformer-XL, the Compressive
Transformer, the Memorizing Transformer and the Recurrent Memory Transformer; the base LM plus a kNN-LM whose datastore is the training set (tuned on valid,
measured on test); and the attention-sinks stream table (StreamingLLM) of the base LM.

    python scripts/compare_memory.py [--steps 2000] [--out runs/memory] [--stream-tokens 8192]

Memories are sized alike: XL keeps mem_len = context positions per layer; the compressive memory
keeps context/2 of them plus context/2 compressed slots at rate 2 (the same 128 slots covering
192 past positions at context 128); the memorizing layer (one, second from the top, no XL
memory) retrieves the top 32 of the last 16 x context keys of its stream; RMT reads and writes 16
memory tokens per segment of context/2 tokens, backpropagating through the 2 segments of a block.
base-lanes is the control: the base LM trained on its text in the memories' order (contiguous
lanes, data.blocks = "lanes") instead of random blocks. The memory kinds are one `tfx compare` call
(a --variant each, equal steps, valid read in order); runs already in --out are reused (its cache),
so a second call only prints the tables again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tfxrun import REPO, sets, tfx


def variants(context: int) -> dict[str, dict]:
    half = context // 2
    return {
        "base": {},
        "base-lanes": {"data.blocks": '"lanes"'},  # the control: no memory, the memories' data order
        "xl": {"model.memory.kind": '"xl"', "model.memory.mem_len": context},
        "compressive": {"model.memory.kind": '"compressive"', "model.memory.mem_len": half,
                        "model.memory.cmem_len": half, "model.memory.rate": 2,
                        "model.memory.compression": '"conv"'},
        "memorizing": {"model.memory.kind": '"memorizing"', "model.memory.size": 16 * context,
                       "model.memory.top_k": 32},
        "rmt": {"model.memory.kind": '"rmt"', "model.memory.tokens": 16, "model.memory.segments": 2},
    }


def evaluate(run: Path, *args: str) -> dict:
    return json.loads(tfx("eval", str(run), "--json", *args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--recipe", default=str(REPO / "recipes/lm/shakespeare-char.toml"))
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--out", default=str(REPO / "runs/memory"))
    ap.add_argument("--stream-tokens", type=int, default=8192, help="tokens of valid read as 4 streams")
    ap.add_argument("--no-knn", action="store_true")
    ap.add_argument("--knn-stride", type=int, default=64, help="window stride of the kNN-LM's keys and queries")
    args = ap.parse_args()
    out = Path(args.out)
    tfx("data", "get", "shakespeare")
    named = [f"{name}:" + ",".join(f"{k}={v}" for k, v in extra.items())
             for name, extra in variants(args.context).items()]
    common = {"model.context": args.context, "train.save_every": 0}
    report = json.loads(tfx("compare", args.recipe, *[a for n in named for a in ("--variant", n)], "--steps",
                            str(args.steps), "--split", "valid", "--out", str(out), "--plot", "", "--json",
                            *sets(common), progress=True))
    rows = [(v["name"], v["eval"]["perplexity"], v["eval"]["loss"], v["tokens_per_s"]) for v in report["variants"]]
    base = out / "base"
    knn = None
    if not args.no_knn:
        if not (base / "knn" / "settings.json").exists():
            print("kNN-LM: datastore of the training set, tuning on valid ...", file=sys.stderr, flush=True)
            stride = ["--stride", str(args.knn_stride)]
            tfx("knn", "build", str(base), "--split", "train", *stride)
            tfx("knn", "tune", str(base), "--split", "valid", "--json", *stride)
        knn = evaluate(base, "--split", "test", "--knn")
    print(f"{'memory':<14} {'valid ppl':>10} {'valid loss':>11} {'train tok/s':>12}")
    for name, ppl, loss, speed in rows:
        print(f"{name:<14} {ppl:>10.4f} {loss:>11.4f} {speed:>12,.0f}")
    if knn is not None:
        k = knn["knn"]
        change = 100 * (k["perplexity"] / knn["perplexity"] - 1)
        print(f"\nkNN-LM on test (datastore: {k['store_size']:,} training tokens, {k['index']} index; "
              f"lambda {k['lambda']:g}, k {k['k']}, temperature {k['temperature']:g})")
        print(f"  base LM ppl {knn['perplexity']:.4f} -> kNN-LM ppl {k['perplexity']:.4f} ({change:+.1f}%)")
    n = args.stream_tokens
    lanes = ["--split", "valid", "--max-tokens", str(n), "--batch-size", "4"]
    C = args.context
    stream = {
        "dense, cut at the context (windows)": evaluate(base, *lanes),
        f"dense, growing cache (positions past {C})": evaluate(base, *lanes, "--stream-window", str(n), "--sinks", "0"),
        f"sliding window {C}": evaluate(base, *lanes, "--stream-window", str(C), "--sinks", "0"),
        f"4 sinks + window {C - 4}": evaluate(base, *lanes, "--stream-window", str(C - 4), "--sinks", "4"),
    }
    print(f"\nvalid read as 4 streams of {n // 4:,} tokens each (training context {C})")
    print(f"{'reading':<44} {'ppl':>9}")
    for name, r in stream.items():
        print(f"{name:<44} {r['perplexity']:>9.4f}")


if __name__ == "__main__":
    main()
