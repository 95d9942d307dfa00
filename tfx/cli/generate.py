"""`tfx generate RUN [PROMPT | -]`: continue, translate or label; one output line per input line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, List, Optional

import typer

from tfx.cli.common import check_checkpoint, stdin_lines, unescape
from tfx.cli.options import (EXIT_THRESHOLD, GLOBAL_TOKENS, KNN_CANDIDATES, KNN_NPROBE, LM_INFINITE, SINKS,
                             STREAM_WINDOW, knn_overrides, lm_infinite_option, stream_options)
from tfx.errors import UsageError


def generate(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    prompt: str = typer.Argument("", help="The prompt, or - to read one prompt per stdin line."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate (recipe default 200)."),
    temperature: Optional[float] = typer.Option(None, help="0 is greedy."),
    top_k: Optional[int] = typer.Option(None, help="lm: sample from the k most likely tokens; "
                                                   "classifier: print the k most likely labels."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass."),
    stop: Optional[List[str]] = typer.Option(None, help="Stop at this string (repeatable; '\\n' for newline)."),
    seed: Optional[int] = typer.Option(None, help="Seed for reproducible sampling."),
    stream: bool = typer.Option(False, help="Print text as it is generated (single prompt)."),
    echo: bool = typer.Option(False, help="Print the prompt before its continuation."),
    beam: Optional[int] = typer.Option(None, help="seq2seq: beam size (1 = greedy)."),
    nbest: Optional[int] = typer.Option(None, help="seq2seq: print the n best (text<TAB>score ...)."),
    checkpoint: str = typer.Option("best", help="best or last."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="lm: torch.compile the decode step "
                                           "(about 30 s once, then faster; default: the recipe's generate.compile)."),
    knn: bool = typer.Option(False, "--knn", help="lm: sample from the kNN-LM (the run's datastore and tuned "
                             "settings) instead of the LM alone."),
    knn_lambda: Optional[float] = typer.Option(None, "--lambda", "--knn-lambda", help="With --knn: weight of "
                                               "the kNN distribution (overrides RUN/knn/settings.json)."),
    knn_k: Optional[int] = typer.Option(None, "--k", "--knn-k", help="With --knn: neighbours retrieved."),
    knn_temperature: Optional[float] = typer.Option(None, "--knn-temperature",
                                                    help="With --knn: T in exp(-distance / T) (--temperature "
                                                         "is the sampling temperature)."),
    knn_nprobe: Optional[int] = KNN_NPROBE,
    knn_candidates: Optional[int] = KNN_CANDIDATES,
    stream_window: Optional[int] = STREAM_WINDOW,
    sinks: Optional[int] = SINKS,
    exit_threshold: Optional[float] = EXIT_THRESHOLD,
    lm_infinite: bool = LM_INFINITE,
    global_tokens: Optional[int] = GLOBAL_TOKENS,
):
    """Continue (lm), translate (seq2seq) or label (classifier) PROMPT, or each stdin line with '-'.

    With '-', exactly one output line per input line: newlines inside an output are written
    as the two characters \\n (and a backslash as \\\\), so the lines stay aligned. A classifier
    prints label<TAB>probability (--top-k N for more pairs).
    """
    from tfx import run

    check_checkpoint(checkpoint)
    # --max-new-tokens, --temperature, --top-k, --top-p, --beam, --compile: GenerateConfig's bounds,
    # checked by run.generate_lines with the run's own [generate] values
    if nbest is not None and nbest <= 0:
        raise UsageError(f"--nbest {nbest}: must be positive")
    if nbest and nbest > (beam or 1):
        raise UsageError(f"--nbest {nbest} needs a beam at least as large (--beam {nbest})")
    from_stdin = prompt == "-"
    if stream and from_stdin:
        raise UsageError("--stream takes a single PROMPT, not '-'")
    stops = [unescape(s) for s in (stop or [])]
    knn_options = knn_overrides(knn, knn_lambda, knn_k, knn_temperature, knn_nprobe, knn_candidates)
    infinite = lm_infinite_option(lm_infinite, global_tokens, stream_window)
    prompts = stdin_lines() if from_stdin else [prompt]
    if stream and echo:
        _emit(prompt)
    outputs = run.generate_lines(str(run_dir), prompts, checkpoint=checkpoint, seed=seed,
                                 on_text=_emit if stream else None, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, stop=stops, beam=beam,
                                 nbest=nbest, compile=compile, knn=knn_options, exit_threshold=exit_threshold,
                                 lm_infinite=infinite, **stream_options(stream_window, sinks))
    _print_outputs(outputs, stream=stream, echo=echo, from_stdin=from_stdin)


def _emit(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _print_outputs(outputs: Iterable[tuple[str, str]], *, stream: bool, echo: bool, from_stdin: bool) -> None:
    """One line per output: streamed text only needs its newline; from stdin, newlines and
    backslashes inside an output are escaped so the lines stay aligned with the input."""
    for prompt_text, text in outputs:
        if stream:
            _emit("\n")
            continue
        text = (prompt_text + text) if echo else text
        if from_stdin:
            text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        print(text, flush=from_stdin)
