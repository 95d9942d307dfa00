#!/usr/bin/env python
"""tfx's dense attention kernel against a raw F.scaled_dot_product_attention call on the same
q, k, v: alternating calls, median ms of each and their ratio (the target is within 1.1x).

    python scripts/compare_sdpa.py [--seq 64,256,1024] [--batch 8] [--heads 4] [--d-head 32] [--repeats 30]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfx.config import import_kinds  # noqa: E402
from tfx.nn.attention.base import AttnSpec  # noqa: E402
from tfx.registry import ATTENTION  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="64,256,1024")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-head", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    import_kinds()
    print(f"{'T':>6} {'mode':>7} {'causal':>7} {'sdpa ms':>9} {'tfx ms':>9} {'ratio':>7}")
    for T in (int(x) for x in args.seq.split(",")):
        kernel = ATTENTION.build(ATTENTION.config_model("dense")(), n_heads=args.heads, d_head=args.d_head, max_len=T)
        pos = torch.arange(T)
        for mode in ("fwd", "fwdbwd"):
            for causal in (True, False):
                kernel.train(mode == "fwdbwd")
                q, k, v = (torch.randn(args.batch, args.heads, T, args.d_head, requires_grad=mode == "fwdbwd")
                           for _ in range(3))
                spec = AttnSpec(q_pos=pos, k_pos=pos, causal=causal)

                def run(f):
                    if mode == "fwd":
                        with torch.no_grad():
                            f()
                    else:
                        f().sum().backward()

                raw = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                ours = lambda: kernel(q, k, v, spec)  # noqa: E731
                times = {"raw": [], "ours": []}
                for _ in range(3):
                    run(raw), run(ours)
                for _ in range(args.repeats):  # alternate, so the machine's drift hits both
                    times["raw"].append(timed(lambda: run(raw)))
                    times["ours"].append(timed(lambda: run(ours)))
                a, b = statistics.median(times["raw"]) * 1000, statistics.median(times["ours"]) * 1000
                print(f"{T:>6} {mode:>7} {str(causal):>7} {a:>9.3f} {b:>9.3f} {b / a:>6.3f}x")


if __name__ == "__main__":
    main()
