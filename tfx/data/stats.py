"""Statistics of training text for sizing a vocabulary: `tfx data stats`, and the warning of
`tfx tokenize train` and `tfx train` when a sentencepiece vocabulary is large for its text.

The rule: a vocabulary of V pieces that turns the training text into T tokens sees each piece T / V
times on average ("tokens per piece"). Below MIN_TOKENS_PER_PIECE the vocabulary is large for the
text; the suggestion is the largest multiple of ROUND at which the figure is reached. Tokens are
counted line by line (the newline pieces between lines are not counted), with tfx's own
tokenizers, trained with the options `tfx train` uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tfx.errors import UsageError

# Average tokens per piece below which a vocabulary is "large" for its training text. A rule of
# thumb, not a measured law. It comes from Gowda & May (2020, "Finding the Optimal Vocabulary Size
# for Neural Machine Translation"), who recommend the largest BPE vocabulary at which about 95% of
# the pieces still occur 100 or more times in training; that implies an average of at least ~95,
# so a vocabulary under 50 on average surely fails their criterion. 50 rather than 95 leaves room
# for a rough rule: the warning names clear cases only.
MIN_TOKENS_PER_PIECE = 50
ROUND = 500  # suggestions are multiples of 500: round numbers, fine enough from 500 to 64,000
MAX_SUGGESTION = 64_000  # `tfx data stats` looks no higher (a larger text: "64,000 or more")
MAX_TRAININGS = 6  # sentencepiece trainings `tfx data stats` spends on narrowing the suggestion
TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")


@dataclass
class Text:
    """One side of the input: its units (lines of a text file, or a table's examples)."""

    name: str
    path: str
    units: list[str]
    unit: str  # "lines" or "examples"


def round_down(n: float) -> int:
    return int(n // ROUND) * ROUND


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line})") from None
    if not text.strip():
        raise UsageError(f"{path} is empty" if not text else f"{path} holds only whitespace")
    return text


def _read_lines(path: Path) -> Text:
    lines = [line.rstrip("\r") for line in _read_utf8(path).split("\n")]
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return Text(path.name, str(path), lines, "lines")


def _read_table(path: Path, text_field: str) -> Text:
    from tfx.data.datasets import read_documents

    if path.suffix.lower() != ".parquet":
        _read_utf8(path)
    examples = read_documents(str(path), text_field=text_field)  # as tfx reads a classifier's data
    if not any(e.strip() for e in examples):
        raise UsageError(f"{path}: no examples with a {text_field!r} text")
    return Text(path.name, str(path), examples, "examples")


def input_files(paths: Sequence[str], split: str | None) -> list[Path]:
    """A file, two files (a parallel pair), a data folder's SPLIT.* files, or a corpus's."""
    if not 1 <= len(paths) <= 2:
        raise UsageError(f"give one PATH or two (a parallel pair), not {len(paths)}")
    if len(paths) == 2 or Path(paths[0]).is_file():
        if split is not None:
            raise UsageError("--split is for a data folder or a corpus name, not for files")
        for p in paths:
            if not Path(p).is_file():
                raise UsageError(f"no such file: {p}")
        return [Path(p) for p in paths]
    where, split = paths[0], split or "train"
    if Path(where).is_dir():
        files = sorted(f for f in Path(where).iterdir() if f.is_file() and f.name.split(".", 1)[0] == split)
        if not 1 <= len(files) <= 2:
            raise UsageError(f"{where}: expected one or two {split}.* files, found {len(files)}"
                             f"{': ' + ', '.join(f.name for f in files) if files else ''}")
        return files
    from tfx.data import corpora

    if where not in corpora.corpus_names():
        raise UsageError(f"no such file, folder or corpus: {where} (corpora: {', '.join(corpora.corpus_names())})")
    files = corpora.split_files(where, split)
    if not all(f.is_file() for f in files):
        raise UsageError(f"corpus {where!r} is not fetched; run: tfx data get {where}")
    return files


def read_texts(files: list[Path], text_field: str = "text") -> list[Text]:
    tables = [f for f in files if f.suffix.lower() in TABLE_SUFFIXES]
    if tables and len(files) > 1:
        raise UsageError(f"a parallel pair is two plain text files (one sentence a line), not {tables[0]}")
    if tables:
        return [_read_table(files[0], text_field)]
    texts = [_read_lines(f) for f in files]
    if len(texts) == 2:
        if len(texts[0].units) != len(texts[1].units):
            raise UsageError(f"misaligned pair: {files[0]} has {len(texts[0].units):,} lines, "
                             f"{files[1]} has {len(texts[1].units):,}")
        if files[0].suffix != files[1].suffix:  # train.de, train.en: the columns are de and en
            texts[0].name, texts[1].name = files[0].suffix[1:], files[1].suffix[1:]
    return texts


def spread(values: Sequence[int]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


def text_stats(text: Text) -> dict:
    """Sizes and line lengths in whitespace words (case-sensitive; lengths over non-blank units)."""
    words = [u.split() for u in text.units]
    lengths = [len(w) for w in words if w]
    return {"name": text.name, "path": text.path, "unit": text.unit, text.unit: len(text.units),
            "blank": len(text.units) - len(lengths), "characters": sum(len(u) for u in text.units),
            "words": sum(lengths), "distinct_words": len({w for ws in words for w in ws}),
            "words_per_line": spread(lengths)}


def token_counts(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Tokens of each text, without the newline pieces between its lines."""
    if tokenizer.kind == "sentencepiece":  # one batched encode, split again at the newline pieces
        lines = [line for t in texts for line in t.split("\n")]
        ids = np.asarray(tokenizer.encode("\n".join(lines)), dtype=np.int64)
        per_line = np.diff(np.concatenate([[-1], np.flatnonzero(ids == tokenizer.newline_id), [len(ids)]])) - 1
        owner = np.repeat(np.arange(len(texts)), [t.count("\n") + 1 for t in texts])
        return np.bincount(owner, weights=per_line, minlength=len(texts)).astype(np.int64)
    return np.array([len(tokenizer.encode(t)) - t.count("\n") for t in texts], dtype=np.int64)


def smallest_size(cfg, texts: Sequence[str]) -> int:
    """The smallest multiple of ROUND sentencepiece can train on `texts` (every character gets a
    piece, as character_coverage = 1 asks; byte fallback adds 256)."""
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    chars.discard("\n")
    need = 4 + 1 + (256 if cfg.byte_fallback else 0) + len(chars)  # specials, <nl>, bytes, chars
    return math.ceil(need / ROUND) * ROUND


def vocab_warning(cfg, tokenizer, texts: Sequence[str], *, key: str = "tokenizer") -> str | None:
    """The `tfx: warning:` line when a freshly trained sentencepiece vocabulary is large for its
    training text, or None. `key`: the recipe table ("tokenizer", "src_tokenizer") or "--" for the
    command's options. The suggestion is `largest_size`'s, as `tfx data stats` gives it."""
    if getattr(cfg, "kind", None) != "sentencepiece" or getattr(cfg, "path", None) is not None:
        return None
    tokens = int(token_counts(tokenizer, texts).sum())
    pieces = tokenizer.vocab_size
    if tokens >= MIN_TOKENS_PER_PIECE * pieces:
        return None
    size, _ = largest_size(cfg, texts, pieces, tokens)
    if size is not None:
        hint = f"--vocab-size {size}" if key == "--" else f"{key}.vocab_size = {size}"
    else:
        hint = "--kind char" if key == "--" else f'{key}.kind = "char"'
        hint += f" (no vocabulary size reaches ~{MIN_TOKENS_PER_PIECE} on this little text)"
    return (f"tfx: warning: {pieces:,} pieces for {tokens:,} training tokens is {tokens / pieces:.0f} tokens "
            f"per piece; below ~{MIN_TOKENS_PER_PIECE} the rarer pieces are seen too seldom to learn; try {hint}")


def largest_size(cfg, texts: Sequence[str], pieces: int, tokens: int) -> tuple[int | None, bool]:
    """(the largest multiple of ROUND with at least MIN_TOKENS_PER_PIECE tokens per piece, or None
    where none is; whether that is exact), from a measurement (pieces, tokens) and at most
    MAX_TRAININGS more. T(V), the tokens at V pieces, does not grow with V (BPE: a smaller model's
    merges are the larger one's first merges, applied first; unigram: so in practice), so a
    measurement (v, t) shows that every size up to min(v, t / MIN) reaches the threshold and every
    size above max(v, t / MIN) misses it; the search bisects what is left between the two."""
    from tfx.data.tokenizers import train_tokenizer

    lo, hi = 0, MAX_SUGGESTION + ROUND  # largest size known to reach; smallest known to miss
    floor = smallest_size(cfg, texts)

    def learn(v: int, t: int) -> None:
        nonlocal lo, hi
        bound = t / MIN_TOKENS_PER_PIECE
        if t >= MIN_TOKENS_PER_PIECE * v:
            lo, hi = max(lo, round_down(v)), min(hi, round_down(bound) + ROUND)
        else:
            lo, hi = max(lo, round_down(bound)), min(hi, math.ceil(v / ROUND) * ROUND)

    learn(pieces, tokens)
    top_first = lo >= round_down(pieces) > 0  # reached at the given size: try just under the bound first
    for _ in range(MAX_TRAININGS):
        lo = max(lo, floor - ROUND)
        if hi - lo <= ROUND:
            break
        v = hi - ROUND if top_first else lo + ROUND * ((hi - lo) // ROUND // 2)
        top_first = False
        tok = train_tokenizer(cfg.model_copy(update={"vocab_size": v}), texts)
        learn(tok.vocab_size, int(token_counts(tok, texts).sum()))
    size = min(lo, MAX_SUGGESTION)
    return (size if size >= floor else None), hi - lo <= ROUND


def tokenizer_stats(cfg, texts: list[Text]) -> tuple[dict, list[np.ndarray]]:
    """Train the tokenizer `cfg` describes on every unit of `texts` (both sides of a pair: a joint
    vocabulary, as a recipe's [tokenizer]); its figures, and each text's token counts."""
    from tfx.data.tokenizers import train_tokenizer

    every = [u for t in texts for u in t.units]
    tok = train_tokenizer(cfg, every)
    counts = [token_counts(tok, t.units) for t in texts]
    tokens = int(sum(int(c.sum()) for c in counts))
    out = {"kind": cfg.kind, "vocab_size": tok.vocab_size, "tokens": tokens,
           "tokens_per_piece": tokens / tok.vocab_size}
    if cfg.kind == "sentencepiece":
        size, exact = largest_size(cfg, every, tok.vocab_size, tokens)
        out.update(model_type=cfg.model_type, requested_vocab_size=cfg.vocab_size,
                   threshold=MIN_TOKENS_PER_PIECE, large=tokens < MIN_TOKENS_PER_PIECE * tok.vocab_size,
                   suggested_vocab_size=size, suggestion_exact=exact)
    return out, counts


def collect(paths: Sequence[str], *, split: str | None = None, text_field: str = "text", tokenizer=None) -> dict:
    """What `tfx data stats` prints: each text's sizes and lengths, and with a tokenizer config
    (`tokenizer`: a validated KindConfig) the tokens and the tokens-per-piece figure."""
    files = input_files(paths, split)
    texts = read_texts(files, text_field)
    result = {"source": [str(f) for f in files], "texts": [text_stats(t) for t in texts], "tokenizer": None}
    if tokenizer is not None:
        result["tokenizer"], counts = tokenizer_stats(tokenizer, texts)
        for entry, text, c in zip(result["texts"], texts, counts):
            entry["tokens"] = int(c.sum())
            entry["tokens_per_line"] = spread(c[[bool(u.split()) for u in text.units]])
    return result
