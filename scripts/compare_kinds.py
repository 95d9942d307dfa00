#!/usr/bin/env python
"""Every causal attention kind on the Shakespeare character LM for the same training time:
steps, tokens/s and validation loss per kind, side by side in one run.

    python scripts/compare_kinds.py [--minutes 2] [--kinds dense,local,...] [--context 256]

Sparse kinds get settings that make them sparse at the context (a window of a quarter of it,
and so on), so the comparison is not dense attention under another name. Everything else is the
recipe's (recipes/lm/shakespeare-char.toml); train.steps is set far beyond what the time allows,
so the cosine schedule stays near its peak and no kind's learning rate depends on its speed.
"""
from __future__ import annotations

import argparse
import tempfile

from tfxrun import REPO, metrics, sets, tfx


def kind_settings(kind: str, T: int) -> dict:
    """Recipe keys that make each kind use its own pattern at context T."""
    return {
        "local": {"window": T // 4},
        "strided": {"stride": max(2, int(T ** 0.5))},
        "fixed": {"block": T // 8, "summary": 4},
        "blockwise": {"n_blocks": 4},
        "longformer": {"window": T // 8, "global_tokens": "[0]"},
        "bigbird": {"block": T // 16, "window_blocks": 3, "global_blocks": 1, "random_blocks": 2,
                    "random_from": '"past"'},
        "lsh": {"chunk": T // 8, "n_hashes": 2},
        "routing": {"n_clusters": 4},
        "performer": {"features": 64},
    }.get(kind, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0, help="training time per kind")
    ap.add_argument("--kinds", default=None, help="comma-separated (default: every causal kind)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--recipe", default=str(REPO / "recipes/lm/shakespeare-char.toml"))
    args = ap.parse_args()
    import sys

    sys.path.insert(0, str(REPO))
    from tfx.bench.attention import kernels_for

    kinds = args.kinds.split(",") if args.kinds else kernels_for(causal=True)
    tfx("data", "get", "shakespeare")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            extra = {"model.attention.kind": kind, "model.context": args.context, "train.steps": 1_000_000,
                     "train.max_minutes": args.minutes, "train.eval_every": 0, "train.save_every": 0,
                     "train.eval_tokens": 100_000}
            extra.update({f"model.attention.{k}": v for k, v in kind_settings(kind, args.context).items()})
            print(f"training {kind} for {args.minutes:g} min ...", file=sys.stderr, flush=True)
            tfx("train", args.recipe, *sets(extra), "--out", f"{tmp}/{kind}")
            train, valid = metrics(f"{tmp}/{kind}")
            speed = [r["tokens_per_s"] for r in train[1:]] or [train[-1]["tokens_per_s"]]
            rows.append((kind, train[-1]["step"], sum(speed) / len(speed), valid[-1]["loss"]))
            print(f"  {kind}: step {rows[-1][1]}, {rows[-1][2]:,.0f} tok/s, valid loss {rows[-1][3]:.4f}",
                  file=sys.stderr, flush=True)
    print(f"{'kind':<12} {'steps':>7} {'tokens/s':>10} {'valid loss':>11}")
    for kind, steps, speed, loss in rows:
        print(f"{kind:<12} {steps:>7} {speed:>10,.0f} {loss:>11.4f}")


if __name__ == "__main__":
    main()
