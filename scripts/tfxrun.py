"""Helpers for the comparison scripts: run the tfx CLI as a user would, read a run's metrics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tfx(*args: str, allow_fail: bool = False, progress: bool = False) -> str:
    """stdout of `python -m tfx ARGS` run from the repository; exits with its stderr on failure.
    `progress`: its stderr goes to ours as it comes (long work such as tfx compare)."""
    proc = subprocess.run([sys.executable, "-m", "tfx", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                          stderr=None if progress else subprocess.PIPE)
    if proc.returncode != 0:
        if allow_fail:
            return ""
        sys.exit(f"tfx {' '.join(args)} failed" + (f":\n{proc.stderr[-2000:]}" if proc.stderr else ""))
    return proc.stdout


def sets(values: dict) -> list[str]:
    """--set arguments for a flat {key: TOML value text} dict."""
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training log rows, validation rows) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "split" not in r], [r for r in rows if r.get("split") == "valid"]
