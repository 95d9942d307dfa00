"""Starting the ranks of a data parallel run, and losing one.

`launch` is `tfx train --nproc N`: torch's elastic launcher (what `torchrun --standalone` runs),
called in this process rather than as a `torchrun` subprocess, so that tfx reads the failures as
data (rank, exit code or signal) instead of printing torchrun's ChildFailedError report, and the
ranks keep this process's stderr (a terminal stays a terminal: the progress bar works).

`lost_contact` runs inside each rank around the process group: a collective that fails because a
peer died (a reset connection) or hangs (no reply within TFX_DIST_TIMEOUT) becomes one RunError
line naming the last checkpoint, exit 1, never a traceback. When a rank dies, the launcher sends
the others SIGTERM at about the moment their collective fails; the guard keeps that signal from
cutting the rank's message short.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

from tfx.errors import RunError, UsageError

_NETWORK = re.compile(r"\bgloo\b|\bnccl\b|ProcessGroup|Connection (?:reset|closed) by peer|Broken pipe", re.I)
_TIMEOUT = re.compile(r"timed out|timeout", re.I)
_RESET = re.compile(r"Connection (?:reset|closed|refused)|Broken pipe", re.I)


def collective_failure(exc: BaseException) -> str | None:
    """A short cause when `exc` is a failed collective (torch.distributed's errors, gloo's and NCCL's
    RuntimeErrors), else None."""
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    dist_error = type(exc).__name__ in ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")
    if not (dist_error or _NETWORK.search(text)):
        return None
    if _TIMEOUT.search(text):
        from tfx.train.distributed import TIMEOUT_ENV

        return f"no reply within {TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV, '1800')}s: another rank hangs or is gone"
    if _RESET.search(text):
        return "connection reset by peer: another rank ended"
    first = re.sub(r"^\[[^\]]*\]\s*", "", (text.strip().splitlines() or [type(exc).__name__])[0])
    return first.split(". ")[0][:120]


def kept(run_dir: Path, resume: str) -> str:
    """What the run directory still offers, and the command that continues it."""
    from tfx.rundir.files import RECIPE
    from tfx.train.checkpoint import latest_checkpoint

    try:
        step = int(latest_checkpoint(run_dir).name.removeprefix("ckpt-"))
    except (RunError, ValueError):
        if (Path(run_dir) / RECIPE).is_file():
            return f"no checkpoint was saved yet; {resume} starts the run again"
        return "no checkpoint was saved yet"
    return f"the last checkpoint (step {step}) is kept: {resume}"


@contextlib.contextmanager
def lost_contact(run_dir: Path):
    """Under torchrun (world > 1): a failed collective becomes `rank R: lost contact with the other
    ranks (cause); the last checkpoint (step N) is kept: tfx train --resume RUN` (a RunError, exit 1).
    A SIGTERM that arrives while that failure unwinds is ignored (the rank is on its way out); one at
    any other moment outside the training loop (whose StopFlag catches it) ends the rank as before."""
    from tfx.train import distributed as dist

    if dist.world() <= 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous

    def on_term(signum, frame):
        unwinding = sys.exc_info()[1]
        if unwinding is not None and collective_failure(unwinding):
            return
        signal.signal(signum, previous)
        os.kill(os.getpid(), signum)  # what it would have done without this guard

    signal.signal(signal.SIGTERM, on_term)
    failed = False
    try:
        yield
    except Exception as exc:
        cause = collective_failure(exc)
        if cause is None:
            raise
        failed = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exiting 1 now: let the message out
        resume = f"tfx train --resume {shlex.quote(str(run_dir))}"
        raise RunError(f"rank {dist.rank()}: lost contact with the other ranks ({cause}); "
                       f"{kept(run_dir, resume)}") from None
    finally:
        if not failed:
            signal.signal(signal.SIGTERM, previous)


def _how(failure) -> str:
    """How a rank's process ended: `was killed by SIGKILL`, `was stopped (SIGTERM)`, `exited with code 1`."""
    if failure.exitcode < 0:
        name = failure.signal_name()
        return f"was stopped ({name})" if name == "SIGTERM" else f"was killed by {name}"
    return f"exited with code {failure.exitcode}"


def _order(item) -> tuple:
    """Which failure came first: torch's launcher stamps them to the second, so within a second a
    signal other than its own SIGTERM (the cause) before an exit code, before a SIGTERM (its doing)."""
    rank, f = item
    kind = 0 if f.exitcode < 0 and f.signal_name() != "SIGTERM" else 1 if f.exitcode > 0 else 2
    return f.timestamp, kind, rank


def first_failure(failures: dict) -> tuple:
    """(rank, failure) of the rank that failed first, from the launcher's {rank: ProcessFailure}."""
    return min(failures.items(), key=_order)


def summary(failures: dict, run_dir: Path, nproc: int) -> str:
    """One line for a failed launch: the rank that failed first, how the others ended, and what the
    run directory still offers."""
    (first, failure), *others = sorted(failures.items(), key=_order)
    then = ", ".join(f"rank {r} {_how(f)}" for r, f in others)
    resume = f"tfx train --nproc {nproc} --resume {shlex.quote(str(run_dir))}"
    return f"rank {first} {_how(failure)}{f' (then {then})' if then else ''}; {kept(run_dir, resume)}"


def launch(nproc: int, recipe: Path | None, sets: list[str], out: Path | None, resume: Path | None) -> int:
    """`tfx train` again on N ranks of this node (torchrun's `--standalone --nproc-per-node N`), the
    same arguments less --nproc; each rank gets cores / N threads unless train.threads says otherwise.
    The recipe is checked here first, so a batch that does not divide is refused before any start.
    Returns the exit code (0; 2 when the ranks refused the input and said why; 128 + signal when the
    launcher was stopped and passed the signal on); a failed rank raises a RunError with `summary`."""
    import logging
    import uuid

    from tfx import config as C
    from tfx.train import distributed as dist

    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: expected a positive number of processes")
    if "RANK" in os.environ:
        raise UsageError("--nproc starts the ranks itself, as torchrun does; under torchrun, leave it out")
    if recipe is None and resume is None:
        raise UsageError("give a RECIPE to train, or --resume RUN")
    if recipe is not None:
        loaded = C.load_recipe(str(recipe), sets)
        dist.check_recipe(loaded, nproc)
        run_dir = Path(out or Path("runs") / loaded.name)
    else:
        if (resume / "recipe.toml").is_file():
            dist.check_recipe(C.load_recipe(str(resume / "recipe.toml"), sets), nproc)
        run_dir = Path(resume)
    args = [str(recipe)] if recipe is not None else []
    for item in sets:
        args += ["--set", item]
    if out is not None:
        args += ["--out", str(out)]
    if resume is not None:
        args += ["--resume", str(resume)]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the ranks inherit it

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    logging.disable(logging.CRITICAL)  # the agent's own log lines: tfx reports the outcome itself
    try:
        elastic_launch(config, sys.executable)("-m", "tfx", "train", *args)
    except ChildFailedError as exc:
        if first_failure(exc.failures)[1].exitcode == UsageError.exit_code:
            return UsageError.exit_code  # the ranks refused the input (a run already there, ...) and said why
        raise RunError(summary(exc.failures, run_dir, nproc)) from None
    except SignalException as exc:  # passed on to the ranks, which saved (rank 0 said so)
        name = exc.sigval.name
        print("tfx: interrupted" if name == "SIGINT" else f"tfx: stopped by {name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    finally:
        logging.disable(logging.NOTSET)
        shutil.rmtree(config.logs_specs.root_log_dir, ignore_errors=True)  # the agent's (empty) log folders
    return 0
