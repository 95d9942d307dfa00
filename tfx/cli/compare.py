"""`tfx compare RECIPE --vary KEY=V1,V2 ... --steps N | --minutes M` (tfx/compare.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from tfx.cli.common import SET, err, out_console


def compare(
    recipe: Path = typer.Argument(..., help="Recipe TOML whose variants to train."),
    vary: Optional[List[str]] = typer.Option(None, "--vary", help="KEY=V1,V2,...: one key's values (repeat for more "
                                             "keys; every combination is a variant). Values are TOML; a bare word is "
                                             "a string."),
    variant: Optional[List[str]] = typer.Option(None, "--variant", help="NAME:KEY=VALUE,KEY=VALUE,...: one variant "
                                                "with its own keys (repeat; after --vary's). NAME: alone is the "
                                                "recipe as it is."),
    steps: Optional[int] = typer.Option(None, min=1, help="Equal steps for every variant (train.steps)."),
    minutes: Optional[float] = typer.Option(None, min=0.05, help="Equal training time for every variant: a probe "
                                            "sizes each one's train.steps (and train.max_minutes caps it)."),
    out: Optional[Path] = typer.Option(None, help="Folder of the variants' runs (default runs/compare/<recipe name>); "
                                       "a second call resumes or reuses them."),
    split: str = typer.Option("valid", help="Split every variant is evaluated on."),
    set_: Optional[List[str]] = SET,
    plot: Optional[str] = typer.Option(None, help="Picture of the curves (default OUT/curves.png; '' for none)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Train each variant of RECIPE under the same budget, one after another, and compare them.

    tfx compare recipes/lm/shakespeare-char.toml --vary model.attention.kind=dense,local,linear \\
        --vary model.position.kind=rope,alibi --minutes 5
    tfx compare recipes/lm/shakespeare-char.toml --variant base: \\
        --variant xl:model.memory.kind=xl,model.memory.mem_len=128 --steps 2000

    Reports, per variant, the split's metric (BLEU, accuracy or perplexity), training tokens/s,
    parameters and the training process's peak memory, and draws the curves (tfx plot).
    """
    from tfx.cli.common import check_split
    from tfx.compare import best_of
    from tfx.compare import compare as run_compare
    from tfx.config import read_toml

    check_split(split)
    folder = out or Path("runs") / "compare" / str(read_toml(recipe).get("name", recipe.stem))
    todo = run_compare(str(recipe), vary or [], named=variant or [], steps=steps, minutes=minutes, out=folder, split=split,
                       overrides=set_ or [], log=err)
    picture = None if plot == "" else Path(plot) if plot else folder / "curves.png"
    if picture is not None:
        draw(todo, folder, picture, x="time" if minutes else "step")
    best = best_of(todo)
    if json_out:
        print(json.dumps({"out": str(folder), "split": split, "best": best, "plot": str(picture) if picture else None,
                          "variants": [{"name": v.name, "sets": v.sets, **v.result} for v in todo]}))
        return
    from rich.table import Table

    metric = todo[0].result["metric"]
    table = Table(title=f"{recipe} on {split}, {'%g minutes' % minutes if minutes else f'{steps} steps'} each")
    for col in ("variant", metric, "tokens/s", "steps", "parameters", "peak MiB"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in todo:
        r = v.result
        table.add_row(("* " if v.name == best else "") + v.name, f"{r['value']:.4f}",
                      f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-", f"{r['steps']:,}",
                      f"{r['parameters']:,}", f"{r['peak_mib']:,.0f}" if r["peak_mib"] else "-")
    out_console().print(table)


def draw(todo, folder: Path, picture: Path, x: str) -> None:
    from tfx.errors import UsageError
    from tfx.plot import plot_runs

    metric = todo[0].result["metric"]
    names = ["loss"] + ([f"valid.{metric}"] if metric != "loss" else [])
    runs = [folder / v.name for v in todo]
    try:
        plot_runs(runs, picture, names=names, x=x)
    except UsageError:  # the split's metric is not logged in training (e.g. BLEU without eval_bleu)
        plot_runs(runs, picture, names=["loss"], x=x)
    err(f"curves: {picture}")
