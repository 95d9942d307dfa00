"""The `tfx` command line: the Typer app, its command groups, and the exit codes.

Commands are thin: they parse arguments and call tfx.run; each group lives in its own module
(data, tokenize, recipe, train, evaluate, generate, calibrate, plot, compare, convert, bench, knn), sharing only tfx.cli.common and
tfx.cli.options. stdout carries data only (generations, ids, JSON); messages, progress and
warnings go to stderr. Exit codes: 0 success, 1 runtime failure, 2 bad usage or recipe.
"""
from __future__ import annotations

import os
import sys

import typer

from tfx.cli import bench, calibrate, compare, convert, data, evaluate, generate, knn, plot, recipe, tokenize, train
from tfx.cli.common import err
from tfx.errors import TfxError

HELP = "Train, evaluate and generate with Transformer variants from a TOML recipe."

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False)


def package_version() -> str:
    """The installed distribution's version; the package's own __version__ when tfx runs from a
    source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tfx")
    except PackageNotFoundError:
        from tfx import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"tfx {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    pass


app.command()(train.train)
app.command("eval")(evaluate.eval_)
app.command()(generate.generate)
app.command()(train.average)
app.command("calibrate-exit")(calibrate.calibrate_exit)
app.command()(plot.plot)
app.command()(compare.compare)
app.command()(convert.convert)
app.add_typer(data.data_app, name="data")
app.add_typer(tokenize.tok_app, name="tokenize")
app.add_typer(recipe.recipe_app, name="recipe")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(knn.knn_app, name="knn")


def main() -> None:
    """Entry point: user errors become one message and an exit code, never a traceback.

    Typer/click itself handles usage errors (exit 2 with a hint) and --help (exit 0).
    """
    try:
        app()
    except TfxError as exc:
        err(f"tfx: error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err("tfx: interrupted")
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
