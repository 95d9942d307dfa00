"""`tfx eval RUN`: the family's metrics on a split or a file, as lines and tables or --json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tfx.cli.common import check_checkpoint, check_split, out_console
from tfx.cli.options import (GLOBAL_TOKENS, KNN_CANDIDATES, KNN_NPROBE, LM_INFINITE, SINKS, STREAM_WINDOW,
                             knn_overrides, lm_infinite_option, stream_options)
from tfx.errors import UsageError


def eval_(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    split: str = typer.Option("test", help="valid or test split of the recipe's data."),
    data: Optional[Path] = typer.Option(None, help="Evaluate this file instead of a split."),
    stride: Optional[int] = typer.Option(None, help="Sliding-window stride (default: the window; with --knn, "
                                         "the stride tfx knn tune used)."),
    context: Optional[int] = typer.Option(None, help="LM: window length in tokens (default: the training "
                                          "context); longer windows measure length extrapolation."),
    checkpoint: str = typer.Option("best", help="best or last."),
    batch_size: int = typer.Option(32, help="LM: windows per forward pass."),
    beam: Optional[int] = typer.Option(None, help="seq2seq: beam size (recipe default)."),
    hyp_out: Optional[Path] = typer.Option(None, help="seq2seq: write the hypotheses to this file."),
    knn: bool = typer.Option(False, "--knn", help="lm: also the kNN-LM's metrics, with the run's datastore "
                             "(tfx knn build) and tuned settings (tfx knn tune)."),
    knn_lambda: Optional[float] = typer.Option(None, "--lambda", "--knn-lambda", help="With --knn: weight of "
                                               "the kNN distribution (overrides RUN/knn/settings.json)."),
    knn_k: Optional[int] = typer.Option(None, "--k", "--knn-k", help="With --knn: neighbours retrieved."),
    knn_temperature: Optional[float] = typer.Option(None, "--temperature", "--knn-temperature",
                                                    help="With --knn: T in exp(-distance / T)."),
    knn_nprobe: Optional[int] = KNN_NPROBE,
    knn_candidates: Optional[int] = KNN_CANDIDATES,
    stream_window: Optional[int] = STREAM_WINDOW,
    sinks: Optional[int] = SINKS,
    lm_infinite: bool = LM_INFINITE,
    global_tokens: Optional[int] = GLOBAL_TOKENS,
    max_tokens: Optional[int] = typer.Option(None, help="LM: score only the first N tokens."),
    tta: bool = typer.Option(False, "--tta", help="vit: test-time augmentation, the mean of the class "
                             "probabilities over the training augmentations' views (mirror; one-pixel shifts)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """The family's metrics on a split or a file.

    lm: loss, perplexity, bits per byte. seq2seq: sacreBLEU BLEU and chrF (with signatures), loss.
    classifier: accuracy, macro-F1, per-class table, confusion matrix. mlm: masked-token loss.
    """
    from tfx import run

    check_checkpoint(checkpoint)
    check_split(split)
    if stride is not None and stride <= 0:
        raise UsageError("--stride must be positive")
    if context is not None and context <= 1:
        raise UsageError("--context must be at least 2")
    knn_options = knn_overrides(knn, knn_lambda, knn_k, knn_temperature, knn_nprobe, knn_candidates)
    if max_tokens is not None and max_tokens <= 0:
        raise UsageError("--max-tokens must be positive")
    options = stream_options(stream_window, sinks)
    infinite = lm_infinite_option(lm_infinite, global_tokens, stream_window)
    if options and (knn or stride):
        raise UsageError("--stream-window reads the text in order through a sink cache; it does not combine "
                         "with --knn or --stride")
    result = run.evaluate(str(run_dir), split=split, data=str(data) if data else None, stride=stride,
                          context=context, checkpoint=checkpoint, batch_size=batch_size, beam=beam,
                          hyp_out=str(hyp_out) if hyp_out else None, knn=knn_options, max_tokens=max_tokens,
                          lm_infinite=infinite, tta=tta,
                          **({"stream": (options["sinks"], options["stream_window"])} if options else {}))
    if json_out:
        print(json.dumps(result))
    else:
        print_result(result)


def print_result(result: dict) -> None:
    """Scalars as aligned lines; a classifier's per-class scores and confusion as rich tables."""
    from rich.table import Table

    if "knn" in result:
        print_side_by_side(result)
        return
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            continue
        print(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {value}")
    if "depth" in result:  # universal depth: steps per position
        d = result["depth"]
        shares = ", ".join(f"{n}: {share:.1%}" for n, share in d["steps"].items())
        print(f"{'steps':<14} mean {d['mean_steps']:.2f} over {d['positions']:,} positions ({shares})")
    if "per_class" not in result:
        return
    console = out_console()
    table = Table("label", "precision", "recall", "F1", "support", title="per class")
    for name, c in result["per_class"].items():
        table.add_row(name, f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", str(c["support"]))
    console.print(table)
    confusion = Table("gold \\ predicted", *result["labels"], title="confusion")
    for name, row in zip(result["labels"], result["confusion"]):
        confusion.add_row(name, *map(str, row))
    console.print(confusion)


def print_side_by_side(result: dict) -> None:
    """An LM result with and without kNN-LM: one row per metric, then the settings."""
    knn = result["knn"]
    print(f"{'':<14} {'lm':>12} {'knn-lm':>12}")
    for key in ("loss", "perplexity", "bits_per_byte", "tokens"):
        if key in result:
            a, b = result[key], knn[key]
            print(f"{key:<14} {a:>12.4f} {b:>12.4f}" if isinstance(a, float) else f"{key:<14} {a:>12} {b:>12}")
    for key, value in result.items():
        if key not in ("loss", "perplexity", "bits_per_byte", "tokens", "knn") and not isinstance(value, (dict, list)):
            print(f"{key:<14} {value}")
    print(f"{'knn':<14} lambda {knn['lambda']:g}, k {knn['k']}, temperature {knn['temperature']:g}, "
          f"{knn['index']} index of {knn['store_size']:,} entries")
