#!/usr/bin/env python
"""MEGABYTE against the byte LM and the character LM on the Shakespeare plays, for the same training
time: bits per byte on valid and test (comparable across tokenizers: nats summed over the text / its
UTF-8 bytes / ln 2) and the median training tokens/s (a token is a byte, or a character).

    python scripts/compare_megabyte.py [--minutes 8] [--out runs/compare/megabyte] \\
        [--megabyte NAME:KEY=VALUE,...]

Two `tfx compare --minutes` calls, one run after the other: recipes/lm/shakespeare-char.toml as `char`
and, with tokenizer.kind = "byte", as `byte`; recipes/lm/shakespeare-megabyte.toml as `megabyte`
(plus each --megabyte variant of it). Each run's train.steps is sized by a probe so that its cosine
schedule ends with the time (tfx compare). Runs already in --out are reused (tfx compare's cache).
"""
from __future__ import annotations

import argparse
import json

from tfxrun import REPO, tfx


def compared(recipe: str, variants: list[str], minutes: float, out: str) -> dict[str, tuple[str, dict]]:
    named = [a for v in variants for a in ("--variant", v)]
    report = json.loads(tfx("compare", str(REPO / recipe), *named, "--minutes", str(minutes), "--out", out,
                            "--plot", "", "--json", progress=True))
    return {v["name"]: (f"{out}/{v['name']}", v) for v in report["variants"]}  # name -> (its run, its result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=8.0, help="training time per model")
    ap.add_argument("--out", default=str(REPO / "runs/compare/megabyte"))
    ap.add_argument("--megabyte", action="append", default=[], help="another MEGABYTE variant, NAME:KEY=VALUE,...")
    args = ap.parse_args()
    tfx("data", "get", "shakespeare")
    rows = {**compared("recipes/lm/shakespeare-char.toml", ["char:", "byte:tokenizer.kind=byte"], args.minutes,
                       f"{args.out}/lm"),
            **compared("recipes/lm/shakespeare-megabyte.toml", ["megabyte:", *args.megabyte], args.minutes,
                       f"{args.out}/megabyte")}
    print(f"{'model':<14}{'steps':>8}{'valid bpb':>12}{'test bpb':>12}{'tokens/s':>12}{'parameters':>12}")
    for name, (run, v) in rows.items():
        test = json.loads(tfx("eval", run, "--split", "test", "--json"))["bits_per_byte"]
        print(f"{name:<14}{v['steps']:>8}{v['eval']['bits_per_byte']:>12.4f}{test:>12.4f}"
              f"{v['tokens_per_s'] or 0:>12,.0f}{v['parameters']:>12,}")


if __name__ == "__main__":
    main()
