"""What every command module shares: messages on stderr, stdin lines, tables on stdout, the
small argument checks, and the --set option. Imports nothing else of the CLI (no cycles)."""
from __future__ import annotations

import re
import sys

import typer

from tfx.errors import UsageError

SET = typer.Option(None, "--set", help="Override a recipe key: --set train.steps=200 (value parsed as TOML).")

# Off a terminal (a pipe, a file) a table is as wide as its content: nothing is wrapped or cut.
UNBOUNDED_WIDTH = 100_000


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def out_console():
    """A rich Console for tables on stdout: the terminal's width on a terminal, otherwise wide
    enough that no cell is wrapped or cut to an ellipsis (`tfx recipe kinds | cat`)."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=UNBOUNDED_WIDTH)


def unescape(text: str) -> str:
    """Backslash escapes typed on a command line: \\n, \\t and \\\\ become newline, tab, backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def check_checkpoint(name: str) -> None:
    if name not in ("best", "last"):
        raise UsageError(f"--checkpoint {name!r}: expected best or last")


def check_split(split: str) -> None:
    if split not in ("train", "valid", "test"):
        raise UsageError(f"--split {split!r}: expected train, valid or test")


def stdin_lines():
    """Lines of stdin without their newline; invalid UTF-8 is replaced, never fatal."""
    stream = open(sys.stdin.fileno(), "r", encoding="utf-8", errors="replace", newline=None, closefd=False)
    for line in stream:
        yield line.rstrip("\n").rstrip("\r")
