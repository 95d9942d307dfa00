#!/usr/bin/env python
"""MEGABYTE against the byte LM and the character LM on the Shakespeare plays, at the same training
time: validation bits per byte (comparable across tokenizers: nats summed over the text / its UTF-8
bytes / ln 2) and the median training tokens/s (a token is a byte, or a character).

    python scripts/compare_megabyte.py [--minutes 5] [--out runs/megabyte]

char and byte are recipes/lm/shakespeare-char.toml (the byte LM with tokenizer.kind = "byte");
megabyte is recipes/lm/shakespeare-megabyte.toml. Each run trains alone for --minutes (train.steps
high enough that the clock stops it), one after the other. Runs already in --out are reused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tfxrun import REPO, metrics, sets, tfx

RUNS = {
    "char": ("recipes/lm/shakespeare-char.toml", {}),
    "byte": ("recipes/lm/shakespeare-char.toml", {"tokenizer.kind": '"byte"'}),
    "megabyte": ("recipes/lm/shakespeare-megabyte.toml", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--out", default=str(REPO / "runs/megabyte"))
    ap.add_argument("--eval-tokens", type=int, default=100_000, help="valid tokens scored")
    args = ap.parse_args()
    rows = []
    for name, (recipe, overrides) in RUNS.items():
        run = Path(args.out) / name
        if not (run / "model.safetensors").is_file():
            print(f"training {name} for {args.minutes} minutes ...", file=sys.stderr, flush=True)
            tfx("train", str(REPO / recipe), *sets({**overrides, "train.steps": 100_000,
                                                    "train.max_minutes": args.minutes}), "--out", str(run))
        train, _ = metrics(run)
        speeds = sorted(r["tokens_per_s"] for r in train if "tokens_per_s" in r)
        ev = json.loads(tfx("eval", str(run), "--split", "valid", "--checkpoint", "last", "--max-tokens",
                            str(args.eval_tokens), "--json"))
        rows.append((name, train[-1]["step"], ev["bits_per_byte"], speeds[len(speeds) // 2] if speeds else 0.0))
    print(f"{'model':<10}{'steps':>8}{'valid bpb':>12}{'tokens/s':>12}")
    for name, steps, bpb, speed in rows:
        print(f"{name:<10}{steps:>8}{bpb:>12.4f}{speed:>12,.0f}")


if __name__ == "__main__":
    main()
