"""Progress of long work: a rich bar on a terminal, plain periodic lines otherwise (stderr only)."""
from __future__ import annotations

import sys
import time
from typing import Callable


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Step counter with loss, lr, tokens/s and ETA."""

    def __init__(self, *, total: int, start: int, log: Callable[[str], None], interactive: bool | None = None):
        self.total, self.start, self.log = total, start, log
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.t0 = time.perf_counter()
        self._bar = None

    def __enter__(self):
        if self.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, *, loss: float, lr: float, tokens_per_s: float) -> None:
        info = f"loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
            return
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = _eta((self.total - step) / rate) if rate > 0 else "?"
        self.log(f"step {step}/{self.total} | {info} | eta {eta}")

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
