"""`tfx plot`: training and validation curves of runs, from their metrics.jsonl, with matplotlib.

A run's metrics.jsonl has training rows ({"step", "loss", "lr", "tokens_per_s", "seen_tokens",
"train_time"}) and validation rows ({"step", "split": "valid", "loss", "perplexity"|"accuracy"|
"bleu", ..., "seen_tokens", "train_time"}). A curve is named `train.NAME` or `valid.NAME` (`loss`
alone: both); the x axis is the step, the tokens seen in training or the training seconds
(validation not counted; `seen_tokens` and `train_time` are logged since this command exists, an
older run's rows have only steps).
"""
from __future__ import annotations

import json
from pathlib import Path

from tfx.errors import UsageError
from tfx.rundir.files import METRICS

X_AXES = {"step": ("step", "step"), "tokens": ("seen_tokens", "tokens seen"), "time": ("train_time", "training time (s)")}
NOT_CURVES = {"step", "split", "tokens", "seen_tokens", "train_time", "examples", "early_stop", "best_step",
              "best_metric", "patience"}


def read_rows(run: Path) -> list[dict]:
    path = Path(run) / METRICS
    if not path.is_file():
        raise UsageError(f"{run}: no {METRICS} (is it a tfx run directory?)")
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a run that is still writing
    return rows


def curves(rows: list[dict]) -> dict[str, list[tuple[dict, float]]]:
    """{"train.loss": [(row, value), ...], "valid.accuracy": [...], ...}: every numeric field."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for row in rows:
        split = row.get("split", "train")
        for key, value in row.items():
            if key in NOT_CURVES or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            out.setdefault(f"{split}.{key}", []).append((row, float(value)))
    return out


def wanted(names: list[str], available: set[str]) -> list[str]:
    """`loss` -> train.loss and valid.loss (those that exist); other names as given."""
    out = []
    for name in names:
        expanded = [f"{s}.{name}" for s in ("train", "valid") if f"{s}.{name}" in available] if "." not in name \
            else [name]
        out.extend(x for x in expanded if x not in out)
    return out


def x_of(row: dict, x: str) -> float | None:
    return row.get(X_AXES[x][0])


def plot_runs(runs: list[Path], out: Path, *, names: list[str], x: str = "step", labels: list[str] | None = None,
              log_y: bool = False) -> dict:
    """Draw one panel per curve name, one line per run; returns what was drawn."""
    if x not in X_AXES:
        raise UsageError(f"--x {x!r}: expected step, tokens or time")
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"--out {out}: give a .png, .pdf or .svg file")
    labels = labels or [Path(r).name for r in runs]
    data = [curves(read_rows(r)) for r in runs]
    available = set().union(*data)
    panels = wanted(names, available)
    missing = [n for n in panels if n not in available]
    if missing or not panels:
        raise UsageError(f"no curve named {', '.join(missing or names)} in these runs; they logged: "
                         f"{', '.join(sorted(available))}")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    drawn = {}
    for ax, panel in zip(axes[0], panels):
        for label, run_curves in zip(labels, data):
            points = [(x_of(row, x), v) for row, v in run_curves.get(panel, []) if x_of(row, x) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if panel.startswith("valid.") and len(xs) < 30 else None,
                        markersize=3, label=label)
                drawn.setdefault(panel, {})[label] = len(xs)
        if panel not in drawn:
            raise UsageError(f"{panel}: no row has {x!r} to draw it against (an older run logs steps only: --x step)")
        ax.set_title(panel)
        ax.set_xlabel(X_AXES[x][1])
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn
