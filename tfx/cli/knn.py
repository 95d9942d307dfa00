"""`tfx knn ...`: build and tune a kNN-LM datastore inside an lm run (Khandelwal et al., 2020)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tfx.cli.common import check_checkpoint, check_split, err
from tfx.errors import UsageError

knn_app = typer.Typer(help="kNN-LM (Khandelwal et al., 2020): a datastore of (context key, next token) inside "
                           "an lm run, and its interpolation settings.", no_args_is_help=True)


@knn_app.command("build")
def knn_build(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    split: str = typer.Option("train", help="The recipe's split to store (ignored with --data)."),
    data: Optional[Path] = typer.Option(None, help="Store this text file instead of a split."),
    index: str = typer.Option("auto", help="flat (exact IndexFlatL2), ivfpq (IVF-PQ, trained on a sample), "
                                           "or auto: flat up to 1,000,000 keys, ivfpq beyond."),
    nlist: Optional[int] = typer.Option(None, help="ivfpq: inverted lists (default ~4·sqrt(N))."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", help="ivfpq: sub-quantizers; divides the key dimension "
                                                            "(default: up to 64)."),
    pq_bits: int = typer.Option(8, "--pq-bits", help="ivfpq: bits per sub-quantizer code."),
    nprobe: Optional[int] = typer.Option(None, help="ivfpq: lists searched per query (default min(32, nlist))."),
    train_size: int = typer.Option(100_000, help="ivfpq: keys sampled to train the index."),
    dtype: str = typer.Option("float16", help="Key storage on disk: float16 or float32."),
    max_tokens: Optional[int] = typer.Option(None, help="Store only the first N tokens of the text."),
    stride: Optional[int] = typer.Option(None, help="Window stride (default: the context; each token keeps "
                                                    "the left context its window gives it)."),
    batch_size: int = typer.Option(32, help="Windows per forward pass."),
    checkpoint: str = typer.Option("best", help="best or last."),
):
    """Build the run's kNN-LM datastore (RUN/knn/) from a split or a text file.

    Stores the key (the last block's feed-forward input) and the next token of every position of
    the text, and a faiss index over the keys; replaces an earlier store atomically.
    """
    from tfx import run

    check_checkpoint(checkpoint)
    check_split(split)
    for name, value in (("--max-tokens", max_tokens), ("--stride", stride), ("--batch-size", batch_size)):
        if value is not None and value <= 0:
            raise UsageError(f"{name} must be positive")
    if data is not None and not data.is_file():
        raise UsageError(f"--data {data}: file not found")
    meta = run.knn_build(str(run_dir), split=split, data=str(data) if data else None, checkpoint=checkpoint,
                         dtype=dtype, index=index, nlist=nlist, pq_m=pq_m, pq_bits=pq_bits, train_size=train_size,
                         nprobe=nprobe, stride=stride, batch_size=batch_size, max_tokens=max_tokens)
    print(json.dumps({k: meta[k] for k in ("count", "dim", "key_dtype", "index", "typical_distance")}))


@knn_app.command("tune")
def knn_tune(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    split: str = typer.Option("valid", help="The recipe's split to tune on (ignored with --data)."),
    data: Optional[Path] = typer.Option(None, help="Tune on this text file instead of a split."),
    max_tokens: Optional[int] = typer.Option(100_000, help="Tune on the first N tokens (0 = all)."),
    nprobe: Optional[int] = typer.Option(None, help="ivfpq: lists searched per query (saved with the settings)."),
    candidates: Optional[int] = typer.Option(None, help="ivfpq: keys the codes retrieve per query, re-ranked by "
                                                        "their exact distances before the k nearest are kept "
                                                        "(default: k; saved with the settings)."),
    stride: Optional[int] = typer.Option(None, help="Window stride (default: the context); use the one you will "
                                                      "evaluate with (tfx eval --knn --stride)."),
    top: int = typer.Option(10, help="Rows of the table."),
    batch_size: int = typer.Option(32, help="Windows per forward pass."),
    checkpoint: str = typer.Option("best", help="best or last."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object instead of the table."),
):
    """Choose the kNN-LM's lambda, k and temperature on a held-out split; saves RUN/knn/settings.json.

    A grid of lambda x k x temperature (temperatures scaled to the median nearest-neighbour
    distance), retrieving once with the largest k; prints the best settings, which
    `tfx eval --knn` and `tfx generate --knn` then use.
    """
    from tfx import run

    check_checkpoint(checkpoint)
    check_split(split)
    if ((max_tokens is not None and max_tokens < 0) or top <= 0
            or any(v is not None and v <= 0 for v in (nprobe, candidates, stride))):
        raise UsageError("--max-tokens, --nprobe, --candidates, --stride and --top must be positive")
    if data is not None and not data.is_file():
        raise UsageError(f"--data {data}: file not found")
    result = run.knn_tune(str(run_dir), split=split, data=str(data) if data else None, checkpoint=checkpoint,
                          max_tokens=max_tokens or None, nprobe=nprobe, candidates=candidates, stride=stride,
                          batch_size=batch_size)
    if json_out:
        print(json.dumps({**result, "grid": result["grid"][:top]}))
        return
    base = result["base"]
    print(f"{'lambda':>7} {'k':>5} {'temperature':>12} {'loss':>8} {'perplexity':>11} {'vs lm':>7}")
    print(f"{0:>7g} {'-':>5} {'-':>12} {base['loss']:>8.4f} {base['perplexity']:>11.3f} {'':>7}")
    for r in result["grid"][:top]:
        change = 100 * (r["perplexity"] / base["perplexity"] - 1)
        print(f"{r['lambda']:>7g} {r['k']:>5} {r['temperature']:>12g} {r['loss']:>8.4f} {r['perplexity']:>11.3f} "
              f"{change:>+6.1f}%")
    err(f"best settings saved to {result['saved']} ({result['tokens']:,} tokens)")
