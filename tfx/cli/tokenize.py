"""`tfx tokenize train|encode|decode`: tokenizers trained on files; stdin to stdout."""
from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from tfx.cli.common import err, stdin_lines
from tfx.errors import UsageError

tok_app = typer.Typer(help="Train tokenizers; encode and decode stdin to stdout.", no_args_is_help=True)


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
    from tfx.data.stats import vocab_warning
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
    warning = vocab_warning(cfg, tok, docs, key="--")  # a vocabulary large for the text
    if warning:
        err(warning)


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
