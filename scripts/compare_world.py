#!/usr/bin/env python
"""One process against several on the same recipe, one after the other in one run: tokens/s (median
over logged steps) and both training-loss curves (mean over tenths of the run).

    python scripts/compare_world.py [--recipe recipes/lm/nanogpt-cpu.toml] [--steps 300] [--nproc 2] \
        [--set KEY=VALUE ...]

Runs, in order: 1 process with as many threads as cores; --nproc processes under `tfx train --nproc`
(cores / nproc threads each) with train.parallel = "ddp"; the same with "fsdp". The global batch is
the recipe's in all of them, so the losses must agree; on a machine with few cores the point is that
agreement, not a speed-up.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_nanogpt import curve_table, train_tfx  # noqa: E402

def run(name: str, recipe: str, steps: int, sets: list[str], work: Path, nproc: int | None) -> dict:
    return train_tfx(name, recipe, steps, sets, work / name.replace(" ", "-"),
                     launch=("--nproc", str(nproc)) if nproc else ())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/lm/nanogpt-cpu.toml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set KEY=VALUE (repeatable)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = [run(f"1 x {cores} thr", args.recipe, args.steps, [*args.sets, f"train.threads={cores}"],
                       work, None)]
        for parallel in ("ddp", "fsdp"):
            name = f"{args.nproc}x{max(1, cores // args.nproc)} {parallel}"
            results.append(run(name, args.recipe, args.steps, [*args.sets, f"train.parallel={parallel}"], work,
                               args.nproc))
    print(f"{'':<22} {'val loss':>9} {'tokens/s':>10} {'wall s':>8}")
    for r in results:
        print(f"{r['name']:<22} {r['val_loss']:>9.4f} {r['tokens_per_s']:>10,.0f} {r['wall_s']:>8.1f}")
    first = dict(results[0]["curve"])
    for r in results[1:]:
        worst = max(abs(loss - first[step]) / first[step] for step, loss in r["curve"])
        print(f"largest relative difference of {r['name']!r}'s per-step losses from 1 process: {worst:.1e}")
    curve_table(results, args.steps)


if __name__ == "__main__":
    main()
