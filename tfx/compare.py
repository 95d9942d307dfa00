"""`tfx compare RECIPE --vary KEY=V1,V2 ... --variant NAME:K=V,... (--steps N | --minutes M)`: train each
variant of a recipe under the same budget, one after another, evaluate each on the same split, and report.
--vary gives every combination of its keys' values; --variant one variant with its own set of keys.

Every variant is a `tfx train` of the recipe with its --set keys, in a process of its own (so its
peak memory is its own: the child's maximum resident set, from wait4), under OUT/<variant>/, then a
`tfx eval --json` of its best checkpoint. With --minutes, a 20-step probe of each variant measures
its seconds per step and sizes train.steps so that its schedule ends with the time (train.max_minutes
also stops it). A variant whose run is complete is not trained again; one that stopped part-way is
resumed; results are cached in OUT/compare.json, so a second call only reports.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tfx.errors import RunError, UsageError
from tfx.rundir.files import METRICS, RECIPE, STATE, atomic_write_text

PRIMARY = ("bleu", "accuracy", "perplexity", "loss")  # the first a variant's eval reports is its metric
LOWER_IS_BETTER = {"perplexity", "loss"}


@dataclass
class Variant:
    name: str
    sets: list[str]
    result: dict = field(default_factory=dict)


def parse_vary(items: list[str]) -> list[tuple[str, list[str]]]:
    """["model.attention.kind=dense,local", ...] -> [(key, [values])]; values are TOML text."""
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise UsageError(f"--vary {item!r}: expected KEY=V1,V2,... (e.g. model.attention.kind=dense,local)")
        out.append((key.strip(), [v.strip() for v in split_values(values)]))
    return out


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: `lr=1e-3,3e-3`, `betas=[0.9,0.99],[0.9,0.95]`."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


def toml_value(value: str) -> str:
    """A bare word (dense) becomes a TOML string; numbers, booleans, lists and quoted text stay."""
    import tomllib

    try:
        tomllib.loads(f"x = {value}")
        return value
    except tomllib.TOMLDecodeError:
        return json.dumps(value)


def variants(vary: list[tuple[str, list[str]]]) -> list[Variant]:
    out = []
    for combo in itertools.product(*[[(k, v) for v in values] for k, values in vary]):
        name = "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", v.strip("\"'")) for _, v in combo)
        out.append(Variant(name, [f"{k}={toml_value(v)}" for k, v in combo]))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise UsageError(f"--vary gives variants with the same name ({', '.join(names)}): make the values differ")
    return out


def parse_variants(items: list[str]) -> list[Variant]:
    """["xl:model.memory.kind=xl,model.memory.mem_len=128", "base:"] -> named variants, each with its
    own keys (comma-separated KEY=VALUE, values as in --vary; none: the recipe as it is)."""
    out = []
    for item in items:
        name, sep, body = item.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
            raise UsageError(f"--variant {item!r}: expected NAME:KEY=VALUE,KEY=VALUE,... (NAME of letters, digits, "
                             f"._+-; e.g. xl:model.memory.kind=xl,model.memory.mem_len=128)")
        pairs = [p.strip() for p in split_values(body)] if body.strip() else []
        bad = [p for p in pairs if not p.partition("=")[1] or not p.partition("=")[0].strip()]
        if bad:
            raise UsageError(f"--variant {item!r}: {bad[0]!r} is not KEY=VALUE")
        out.append(Variant(name, [f"{k.strip()}={toml_value(v.strip())}" for k, _, v in (p.partition("=")
                                                                                           for p in pairs)]))
    return out


def tfx_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tfx", *args]


def run_child(cmd: list[str], log: Path | None = None) -> tuple[int, float, str]:
    """(exit code, peak resident MiB of the child, its stderr's tail); stdout kept in `log` or returned."""
    with open(log or os.devnull, "w") as sink, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=sink if log else subprocess.PIPE, stderr=err, text=True)
        stdout = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-3000:]
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return proc.returncode, usage.ru_maxrss * scale / 2**20, stdout or tail


def seconds_per_step(recipe: str, sets: list[str], work: Path) -> float:
    """A 20-step probe of the variant (no validation, no checkpoint kept): its training seconds a step."""
    probe = work / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    args = [*sum((["--set", s] for s in sets), []), "--set", "train.steps=20", "--set", "train.eval_every=0",
            "--set", "train.save_every=0", "--set", "train.log_every=5", "--set", "train.max_minutes=5"]
    code, _, tail = run_child(tfx_cmd("train", recipe, *args, "--out", str(probe)))
    if code != 0:
        raise RunError(f"the probe of this variant failed: {tail.strip().splitlines()[-1] if tail.strip() else code}")
    rows = [json.loads(line) for line in (probe / METRICS).read_text().splitlines()]
    timed = [r for r in rows if "train_time" in r and "split" not in r]
    shutil.rmtree(probe, ignore_errors=True)
    first, last = timed[0], timed[-1]  # from the first logged step on: start-up excluded
    return (last["train_time"] - first["train_time"]) / max(1, last["step"] - first["step"])


def train_variant(recipe: str, v: Variant, run: Path, budget: dict, overrides: list[str], log: Callable) -> float:
    """Train (or resume, or leave) the variant's run; the peak MiB of its training process (0 when reused)."""
    sets = [*overrides, *v.sets]
    if budget.get("minutes"):
        per_step = seconds_per_step(recipe, sets, run.parent)
        steps = max(1, int(budget["minutes"] * 60 / per_step * 0.95))
        log(f"{v.name}: {per_step:.4g} s a step -> train.steps = {steps} for {budget['minutes']:g} minutes")
        sets += [f"train.steps={steps}", f"train.max_minutes={budget['minutes']}"]
    else:
        sets += [f"train.steps={budget['steps']}"]
    args = sum((["--set", s] for s in sets), [])
    done = (run / STATE / "LATEST").is_file() and _finished(run)
    if done:
        log(f"{v.name}: trained already ({run})")
        return 0.0
    cmd = tfx_cmd("train", "--resume", str(run), *args) if (run / RECIPE).is_file() else \
        tfx_cmd("train", recipe, *args, "--out", str(run))
    log(f"{v.name}: training ({' '.join(v.sets)}) -> {run}")
    code, peak, tail = run_child(cmd, log=run.parent / f"{v.name}.log")
    if code != 0:
        raise RunError(f"training {v.name} failed (exit {code}); see {run.parent / (v.name + '.log')}:\n{tail}")
    return peak


def _finished(run: Path) -> bool:
    """The run reached its recipe's steps, or stopped early, or by max_minutes (a complete run)."""
    from tfx.config import read_toml
    from tfx.train.checkpoint import latest_checkpoint

    trainer = json.loads((latest_checkpoint(run) / "trainer.json").read_text())
    steps = read_toml(run / RECIPE)["train"]["steps"]
    timed_out = any("max_minutes" in line for line in _log_lines(run))
    return trainer["step"] >= steps or trainer.get("early_stopped") is not None or timed_out


def _log_lines(run: Path) -> list[str]:
    log = run.parent / f"{run.name}.log"
    return log.read_text(errors="replace").splitlines() if log.is_file() else []


def evaluate_variant(run: Path, split: str) -> dict:
    code, _, out = run_child(tfx_cmd("eval", str(run), "--split", split, "--json"))
    if code != 0:
        raise RunError(f"tfx eval {run} failed: {out.strip().splitlines()[-1] if out.strip() else code}")
    return json.loads(out)


def summary(run: Path, metrics: dict, peak: float) -> dict:
    from tfx.rundir import load_run

    metric = next(m for m in PRIMARY if isinstance(metrics.get(m), (int, float)))
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    train = [r for r in rows if "split" not in r and "tokens_per_s" in r]
    speeds = sorted(r["tokens_per_s"] for r in train[1:] or train)
    params = sum(p.numel() for p in load_run(run)[2].parameters())
    return {"metric": metric, "value": metrics[metric], "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
            "steps": train[-1]["step"] if train else 0, "train_time": train[-1].get("train_time") if train else None,
            "parameters": params, "peak_mib": round(peak, 1), "eval": metrics}


def compare(recipe: str, vary: list[str], *, steps: int | None, minutes: float | None, out: Path, split: str,
            overrides: list[str], log: Callable, named: list[str] = ()) -> list[Variant]:
    """Train and evaluate the variants of --vary (every combination) and --variant (`named`, each with
    its own keys), in that order."""
    if (steps is None) == (minutes is None):
        raise UsageError("give the budget: --steps N (equal steps) or --minutes M (equal wall time), one of them")
    if not Path(recipe).is_file():
        raise UsageError(f"{recipe}: no such recipe file")
    from tfx import config as C

    todo = (variants(parse_vary(vary)) if vary else []) + parse_variants(list(named))
    if not todo:
        raise UsageError("nothing to compare: give --vary KEY=V1,V2,... and/or --variant NAME:KEY=VALUE,...")
    names = [v.name for v in todo]
    if len(set(names)) != len(names):
        raise UsageError(f"two variants are named alike ({', '.join(names)}): give --variant another NAME")
    for v in todo:  # every variant's recipe is valid before anything trains
        C.load_recipe(recipe, [*overrides, *v.sets], files=False)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "compare.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    budget = {"steps": steps} if steps else {"minutes": minutes}
    for i, v in enumerate(todo, 1):
        run = out / v.name
        key = json.dumps({"recipe": str(recipe), "sets": [*overrides, *v.sets], "budget": budget, "split": split})
        if cache.get(v.name, {}).get("key") == key and (run / RECIPE).is_file():
            v.result = cache[v.name]["result"]
            log(f"[{i}/{len(todo)}] {v.name}: measured already")
            continue
        log(f"[{i}/{len(todo)}] {v.name}")
        peak = train_variant(recipe, v, run, budget, overrides, log)
        if not peak and v.name in cache:
            peak = cache[v.name]["result"].get("peak_mib", 0.0)
        v.result = summary(run, evaluate_variant(run, split), peak)
        cache[v.name] = {"key": key, "result": v.result}
        atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    return todo


def best_of(todo: list[Variant]) -> str:
    metric = todo[0].result["metric"]
    pick = min if metric in LOWER_IS_BETTER else max
    return pick(todo, key=lambda v: v.result["value"]).name
