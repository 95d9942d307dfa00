"""`tfx calibrate-exit RUN --delta D`: the early-exit threshold of a CALM run (tfx/calibrate.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from tfx.cli.common import check_checkpoint, check_split, err


def calibrate_exit(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    delta: float = typer.Option(0.05, help="Tolerated share of tokens whose early-exit top token differs from "
                                "the full model's."),
    split: str = typer.Option("valid", help="Split the threshold is chosen on."),
    check: Optional[str] = typer.Option("test", help="Split to report agreement and layers on at that threshold "
                                        "('' for none)."),
    measure: Optional[str] = typer.Option(None, help="softmax, saturation or classifier (default: the recipe's "
                                          "model.exit.measure; classifier only where it was trained)."),
    max_tokens: int = typer.Option(16384, min=1, help="Target tokens read of each split (an lm: windows of the context; seq2seq: the "
                                 "first references)."),
    checkpoint: str = typer.Option("best", help="best or last."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Choose a CALM run's exit threshold on held-out text and save it to RUN/exit.json.

    Each token of the split (an lm's text; a seq2seq model's reference translations, after their
    sources) is decoded through the KV cache with exits (teacher forcing); it agrees
    when its exit's top token is the full model's. Thresholds (quantiles of the exits' confidences)
    are tried from the highest down, and the lowest before the first that agrees on fewer than
    1 - DELTA of the tokens is kept. tfx generate and tfx bench generate then decode with it
    (--exit-threshold overrides; 1 is the full model).
    """
    from tfx.calibrate import calibrate_exit as calibrate
    from tfx.errors import UsageError

    check_checkpoint(checkpoint)
    check_split(split)
    if check and check not in ("train", "valid", "test"):
        raise UsageError(f"--check {check!r}: expected train, valid, test or ''")
    if measure is not None and measure not in ("softmax", "saturation", "classifier"):
        raise UsageError(f"--measure {measure!r}: expected softmax, saturation or classifier")
    result = calibrate(str(run_dir), delta=delta, split=split, check=check or None, measure=measure,
                       max_tokens=max_tokens, checkpoint=checkpoint, device=device, log=err)
    if json_out:
        print(json.dumps(result))
        return
    print(f"threshold      {result['threshold']:.6g} ({result['measure']}, delta {result['delta']})")
    print(f"{split:<14} agreement {result['agreement']:.4f}, mean layers {result['mean_layers']:.3f} "
          f"of {result['layers']} ({result['tokens']:,} tokens)")
    if "check" in result:
        c = result["check"]
        print(f"{c['split']:<14} agreement {c['agreement']:.4f}, mean layers {c['mean_layers']:.3f} "
              f"({c['tokens']:,} tokens)")
    print(f"saved          {Path(run_dir) / 'exit.json'}")
