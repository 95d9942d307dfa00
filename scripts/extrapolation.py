#!/usr/bin/env python
"""Length extrapolation of the position schemes: train the Shakespeare character LM at a short
context, then score held-out text with windows 1x, 2x, 4x and 8x as long.

    python scripts/extrapolation.py [--context 64] [--steps 1500] [--schemes rope,alibi,...]

Prints validation loss (nats per character) per scheme and window; 'n/a' where the scheme is not
defined past its training context (learned). Scores the first --chars characters of the
validation plays in non-overlapping windows.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tfxrun import REPO, sets, tfx

SCHEMES = "sinusoidal,learned,rope,alibi,xl,shaw,t5,da"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1500, help="training steps per scheme (the recipe's schedule)")
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--chars", type=int, default=60_000, help="validation characters scored")
    ap.add_argument("--recipe", default=str(REPO / "recipes/lm/shakespeare-char.toml"))
    args = ap.parse_args()
    root = Path(tfx("data", "get", "shakespeare").strip())
    lengths = [args.context * m for m in (1, 2, 4, 8)]
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "valid-sample.txt"
        sample.write_text((root / "valid.txt").read_text(encoding="utf-8")[: args.chars], encoding="utf-8")
        for scheme in args.schemes.split(","):
            print(f"training {scheme} at context {args.context} for {args.steps} steps ...", file=sys.stderr,
                  flush=True)
            run = f"{tmp}/{scheme}"
            tfx("train", args.recipe, *sets({"model.position.kind": scheme, "model.context": args.context,
                                              "train.steps": args.steps, "train.eval_every": 0,
                                              "train.save_every": 0}), "--out", run)
            losses = []
            for n in lengths:
                out = tfx("eval", run, "--data", str(sample), "--context", str(n), "--checkpoint", "last", "--json",
                          allow_fail=True)
                losses.append(json.loads(out)["loss"] if out else None)
            table.append((scheme, losses))
            print("  " + "  ".join(f"{n}: {'n/a' if v is None else f'{v:.4f}'}" for n, v in zip(lengths, losses)),
                  file=sys.stderr, flush=True)
    print(f"{'scheme':<12}" + "".join(f"{f'T={n}':>10}" for n in lengths))
    for scheme, losses in table:
        print(f"{scheme:<12}" + "".join(f"{'n/a' if v is None else f'{v:.4f}':>10}" for v in losses))


if __name__ == "__main__":
    main()
