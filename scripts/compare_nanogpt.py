#!/usr/bin/env python
"""Train nanoGPT and tfx on the same text with nanoGPT's README CPU config, one after the other,
and print both validation losses, tokens/s and wall times (and their ratio), and both training-loss
curves (mean loss over tenths of the run; --plot FILE draws them).

    python scripts/compare_nanogpt.py --nanogpt /path/to/nanoGPT --data /path/to/input.txt \
        [--steps 2000] [--tfx-set train.precision=bf16 ...] [--recipe recipes/lm/nanogpt-cpu.toml] \
        [--plot curves.png]

The nanoGPT checkout is used as it is (never committed here); its shakespeare_char data folder is
prepared from --data in a temporary copy of the checkout. Both use the first 90% of the
characters to train and the last 10% to validate. nanoGPT's val loss is its estimate over
--eval-iters random batches; tfx's is the whole validation text in non-overlapping windows.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CPU = ["--device=cpu", "--compile=False", "--block_size=64", "--batch_size=12", "--n_layer=4",
               "--n_head=4", "--n_embd=128", "--dropout=0.0", "--learning_rate=1e-3", "--min_lr=1e-4",
               "--warmup_iters=100", "--beta2=0.99", "--weight_decay=0.1", "--grad_clip=1.0",
               "--always_save_checkpoint=False"]


def run_nanogpt(checkout: Path, data: Path, steps: int, eval_iters: int, work: Path) -> dict:
    repo = work / "nanogpt"
    shutil.copytree(checkout, repo, ignore=shutil.ignore_patterns(".git", "out*"))
    char_dir = repo / "data" / "shakespeare_char"
    shutil.copy(data, char_dir / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=char_dir, check=True, capture_output=True)
    args = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU, f"--max_iters={steps}",
            f"--lr_decay_iters={steps}", f"--eval_interval={steps}", f"--eval_iters={eval_iters}",
            "--log_interval=1", f"--out_dir={work / 'nanogpt-out'}"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=repo, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"nanoGPT failed:\n{proc.stderr[-2000:]}")
    iters = re.findall(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms", proc.stdout)
    iter_ms = [float(t) for i, _, t in iters if int(i) > 0]  # iteration 0 includes start-up
    curve = [(int(i) + 1, float(loss)) for i, loss, _ in iters]  # the loss of the step that ends at i + 1
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", proc.stdout)
    step, _, val = evals[-1]
    tokens = 12 * 64
    return {"name": "nanoGPT", "val_loss": float(val), "tokens_per_s": tokens / (statistics.median(iter_ms) / 1000),
            "wall_s": wall, "curve": curve}


def run_tfx(recipe: str, data: Path, steps: int, extra: list[str], work: Path, name: str = "tfx") -> dict:
    sets = [f"data.train={data}", "data.holdout=0.1", 'data.corpus=""', *extra]
    return train_tfx(name, recipe, steps, sets, work / f"tfx-{name}")


def train_tfx(name: str, recipe: str, steps: int, sets: list[str], out: Path, launch: tuple[str, ...] = ()) -> dict:
    """`tfx train RECIPE [launch...]` for `steps` steps (validated and saved at the end, every step
    logged), timed: its validation loss, median tokens/s past step 10, wall time and loss curve."""
    args = [sys.executable, "-m", "tfx", "train", recipe, *launch, "--out", str(out)]
    for s in [f"train.steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}", "train.log_every=1",
              *sets]:
        args += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "split" not in r and r["step"] > 10]
    val = [r for r in rows if r.get("split") == "valid"][-1]
    return {"name": name, "val_loss": val["loss"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_rows), "wall_s": wall,
            "curve": [(r["step"], r["loss"]) for r in rows if "split" not in r]}


def curve_table(results: list[dict], steps: int, points: int = 10) -> None:
    """Mean training loss of each run over `points` equal windows of steps: the two curves."""
    edges = [round(steps * i / points) for i in range(points + 1)]
    print(f"\n{'steps':<12}" + "".join(f"{r['name']:>12}" for r in results))
    for a, b in zip(edges, edges[1:]):
        cells = []
        for r in results:
            window = [loss for step, loss in r["curve"] if a < step <= b]
            cells.append(f"{sum(window) / len(window):>12.4f}" if window else f"{'-':>12}")
        print(f"{f'{a + 1}-{b}':<12}" + "".join(cells))


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(*zip(*r["curve"]), label=f"{r['name']} ({r['tokens_per_s']:,.0f} tok/s)", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_ylim(top=min(4.5, max(loss for r in results for _, loss in r["curve"])))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    ap.add_argument("--data", type=Path, required=True, help="tiny-shakespeare input.txt")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-iters", type=int, default=200)
    ap.add_argument("--recipe", default="recipes/lm/nanogpt-cpu.toml")
    ap.add_argument("--tfx-set", action="append", default=[], help="extra --set for tfx (repeatable)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=KEY=VALUE,KEY=VALUE: one more tfx run with these --set (repeatable)")
    ap.add_argument("--skip-nanogpt", action="store_true")
    ap.add_argument("--plot", type=Path, help="write both training-loss curves to this PNG")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = [] if args.skip_nanogpt else [run_nanogpt(args.nanogpt, args.data, args.steps, args.eval_iters,
                                                            work)]
        results.append(run_tfx(args.recipe, args.data, args.steps, args.tfx_set, work))
        for variant in args.variant:
            name, _, sets = variant.partition("=")
            more = [s for s in sets.split(",") if s]
            steps = next((int(s.split("=")[1]) for s in more if s.startswith("train.steps=")), args.steps)
            results.append(run_tfx(args.recipe, args.data, steps, [*args.tfx_set, *more], work, name=name))
    if args.json:
        print(json.dumps(results))
        return
    if args.plot:
        plot_curves(results, args.plot)
    base = results[0]["tokens_per_s"]
    print(f"{'':<24} {'val loss':>9} {'tokens/s':>10} {'wall s':>8} {'speed':>7}")
    for r in results:
        print(f"{r['name']:<24} {r['val_loss']:>9.4f} {r['tokens_per_s']:>10,.0f} {r['wall_s']:>8.1f} "
              f"{r['tokens_per_s'] / base:>6.2f}x")
    curve_table(results, args.steps)


if __name__ == "__main__":
    main()
