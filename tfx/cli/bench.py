"""`tfx bench ...`: speed and memory measurements, as tables, JSON, CSV and plots."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tfx.cli.common import SET, err, out_console
from tfx.cli.options import EXIT_THRESHOLD
from tfx.errors import UsageError

bench_app = typer.Typer(help="Speed and memory: a table, --json/--csv, a plot.", no_args_is_help=True)


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise UsageError(f"{what}: expected positive integers, got {text!r}")
    return values


def output_format(json_out: bool, csv_out: bool) -> str:
    if json_out and csv_out:
        raise UsageError("--json and --csv: pick one")
    return "json" if json_out else "csv" if csv_out else "table"


@bench_app.command("attention")
def bench_attention_cmd(
    kinds: Optional[str] = typer.Option(None, help="Comma-separated kinds (default: every kind for the mode)."),
    seq: str = typer.Option("256,1024,4096,16384", help="Sequence lengths."),
    mode: str = typer.Option("fwdbwd", help="fwd (inference) or fwdbwd (training)."),
    causal: bool = typer.Option(True, "--causal/--bidirectional", help="Causal masks (decoder) or not."),
    batch: int = typer.Option(1, min=1), heads: int = typer.Option(4, min=1),
    d_head: int = typer.Option(64, "--d-head", min=1),
    dtype: str = typer.Option("fp32", help="fp32 or bf16."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    repeats: int = typer.Option(3, min=1, help="Timed calls per point (after one warm-up); the median is shown."),
    budget: float = typer.Option(8.0, help="Memory budget per kind in GiB; beyond it a point is 'over budget'."),
    max_seconds: float = typer.Option(60.0, help="A point slower than this per call ends that kind's sweep."),
    param: Optional[List[str]] = typer.Option(None, help="Kernel parameter: --param local.window=128."),
    json_out: bool = typer.Option(False, "--json", help="JSON rows on stdout."),
    csv_out: bool = typer.Option(False, "--csv", help="CSV rows on stdout."),
    plot: Optional[Path] = typer.Option(None, help="Write a log-log plot of time and memory against T."),
    grid: Optional[str] = typer.Option(None, help="Patch grids instead of --seq, e.g. 64x64,128x128 (images: "
                                       "T = rows x cols, bidirectional); window attention needs one."),
):
    """Time and memory of attention kernels alone (random q, k, v; B x heads x T x d_head) against
    sequence length (or patch grid): median ms, tokens/s and peak memory per kind and length."""
    from tfx.bench.attention import BenchSettings, bench_attention, kernels_for
    from tfx.bench.report import loglog_plot
    from tfx.config import parse_value, validate_kind
    from tfx.registry import ATTENTION

    fmt = output_format(json_out, csv_out)
    if mode not in ("fwd", "fwdbwd"):
        raise UsageError(f"--mode {mode!r}: expected fwd or fwdbwd")
    if dtype not in ("fp32", "bf16"):
        raise UsageError(f"--dtype {dtype!r}: expected fp32 or bf16")
    grids = grid_list(grid) if grid else None
    if grids:
        causal = False  # a grid of image patches attends both ways
    usable = kernels_for(causal, grid=bool(grids))
    chosen = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else usable
    for k in chosen:
        if k not in ATTENTION:
            raise UsageError(f"--kinds: {ATTENTION.unknown_message(k)}")
        if k not in usable:
            raise UsageError(f"--kinds: {k!r} " + ("needs a patch grid (--grid 64x64)" if ATTENTION.get(k).needs_grid
                                                   and not grids else f"cannot run {'causal' if causal else 'bidirectional'}"))
    params: dict = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        kind, dot, name = key.partition(".")
        if not sep or not dot or kind not in ATTENTION:
            raise UsageError(f"--param {item!r}: expected KIND.KEY=VALUE with a known kind")
        params.setdefault(kind, {})[name] = parse_value(value)
    for kind, values in params.items():
        validate_kind(ATTENTION, {"kind": kind, **values}, f"--param {kind}")
    settings = BenchSettings(seqs=int_list(seq, "--seq"), mode=mode, causal=causal, batch=batch, heads=heads,
                             d_head=d_head, dtype=dtype, device=device, repeats=repeats, budget_gib=budget,
                             max_seconds=max_seconds, params=params, grids=grids)
    rows = bench_attention(chosen, settings, log=err)
    show_rows(rows, ["kind", *(["grid"] if grids else []), "T", "ms", "tokens_per_s", "peak_mib", "status"], fmt=fmt,
              title=f"attention {mode}, {'causal' if causal else 'bidirectional'}, B={batch} H={heads} D={d_head} {dtype}")
    if plot is not None:
        loglog_plot(rows, x="T", panels=[("ms", "median ms per call"), ("peak_mib", "peak MiB")], series="kind",
                    path=plot, title=f"attention {mode} ({'causal' if causal else 'bidirectional'})")
        err(f"plot written to {plot}")


def grid_list(text: str) -> list[tuple[int, int]]:
    """"64x64,128x96" -> [(64, 64), (128, 96)]."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        rows, sep, cols = item.lower().partition("x")
        if not sep or not rows.isdigit() or not cols.isdigit() or int(rows) < 1 or int(cols) < 1:
            raise UsageError(f"--grid {item!r}: expected ROWSxCOLS, e.g. 64x64")
        out.append((int(rows), int(cols)))
    if not out:
        raise UsageError("--grid: give at least one ROWSxCOLS")
    return out


def show_rows(rows: list[dict], columns: list[str], *, title: str, fmt: str) -> None:
    """Rows as JSON, CSV or a table; off a terminal the table is as wide as its cells."""
    from tfx.bench.report import emit

    emit(rows, columns, title=title, fmt=fmt, console=out_console() if fmt == "table" else None)


def _emit_row(row: dict, fmt: str, title: str) -> None:
    """One result: a JSON object, a CSV row, or a key/value table."""
    if fmt == "json":
        import json

        print(json.dumps(row, indent=1))
    elif fmt == "csv":
        show_rows([row], list(row), title=title, fmt="csv")
    else:
        show_rows([{"key": k, "value": v} for k, v in row.items()], ["key", "value"], title=title, fmt="table")


@bench_app.command("train")
def bench_train_cmd(
    recipe: Path = typer.Argument(..., help="A recipe (TOML); its data must be on disk or fetchable."),
    overrides: Optional[List[str]] = SET,
    steps: int = typer.Option(20, min=1, help="Timed optimizer steps."),
    warmup: int = typer.Option(3, min=1, help="Untimed steps first (allocator, caches, autotuning)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    csv_out: bool = typer.Option(False, "--csv", help="One CSV row on stdout."),
    profile: Optional[Path] = typer.Option(None, help="After the timed steps, profile 10 more with torch.profiler: "
                                                      "a table of the costliest operators on stderr, and a Chrome "
                                                      "trace written to this file (chrome://tracing, Perfetto)."),
):
    """Time the recipe's real training step: tokens/s, ms/step (median, min, max), the wait for
    data, peak RSS, model FLOPs per token (counted) and MFU against a matmul ceiling measured here
    at the same precision. Nothing is saved but the --profile trace."""
    from tfx.bench.train import bench_train

    fmt = output_format(json_out, csv_out)
    if profile is not None and not profile.parent.is_dir():
        raise UsageError(f"--profile {profile}: no such directory {profile.parent}")
    row = bench_train(str(recipe), overrides=list(overrides or []), steps=steps, warmup=warmup, log=err,
                      profile=str(profile) if profile else None)
    _emit_row(row, fmt, f"train step: {row['recipe']} ({row['precision']}, {row['device']})")


@bench_app.command("generate")
def bench_generate_cmd(
    run: Path = typer.Argument(..., help="A trained lm run directory."),
    batch: int = typer.Option(1, min=1, help="Prompts decoded together."),
    prompt_len: int = typer.Option(64, "--prompt-len", min=1, help="Prompt tokens per row."),
    new_tokens: int = typer.Option(256, "--new-tokens", min=2, help="Tokens generated per row (greedy)."),
    repeats: int = typer.Option(3, min=1, help="Timed generations (after one warm-up); medians are shown."),
    precision: str = typer.Option("fp32", help="fp32, bf16 (autocast), fp16 (GPU) or auto (bf16 where native)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    checkpoint: str = typer.Option("best", help="best or last."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile the decode step (default: the recipe's generate.compile)."),
    exit_threshold: Optional[float] = EXIT_THRESHOLD,
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    csv_out: bool = typer.Option(False, "--csv", help="One CSV row on stdout."),
):
    """Prefill and decode speed of a trained LM with its KV cache: prefill tokens/s, decode tokens/s
    and ms per token (greedy, batch B, fixed random prompts). A CALM run decoding with early exits is
    timed without them too, alternately: the speed-up and mean layers used."""
    from tfx.bench.generate import bench_generate

    fmt = output_format(json_out, csv_out)
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"--precision {precision!r}: expected auto, fp32, bf16 or fp16")
    row = bench_generate(str(run), batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                         precision=precision, device=device, checkpoint=checkpoint, log=err,
                         compile=compile, exit_threshold=exit_threshold)
    _emit_row(row, fmt, f"generate: {run} (batch {batch}, {precision}, {row['device']})")
