"""Bench results out: a rich table on the terminal, JSON or CSV on stdout, a log-log plot."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def emit(rows: list[dict], columns: list[str], *, title: str, fmt: str = "table", console=None) -> None:
    """Rows as JSON, CSV or a rich table; `console` is the rich Console the table goes to (the
    CLI passes one that never cuts a cell when stdout is not a terminal)."""
    if fmt == "json":
        print(json.dumps(rows, indent=1))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns, title=title)
        for r in rows:
            table.add_row(*(_cell(r.get(c)) for c in columns))
        (console or Console(highlight=False)).print(table)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def loglog_plot(rows: list[dict], *, x: str, panels: list[tuple[str, str]], series: str, path: Path,
                title: str) -> None:
    """One log-log panel per (column, label), a line per value of `series`; rows without a value skip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    names = list(dict.fromkeys(r[series] for r in rows))
    colors = plt.get_cmap("tab20")
    for ax, (column, label) in zip(axes if len(panels) > 1 else [axes], panels):
        for i, name in enumerate(names):  # 20 colours and 4 markers: no two lines look alike
            pts = [(r[x], r[column]) for r in rows if r[series] == name and r.get(column)]
            if pts:
                ax.plot(*zip(*pts), marker="osD^"[i % 4], color=colors(i % 20), label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes_list = axes if len(panels) > 1 else [axes]
    axes_list[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
