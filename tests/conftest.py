"""Shared fixtures: a tiny recipe, a real corpus fetched once, and the CLI run as a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A tiny model that trains in seconds on 2 cores; every test that needs a run starts here.
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=32",
    "train.batch_size=4", "train.log_every=1", "train.eval_tokens=2000", "train.threads=1",
    "train.precision=fp32", "train.schedule.warmup=2",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def run_tfx(*args: str, input: bytes | str | None = None, env: dict | None = None, cwd=None,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m tfx ARGS` as a user would; returns the process with text stdout/stderr."""
    full_env = {**os.environ, **(env or {})}
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run([sys.executable, "-m", "tfx", *args], input=data, capture_output=True, env=full_env,
                          cwd=cwd, timeout=600)
    proc.stdout = proc.stdout.decode("utf-8", errors="replace")
    proc.stderr = proc.stderr.decode("utf-8", errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"tfx {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def tfx_in_process(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`tfx ARGS` through the same entry point (tfx.cli.main) in this process: for the error paths,
    which would otherwise pay a Python and torch start-up each (argv, stdin, the environment and
    torch's thread count are restored afterwards; `input` reaches sys.stdin, not its file
    descriptor). An exception main() does not turn into an exit code propagates, so the test fails
    as a traceback would."""
    import contextlib
    import io

    import torch

    from tfx.cli import main

    out, error, saved = io.StringIO(), io.StringIO(), (sys.argv, dict(os.environ), sys.stdin)
    threads = torch.get_num_threads()  # a recipe's train.threads sets it process-wide
    sys.argv = ["tfx", *args]
    sys.stdin = io.TextIOWrapper(io.BytesIO((input or "").encode()), encoding="utf-8")
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(error):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, sys.stdin = saved[0], saved[2]
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved[1])
    return subprocess.CompletedProcess(["tfx", *args], code, out.getvalue(), error.getvalue())


@pytest.fixture(scope="module")
def one_thread():
    """torch (and faiss, which follows torch's thread count) on one thread for a module's tests:
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> Path:
    """`tfx data get shakespeare` once per session, into a private data root."""
    root = tmp_path_factory.mktemp("tfxdata")
    proc = run_tfx("data", "get", "shakespeare", env={"TFX_DATA": str(root)}, check=True)
    assert Path(proc.stdout.strip()) == root / "shakespeare"
    return root


@pytest.fixture(scope="session")
def small_text(tmp_path_factory, shakespeare) -> Path:
    """The first 60 kB of the real training split, as a standalone text file."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    text = (shakespeare / "shakespeare" / "train.txt").read_text(encoding="utf-8")
    path.write_text(text[:60_000], encoding="utf-8")
    return path
