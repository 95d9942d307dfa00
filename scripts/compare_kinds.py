#!/usr/bin/env python
"""Every causal attention kind on the Shakespeare character LM for the same training time:
steps, tokens/s and validation loss per kind, side by side in one run — one `tfx compare` call.

    python scripts/compare_kinds.py [--minutes 2] [--kinds dense,local,...] [--context 256] [--out DIR]

Sparse kinds get settings that make them sparse at the context (a window of a quarter of it,
and so on), so the comparison is not dense attention under another name: each kind is a
`--variant KIND:model.attention.kind=KIND,...` of its own. Everything else is the recipe's
(recipes/lm/shakespeare-char.toml); train.steps is set far beyond what the time allows and
train.max_minutes stops each kind, so the cosine schedule stays near its peak and no kind's learning
rate depends on its speed. Runs already in --out are reused (tfx compare's cache).
"""
from __future__ import annotations

import argparse
import json
import sys

from tfxrun import REPO, sets, tfx


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


def variant(kind: str, T: int) -> str:
    keys = {"model.attention.kind": kind, **{f"model.attention.{k}": v for k, v in kind_settings(kind, T).items()}}
    return f"{kind}:" + ",".join(f"{k}={v}" for k, v in keys.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=2.0, help="training time per kind")
    ap.add_argument("--kinds", default=None, help="comma-separated (default: every causal kind)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--recipe", default=str(REPO / "recipes/lm/shakespeare-char.toml"))
    ap.add_argument("--out", default=str(REPO / "runs/compare/kinds"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tfx.bench.attention import kernels_for

    kinds = args.kinds.split(",") if args.kinds else kernels_for(causal=True)
    tfx("data", "get", "shakespeare")
    common = {"model.context": args.context, "train.max_minutes": args.minutes, "train.eval_every": 0,
              "train.save_every": 0, "train.eval_tokens": 100_000}
    named = [a for k in kinds for a in ("--variant", variant(k, args.context))]
    report = json.loads(tfx("compare", args.recipe, *named, "--steps", "1000000", "--out", args.out, "--plot", "",
                            "--json", *sets(common), progress=True))
    print(f"{'kind':<12} {'steps':>7} {'tokens/s':>10} {'valid loss':>11}")
    for v in report["variants"]:
        print(f"{v['name']:<12} {v['steps']:>7} {v['tokens_per_s']:>10,.0f} {v['eval']['loss']:>11.4f}")


if __name__ == "__main__":
    main()
