#!/usr/bin/env python
"""Where Transformer-XL's memory pays (issue 21): the same LM with and without a segment memory at
short segments, evaluated like with like, and how much attention lands on the memory.

    python scripts/xl_effect.py --model char --contexts 32,64 --steps 2000 [--kinds xl] [--mems 1,2]
        [--positions rope,xl,alibi] [--out runs/xl-effect] [--jobs 2]

For each context C (the training segment) and position scheme, it trains (one thread per run,
`--jobs` runs at a time, each pinned to its own core) the control `none` (no memory, the text
read in contiguous lanes as the memories read it: data.blocks = "lanes") and each memory kind,
with the same steps and batches. XL keeps mem_len = m x C for each m of --mems (at the first
position scheme; mem_len = C at the others). Other kinds
(--kinds compressive,memorizing,rmt,spalm) are sized as scripts/compare_memory.py sizes them;
spalm retrieves from a datastore of the control run's training text (tfx knn build: the first
--store-tokens tokens, IVF-PQ searched with nprobe 8).
Then, on the whole valid split, every run is read three ways:

- segments: non-overlapping windows of C tokens, no memory (each token sees 0..C-1 tokens back);
- in order: the text in 32 lanes read segment by segment with the memory carried (what
  `tfx eval` does for a memory run; for the control it is `segments`);
- sliding: windows of C moved by C/2, no memory (every token sees at least C/2 back: a longer
  context than a segment gives the control, reported for scale).

and for XL runs the share of attention probability that lands on memory positions, per layer
(read with the kernel itself: attention is linear in the values, so values that are 1 on memory
keys and 0 elsewhere give each query's mass on the memory), over the first --mass-tokens of valid.
Runs already in --out are reused; results go to OUT/results.json and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tfxrun import REPO, metrics, sets

RECIPES = {"char": "recipes/lm/shakespeare-char.toml", "bpe": "recipes/lm/shakespeare-bpe.toml"}


def kind_keys(kind: str, context: int, mult: int, control: Path) -> dict:
    half = context // 2
    return {
        "xl": {"model.memory.kind": '"xl"', "model.memory.mem_len": mult * context},
        "compressive": {"model.memory.kind": '"compressive"', "model.memory.mem_len": half,
                        "model.memory.cmem_len": half, "model.memory.rate": 2, "model.memory.compression": '"conv"'},
        "memorizing": {"model.memory.kind": '"memorizing"', "model.memory.size": 16 * context,
                       "model.memory.top_k": 32},
        "rmt": {"model.memory.kind": '"rmt"', "model.memory.tokens": 16, "model.memory.segments": 2},
        "spalm": {"model.memory.kind": '"spalm"', "model.memory.mem_len": context,
                  "model.memory.datastore": f'"{control}"'},
    }[kind]


def plan(args) -> list[tuple[str, dict]]:
    """(run name, --set keys) in training order: each control before the runs that need it."""
    runs = []
    for context in args.contexts:
        for position in args.positions:
            tag = f"{position}-{context}"
            control = Path(args.out) / f"none-{tag}"
            common = {"model.context": context, "model.position.kind": f'"{position}"', "data.blocks": '"lanes"',
                      "train.steps": args.steps, "train.save_every": 0, "train.threads": 1}
            runs.append((f"none-{tag}", common))
            for kind in args.kinds:
                first = position == args.positions[0]
                mults = args.mems if kind == "xl" and first else [1]  # other schemes: mem_len = C only
                if kind != "xl" and not first:
                    continue  # the other kinds at the first position scheme only
                for m in mults:
                    name = f"xl{m}x-{tag}" if kind == "xl" else f"{kind}-{tag}"
                    runs.append((name, {**common, **kind_keys(kind, context, m, control)}))
    return runs


def train(args, name: str, keys: dict, core: int) -> None:
    run = Path(args.out) / name
    if (run / "best.safetensors").exists():
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pin = ["taskset", "-c", str(core)] if args.jobs > 1 else []
    tfx = [*pin, sys.executable, "-m", "tfx"]
    if keys.get("model.memory.kind") == '"spalm"':
        control = Path(args.out) / name.replace("spalm-", "none-")
        if not (control / "knn" / "meta.json").exists():
            subprocess.run([*tfx, "knn", "build", str(control), "--split", "train", "--index", "ivfpq",
                            "--max-tokens", str(args.store_tokens), "--nprobe", "8"],
                           cwd=REPO, env=env, check=True, capture_output=True)
    print(f"training {name} ...", file=sys.stderr, flush=True)
    with open(Path(args.out) / f"{name}.log", "w") as log:
        subprocess.run([*tfx, "train", RECIPES[args.model], *sets(keys), "--out", str(run)], cwd=REPO, env=env,
                       check=True, stdout=log, stderr=log)


class MemoryMass:
    """Per layer, the summed share of attention on memory keys (the first Tk - Tq keys) and the
    number of queries, from each kernel call whose keys outnumber its queries."""

    def __init__(self, model):
        self.kernels = [block.attn.kernel for block in model.stack.blocks]
        self.mass, self.queries = [0.0] * len(self.kernels), [0] * len(self.kernels)

    def __enter__(self):
        for i, kernel in enumerate(self.kernels):
            kernel.forward = self.wrap(i, kernel.forward)
        return self

    def wrap(self, i: int, forward):
        def counted(q, k, v, spec):
            out = forward(q, k, v, spec)
            memory = k.shape[2] - q.shape[2]
            if memory > 0:
                ones = torch.zeros_like(v)
                ones[:, :, :memory, 0] = 1.0
                share = forward(q, k, ones, spec)[..., 0]  # (B, H, Tq): each query's mass on memory keys
                self.mass[i] += float(share.double().mean(1).sum())
                self.queries[i] += share.shape[0] * share.shape[2]
            return out
        return counted

    def __exit__(self, *exc):
        for kernel in self.kernels:
            del kernel.forward  # back to the class's method

    def shares(self) -> list[float]:
        return [round(m / n, 4) if n else 0.0 for m, n in zip(self.mass, self.queries)]


def measure(args, name: str) -> dict:
    from tfx.evaluate import score_stream, score_stream_recurrent
    from tfx.families import get_task
    from tfx.rundir import load_run

    run = Path(args.out) / name
    recipe, tokenizer, model = load_run(run)
    ids, _ = get_task(recipe, run).token_stream(tokenizer, split="valid", data=None)
    C = recipe.model.context
    ppl = lambda nll_count: math.exp(nll_count[0] / nll_count[1])  # noqa: E731
    out = {"segments": ppl(score_stream(model, ids, context=C, stride=C)),
           "sliding": ppl(score_stream(model, ids, context=C, stride=C // 2))}
    if model.stack.recurrent:
        out["in_order"] = ppl(score_stream_recurrent(model, ids, segment=C, lanes=32))
        if recipe.model.memory.kind == "xl":
            with MemoryMass(model) as mass:
                score_stream_recurrent(model, ids, segment=C, lanes=8, max_tokens=args.mass_tokens)
            out["memory_mass"] = mass.shares()
    else:
        out["in_order"] = out["segments"]
    train_rows, _ = metrics(run)
    speeds = sorted(r["tokens_per_s"] for r in train_rows[1:]) or [train_rows[-1]["tokens_per_s"]]
    out["tokens_per_s"] = round(speeds[len(speeds) // 2])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(RECIPES), default="char")
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64])
    ap.add_argument("--positions", type=lambda s: s.split(","), default=["rope"])
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["xl"])
    ap.add_argument("--mems", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=2, help="trainings at a time, one core each")
    ap.add_argument("--mass-tokens", type=int, default=20_000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--store-tokens", type=int, default=1_000_000,
                    help="spalm: the datastore keeps the first N training tokens (IVF-PQ, nprobe 8)")
    ap.add_argument("--remeasure", action="store_true", help="measure runs that results.json already has again")
    args = ap.parse_args()
    args.out = args.out or str(REPO / "runs" / f"xl-effect-{args.model}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    controls = [(n, k) for n, k in runs if n.startswith("none-")]
    others = [(n, k) for n, k in runs if not n.startswith("none-")]
    cores = queue.Queue()
    for core in range(args.jobs):
        cores.put(core)

    def pinned(job):  # a free core for the length of one training
        core = cores.get()
        try:
            train(args, *job, core=core)
        finally:
            cores.put(core)

    for group in (controls, others):  # the controls first: spalm's datastores come from them
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(pinned, group))
    torch.set_num_threads(max(1, args.jobs))
    path = Path(args.out) / "results.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    results = {name: kept[name] if name in kept and not args.remeasure else measure(args, name) for name, _ in runs}
    path.write_text(json.dumps({**kept, **results}, indent=1) + "\n")
    print(f"{'run':<22} {'segments':>9} {'in order':>9} {'sliding':>9} {'vs none':>8} {'tok/s':>7}  memory mass by layer")
    for name, r in results.items():
        control = results[f"none-{name.split('-', 1)[1]}"]
        change = 100 * (r["in_order"] / control["segments"] - 1)
        mass = " ".join(f"{x:.3f}" for x in r.get("memory_mass", []))
        print(f"{name:<22} {r['segments']:>9.4f} {r['in_order']:>9.4f} {r['sliding']:>9.4f} {change:>+7.1f}% "
              f"{r['tokens_per_s']:>7,}  {mass}")


if __name__ == "__main__":
    main()
