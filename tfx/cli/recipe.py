"""`tfx recipe show|check|kinds`: the resolved recipe, validation, and the support matrix."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from tfx.cli.common import SET, err, out_console
from tfx.errors import UsageError

recipe_app = typer.Typer(help="Show and check recipes.", no_args_is_help=True)

UNSET = "(unset)"


def show_toml(recipe) -> str:
    """The resolved recipe as TOML with every key: a key whose value is None (unset: the code
    picks, e.g. d_ff = 4·d_model) is a comment line `# key = (unset)` in its table, so the text
    stays a recipe that loads back to the same recipe. Values are written by tfx.config.to_toml."""
    return _render(recipe.model_dump(mode="json"), "")


def _render(data: dict, prefix: str) -> str:
    from tfx.config import to_toml

    lines = [f"# {key} = {UNSET}" if value is None else to_toml({key: value}).strip()
             for key, value in data.items() if not isinstance(value, dict)]
    parts = [(f"[{prefix}]\n" if prefix else "") + "\n".join(lines)] if lines or not prefix else []
    parts += [_render(value, f"{prefix}.{key}" if prefix else key)
              for key, value in data.items() if isinstance(value, dict)]
    return "\n\n".join(p for p in parts if p.strip()) + ("\n" if not prefix else "")


@recipe_app.command("show")
def recipe_show(recipe: Path, set_: Optional[List[str]] = SET):
    """Print the resolved recipe (defaults filled in, overrides applied) as TOML."""
    from tfx.config import load_recipe

    print(show_toml(load_recipe(recipe, set_ or [], files=False)), end="")


@recipe_app.command("check")
def recipe_check(paths: List[Path] = typer.Argument(..., help="Recipe files or folders (searched for *.toml).")):
    """Validate recipes; exits 2 if any is invalid."""
    from tfx.config import load_recipe

    files = [f for p in paths for f in (sorted(p.rglob("*.toml")) if p.is_dir() else [p])]
    if not files:
        raise UsageError(f"no recipes found in {', '.join(map(str, paths))}")
    bad = 0
    for f in files:
        try:
            load_recipe(f)
            err(f"ok    {f}")
        except UsageError as exc:
            bad += 1
            err(f"FAIL  {exc}")
    if bad:
        raise typer.Exit(2)


@recipe_app.command("kinds")
def recipe_kinds(json_out: bool = typer.Option(False, "--json", help="One JSON object instead of tables.")):
    """The support matrix: every attention kind (exact? causal, bidirectional, KV cache, bias,
    padding, complexity, the position schemes it takes), every position scheme and memory kind."""
    from rich.table import Table

    from tfx.config import import_kinds
    from tfx.kinds import attention_rows, memory_rows, position_rows

    import_kinds()
    attn, pos, memory = attention_rows(), position_rows(), memory_rows()
    if json_out:
        print(json.dumps({"attention": attn, "position": pos, "memory": memory}, indent=1))
        return
    mark = {True: "yes", False: "-"}
    table = Table("kind", "exact", "causal", "bidir", "cache", "bias", "padding", "time", "positions", "about",
                  title="model.attention.kind")
    for r in attn:
        table.add_row(r["kind"], *(mark[r[k]] for k in ("exact", "causal", "bidirectional", "cache", "bias",
                                                          "padding")),
                      r["complexity"], ", ".join(r["positions"]), r["about"])
    console = out_console()
    console.print(table)
    table = Table("kind", "hooks", "extrapolates", "needs", "about", title="model.position.kind")
    for r in pos:
        table.add_row(r["kind"], ", ".join(r["hooks"]), mark[r["extrapolates"]],
                      ", ".join(n.removeprefix("supports_") for n in r["needs"]) or "-", r["about"])
    console.print(table)
    table = Table("kind", "families", "needs", "about", title="model.memory.kind")
    for r in memory:
        table.add_row(r["kind"], ", ".join(r["families"]), r["needs"], r["about"])
    console.print(table)
