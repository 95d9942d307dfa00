"""Options that `tfx eval` and `tfx generate` share: the kNN-LM's settings and the attention-sink
cache. The decoding options (--temperature, --top-p, --beam, ...) are not checked here: tfx.run
validates them once, with the run's [generate] table, through the recipe's GenerateConfig
(tfx.config.generate_settings), and a bad one is a usage error naming its option."""
from __future__ import annotations

import typer

from tfx.errors import UsageError

STREAM_WINDOW = typer.Option(None, "--stream-window", help="lm: attention sinks (StreamingLLM): keep only the "
                             "first --sinks and the last W tokens in the KV cache, at positions inside the "
                             "cache, and read or generate past the context (relative positions only).")
SINKS = typer.Option(None, help="With --stream-window: initial tokens always kept (default 4; 0 is a "
                     "plain sliding window).")
LM_INFINITE = typer.Option(False, "--lm-infinite", help="lm: read a dense-attention run with LM-Infinite (a "
                           "window of the training context, the first --global-tokens always seen, their distances "
                           "capped at the context): any length, no new weights.")
GLOBAL_TOKENS = typer.Option(None, "--global-tokens", help="With --lm-infinite: initial tokens every query sees "
                             "(default 4).")
KNN_NPROBE = typer.Option(None, "--nprobe", help="With --knn, an IVF-PQ store: lists searched per query.")
KNN_CANDIDATES = typer.Option(None, "--candidates", help="With --knn, an IVF-PQ store: keys its codes retrieve, "
                              "re-ranked by exact distance before the k nearest are kept.")


def stream_options(window: int | None, sinks: int | None) -> dict:
    """--stream-window/--sinks as generate settings ({} when not streaming)."""
    if window is None:
        if sinks is not None:
            raise UsageError("--sinks applies to a sink cache: add --stream-window W")
        return {}
    if window <= 0 or (sinks is not None and sinks < 0):
        raise UsageError("--stream-window must be positive and --sinks at least 0")
    return {"stream_window": window, "sinks": 4 if sinks is None else sinks}


def lm_infinite_option(on: bool, global_tokens: int | None, stream_window: int | None) -> int | None:
    """--lm-infinite/--global-tokens as the number of global tokens (None: not asked for)."""
    if not on:
        if global_tokens is not None:
            raise UsageError("--global-tokens applies to LM-Infinite: add --lm-infinite")
        return None
    if stream_window is not None:
        raise UsageError("--lm-infinite keeps every key of the text; --stream-window drops them (choose one)")
    if global_tokens is not None and global_tokens < 0:
        raise UsageError("--global-tokens must be at least 0")
    return 4 if global_tokens is None else global_tokens


def knn_overrides(knn: bool, lam: float | None, k: int | None, temperature: float | None,
                  nprobe: int | None = None, candidates: int | None = None) -> dict | None:
    """The --knn request as run.evaluate/generate_lines take it: None, or the explicit overrides."""
    given = {"lam": lam, "k": k, "temperature": temperature, "nprobe": nprobe, "candidates": candidates}
    if not knn:
        if any(v is not None for v in given.values()):
            raise UsageError("--lambda, --k, --nprobe, --candidates and the kNN temperature apply to the kNN-LM: "
                             "add --knn")
        return None
    if lam is not None and not 0 <= lam <= 1:
        raise UsageError(f"--lambda {lam}: expected a weight in [0, 1]")
    if any(v is not None and v <= 0 for v in (k, temperature, nprobe, candidates)):
        raise UsageError("--k, --nprobe, --candidates and the kNN temperature must be positive")
    return {name: v for name, v in given.items() if v is not None}


EXIT_THRESHOLD = typer.Option(None, "--exit-threshold", help="A CALM run ([model.exit]): leave at the first layer "
                              "this confident (1: the full model; default: RUN/exit.json from tfx calibrate-exit, "
                              "else the recipe's).")
