"""The `tfx` command line as a package: `app` (tfx.cli.app) and one module per command group.

`main` is the console script's entry point (pyproject: tfx = "tfx.cli:main") and `python -m tfx`'s.
"""
from tfx.cli.app import app, main

__all__ = ["app", "main"]
