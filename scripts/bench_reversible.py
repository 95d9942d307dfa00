"""Activation memory of reversible layers against the usual stack, by depth (issue 20).

    python scripts/bench_reversible.py [--layers 4,8,16] [--batch 8] [--context 512] [--d-model 128]

For each depth, one training forward of a char-LM-shaped model (tfx's own stack, random tokens) with
`model.reversible` off and on, counting the bytes autograd saves for the backward pass
(torch.autograd.graph.saved_tensors_hooks: every tensor packed for backward, weights excluded, as a
weight is stored anyway). That is the activation memory, exact and the same on any device; peak RSS
(`tfx bench train`) adds the allocator's behaviour to it. The reversible stack saves its two final
streams and nothing per layer; its backward pass holds one sublayer's activations at a time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tfx.config import import_kinds, validate  # noqa: E402
from tfx.families import build_model  # noqa: E402


def saved_bytes(model, batch: dict) -> int:
    """Bytes of the non-parameter tensors autograd keeps for the backward pass of one forward."""
    weights = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        if t.data_ptr() not in weights:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = model.loss(batch)
    loss.backward()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,8,16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import_kinds()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 65, (args.batch, args.context + 1), generator=g)
    batch = {"input": tokens[:, :-1], "target": tokens[:, 1:]}
    rows = []
    for layers in map(int, args.layers.split(",")):
        row = {"layers": layers}
        for reversible in (False, True):
            recipe = validate({"data": {"train": "x.txt"},
                               "model": {"d_model": args.d_model, "n_layers": layers, "n_heads": 4,
                                         "context": args.context, "position": {"kind": "rope"},
                                         "reversible": reversible}})
            torch.manual_seed(0)
            model = build_model(recipe, vocab_size=65).train()
            row["reversible_mib" if reversible else "standard_mib"] = round(saved_bytes(model, batch) / 2**20, 1)
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'layers':>6} {'standard MiB':>13} {'reversible MiB':>15}")
    for r in rows:
        print(f"{r['layers']:>6} {r['standard_mib']:>13} {r['reversible_mib']:>15}")


if __name__ == "__main__":
    main()
