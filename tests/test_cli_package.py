"""The CLI as a package: --version, shell completion, the command list, complete tables off a
terminal, `recipe show` with every key, and no import cycle. (Bad decoding options, which need a
run: tests/test_cli.py.)"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_tfx, tfx_in_process
from tfx import config as C

RECIPES = sorted((REPO / "recipes").rglob("*.toml"))
COMMANDS = ["train", "eval", "generate", "average", "plot", "compare", "convert", "data", "tokenize", "recipe", "bench", "knn"]


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    proc = tfx_in_process("--version")
    assert proc.returncode == 0 and proc.stdout == f"tfx {version('tfx')}\n" == "tfx 0.1.0\n"


def _complete(words: str, cword: int) -> subprocess.CompletedProcess:
    """What the installed bash completion script asks `tfx` for (a program named tfx, as the
    console script is; click derives the variable _TFX_COMPLETE from that name)."""
    env = {**os.environ, "_TFX_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    return subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'tfx'; from tfx.cli import main; main()"],
                          capture_output=True, text=True, env=env, timeout=120)


def test_shell_completion_is_on():
    helped = tfx_in_process("--help")
    assert "--install-completion" in helped.stdout and "--show-completion" in helped.stdout
    proc = _complete("tfx rec", 1)
    assert proc.returncode == 0 and proc.stdout.split() == ["recipe"], proc.stderr
    assert _complete("tfx recipe ", 2).stdout.split() == ["show", "check", "kinds"]


def test_help_lists_every_command_and_each_explains_itself():
    top = tfx_in_process("--help")
    assert top.returncode == 0
    listed = [m.group(1) for line in top.stdout.splitlines() if (m := re.match(r"│ ([a-z]+)  ", line))]
    assert listed == COMMANDS
    for command in COMMANDS:
        proc = tfx_in_process(command, "--help")
        assert proc.returncode == 0 and "Usage:" in proc.stdout and len(proc.stdout.splitlines()) > 6, command


def test_recipe_kinds_through_a_pipe_is_complete():
    """stdout a pipe (not a terminal): full width, every cell whole, never an ellipsis."""
    from tfx.kinds import attention_rows, memory_rows, position_rows

    C.import_kinds()
    out = run_tfx("recipe", "kinds", check=True).stdout
    assert "…" not in out
    lines = out.splitlines()
    for rows in (attention_rows(), position_rows(), memory_rows()):
        for r in rows:
            assert any(line.startswith(f"│ {r['kind']} ") for line in lines), r["kind"]
            assert r["about"] in out, r["kind"]  # on one line: not wrapped either


def test_eval_tables_off_a_terminal_are_complete():
    from tfx.cli.evaluate import print_result

    labels = ["a-rather-long-label-name-number-one", "another-quite-long-label-name-two"]
    per_class = {name: {"precision": 0.5, "recall": 0.25, "f1": 0.333, "support": 12} for name in labels}
    result = {"accuracy": 0.5, "macro_f1": 0.3333, "per_class": per_class, "labels": labels,
              "confusion": [[3, 9], [3, 9]]}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_result(result)
    text = out.getvalue()
    assert "…" not in text and all(text.count(name) == 3 for name in labels)  # per class, header, row


def _unset_keys(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(table, key) of every None value of a recipe's model_dump()."""
    found = []
    for key, value in data.items():
        if value is None:
            found.append((prefix, key))
        elif isinstance(value, dict):
            found += _unset_keys(value, f"{prefix}.{key}" if prefix else key)
    return found


def _tables(text: str) -> dict[str, list[str]]:
    tables, current = {"": []}, ""
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
            tables[current] = []
        elif line:
            tables[current].append(line)
    return tables


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_show_prints_every_key_and_loads_back(path, tmp_path):
    recipe = C.load_recipe(path, files=False)
    proc = tfx_in_process("recipe", "show", str(path))
    assert proc.returncode == 0, proc.stderr
    tables = _tables(proc.stdout)
    unset = _unset_keys(recipe.model_dump(mode="json"))
    assert ("model", "d_ff") in unset or recipe.model.d_ff is not None
    for table, key in unset:
        assert f"# {key} = (unset)" in tables[table], (table, key)
    # what is set is exactly what the run directory's recipe.toml holds
    assert [x for x in proc.stdout.splitlines() if x and not x.startswith("#")] == \
        [x for x in C.to_toml(C.recipe_dict(recipe)).splitlines() if x]
    again = tmp_path / "shown.toml"
    again.write_text(proc.stdout)
    assert C.load_recipe(again, files=False) == recipe


def test_recipe_show_unset_keys_cover_the_documented_ones():
    proc = tfx_in_process("recipe", "show", str(REPO / "recipes/lm/shakespeare-char.toml"))
    tables = _tables(proc.stdout)
    for table, key in [("", "init_from"), ("model", "n_kv_heads"), ("model", "d_ff"), ("model", "d_head"),
                       ("model", "encoder_layers"), ("model", "decoder_layers"), ("generate", "top_k"),
                       ("train", "max_minutes"), ("data", "train"), ("data", "valid"), ("data", "test")]:
        assert f"# {key} = (unset)" in tables[table], (table, key)


def test_cli_modules_import_no_cycle():
    """The command modules import only tfx.cli.common / tfx.cli.options; only app.py (and the
    package's __init__) import the command modules."""
    root = REPO / "tfx" / "cli"
    graph = {}
    for path in root.glob("*.py"):
        name = "tfx.cli" if path.stem == "__init__" else f"tfx.cli.{path.stem}"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tfx.cli"):
                deps |= {node.module} if node.module != "tfx.cli" else {f"tfx.cli.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("tfx.cli")}
        graph[name] = deps - {name}

    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m)]
    assert graph["tfx.cli.common"] == set() and graph["tfx.cli.options"] == set()
    assert all(len(Path(root / f"{m.rsplit('.', 1)[-1]}.py").read_text().splitlines()) <= 400
               for m in graph if m != "tfx.cli")
