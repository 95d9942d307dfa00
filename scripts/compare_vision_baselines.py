"""Baselines for the vision family on Fashion-MNIST (not part of tfx): a small CNN trained for the same
wall-clock budget as a tfx run, and multinomial logistic regression on the pixels.

    python scripts/compare_vision_baselines.py --minutes 20 --threads 2 [--json]

The CNN is the "2 conv + pooling" kind the dataset's README lists (0.916 there): conv 5x5 32 ->
ReLU -> max-pool 2 -> conv 5x5 64 -> ReLU -> max-pool 2 -> linear 1024 -> ReLU -> dropout 0.5 -> 10,
AdamW 1e-3 with a cosine decay over the budget's estimated steps, batches of 128, the same
standardisation and augmentation (2-pixel shifts, flips) as recipes/vision/fashion-mnist.toml, the
checkpoint with the best validation accuracy scored on test. Logistic regression: standardised
pixels, full-batch L-BFGS with an L2 penalty picked on validation. Same splits as tfx (train 55,000,
valid = the last 5,000 of the original train, test 10,000: `tfx data get fashion-mnist`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tfx.data.images import read_npz  # noqa: E402
from tfx.tasks.vit import augment  # noqa: E402


def load(root: Path):
    sets = {s: read_npz(root / f"{s}.npz") for s in ("train", "valid", "test")}
    names = sorted(set(sets["train"].labels))
    index = {n: i for i, n in enumerate(names)}
    x = {s: torch.from_numpy(d.images).permute(0, 3, 1, 2).float() / 255 for s, d in sets.items()}
    mean, std = x["train"].mean(), x["train"].std()
    x = {s: (v - mean) / std for s, v in x.items()}
    y = {s: torch.tensor([index[n] for n in d.labels]) for s, d in sets.items()}
    return x, y


def accuracy(model, x, y, batch=1000) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return right / len(x)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 7 * 7, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, 10))


def train_cnn(x, y, minutes: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    start, probe = time.perf_counter(), None
    step, best, best_state, seen = 0, -1.0, None, 0
    steps = None  # the cosine's length, estimated from the first 20 steps' speed
    while time.perf_counter() - start < minutes * 60:
        idx = torch.randint(0, len(x["train"]), (128,), generator=g)
        batch = augment(x["train"][idx], shift=2, flip=True, generator=g)
        if steps is not None:
            for group in opt.param_groups:
                group["lr"] = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * min(1.0, step / steps)))
        loss = F.cross_entropy(model(batch), y["train"][idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step, seen = step + 1, seen + len(idx)
        if step == 20:
            probe = (time.perf_counter() - start) / 20
            steps = int(minutes * 60 / probe * 0.95)
        if step % 1000 == 0:
            acc = accuracy(model, x["valid"], y["valid"])
            if acc > best:
                best, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
    elapsed = time.perf_counter() - start
    acc = accuracy(model, x["valid"], y["valid"])
    if acc > best:
        best, best_state = acc, model.state_dict()
    model.load_state_dict(best_state)
    return {"model": "cnn (2 conv + pooling)", "steps": step, "images_per_s": seen / elapsed, "valid": best,
            "test": accuracy(model, x["test"], y["test"]), "parameters": sum(p.numel() for p in model.parameters())}


def logistic(x, y) -> dict:
    start = time.perf_counter()
    flat = {s: v.flatten(1) for s, v in x.items()}
    best = None
    for l2 in (1e-4, 1e-3, 1e-2):
        lin = nn.Linear(784, 10)
        opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(lin(flat["train"]), y["train"]) + l2 * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        valid = accuracy(lin, flat["valid"], y["valid"])
        if best is None or valid > best[0]:
            best = (valid, l2, accuracy(lin, flat["test"], y["test"]))
    return {"model": f"logistic regression (L2 {best[1]:g}, picked on valid)", "valid": best[0], "test": best[2],
            "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    x, y = load(a.data)
    rows = [logistic(x, y)] + ([] if a.skip_cnn else [train_cnn(x, y, a.minutes, a.seed)])
    for row in rows:
        print(json.dumps(row) if a.json else "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in row.items()))


if __name__ == "__main__":
    main()
