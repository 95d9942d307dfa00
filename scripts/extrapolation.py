#!/usr/bin/env python
"""Length extrapolation: train the Shakespeare character LM at a short context with each position
scheme, then score held-out text in windows 1x, 2x, 4x, ... as long, read three ways:

- plain: each window in one parallel pass (`tfx eval --context N`);
- lm_infinite: the same windows through LM-Infinite's attention (`--lm-infinite`: the training
  context as the window and the distance ceiling, the first --global-tokens always seen);
- sinks: each window read in order through a StreamingLLM cache of 4 sinks and the last
  context - 4 tokens (`--stream-window`), one lane per window.

    python scripts/extrapolation.py [--context 64] [--steps 1500] [--schemes rope,alibi,...]
                                    [--multiples 1,2,4,16] [--readers plain,lm_infinite,sinks]

Prints validation loss (nats per character) per scheme, reader and window length; 'n/a' where the
reading is not defined (learned positions past their context; LM-Infinite and sinks with absolute
positions). Scores the first --chars characters of the validation plays, in non-overlapping windows.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tfxrun import REPO, sets, tfx

SCHEMES = "sinusoidal,learned,rope,alibi,xl,shaw,t5,da"
SINKS = 4


def reader_args(reader: str, n: int, context: int, chars: int, global_tokens: int) -> list[str]:
    """tfx eval arguments that read windows of n tokens (characters) the `reader` way."""
    if reader == "plain":
        return ["--context", str(n)]
    if reader == "lm_infinite":
        return ["--context", str(n), "--lm-infinite", "--global-tokens", str(global_tokens)]
    if reader == "sinks":  # one lane per window of n: each lane is read from scratch, in order
        return ["--stream-window", str(context - SINKS), "--sinks", str(SINKS), "--batch-size", str(max(1, chars // n)),
                "--max-tokens", str((chars // n) * n)]
    raise SystemExit(f"unknown reader {reader!r} (plain, lm_infinite, sinks)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1500, help="training steps per scheme (the recipe's schedule)")
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--multiples", default="1,2,4,8", help="window lengths, as multiples of the context")
    ap.add_argument("--readers", default="plain", help="plain, lm_infinite, sinks (comma-separated)")
    ap.add_argument("--global-tokens", type=int, default=4, help="LM-Infinite's global tokens")
    ap.add_argument("--chars", type=int, default=60_000, help="validation characters scored")
    ap.add_argument("--recipe", default=str(REPO / "recipes/lm/shakespeare-char.toml"))
    args = ap.parse_args()
    root = Path(tfx("data", "get", "shakespeare").strip())
    lengths = [args.context * int(m) for m in args.multiples.split(",")]
    readers = args.readers.split(",")
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
            for reader in readers:
                losses = []
                for n in lengths:
                    out = tfx("eval", run, "--data", str(sample), "--checkpoint", "last", "--json",
                              *reader_args(reader, n, args.context, args.chars, args.global_tokens), allow_fail=True)
                    losses.append(json.loads(out)["loss"] if out else None)
                table.append((scheme, reader, losses))
                print(f"  {reader}: " + "  ".join(f"{n}: {'n/a' if v is None else f'{v:.4f}'}"
                                                  for n, v in zip(lengths, losses)), file=sys.stderr, flush=True)
    print(f"{'scheme':<12}{'reader':<13}" + "".join(f"{f'T={n}':>10}" for n in lengths))
    for scheme, reader, losses in table:
        print(f"{scheme:<12}{reader:<13}" + "".join(f"{'n/a' if v is None else f'{v:.4f}':>10}" for v in losses))


if __name__ == "__main__":
    main()
