"""Reading text through HF `datasets`: local text/jsonl/csv/parquet files or `hf:NAME[:CONFIG]`.

A local .txt file is one document (its newlines are text); in tabular files each row is one.
A run reads its training split twice (the tokenizer's texts, then the split): each reader keeps its
last result and gives a copy while its arguments and files (path, inode, size, mtime) are unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from tfx.errors import RunError, UsageError

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet"}
HF_SPLITS = {"valid": ("validation", "valid", "dev"), "test": ("test",), "train": ("train",)}
_LAST_READ: dict = {}  # {(reader, arguments, files' stamp): result}: the last read only


def _stamp(files: list[str]) -> tuple | None:
    """(resolved path, device, inode, size, mtime_ns) of each file; None when one is missing (the
    reader raises)."""
    stamp = []
    for name in files:
        try:
            st = os.stat(name)
        except OSError:
            return None
        stamp.append((os.path.realpath(name), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def _read_once(key: tuple, source: str, files: list[str], read):
    """read(), or the last read's result for the same `key` and unchanged files: the files of a local
    `source` (however spelt), every file under an hf: name that is a local directory, or for a hub
    dataset the name alone (one version per process)."""
    if source.startswith("hf:"):
        local = Path(source[3:].partition(":")[0])
        files = sorted(str(f) for f in local.rglob("*") if f.is_file()) if local.is_dir() else \
            [str(local)] if local.exists() else []
        key = (*key, source)
    stamp = _stamp(files)
    if stamp is None:
        return read()
    key = (*key, stamp)
    if key not in _LAST_READ:
        result = read()  # stamped before reading: a file that changes meanwhile is read again next time
        _LAST_READ.clear()
        _LAST_READ[key] = result
    return _LAST_READ[key]


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _load(source: str, split: str):
    """A `datasets.Dataset` of one split: a local file (text = one row per file) or an hf: name."""
    datasets = _quiet_datasets()
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        last = None
        for hf_split in HF_SPLITS.get(split, (split,)):
            try:
                return datasets.load_dataset(name, config or None, split=hf_split)
            except ValueError as exc:  # unknown split name: try the next spelling
                last = exc
        raise UsageError(f"{source}: no {split!r} split ({last})")
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"data file not found: {source}")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{source}: unknown file type {path.suffix!r}; use one of {', '.join(FORMATS)}")
    kw: dict = {"sample_by": "document"} if fmt == "text" else {}
    if path.suffix.lower() == ".tsv":
        import csv

        kw.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train", **kw)
    except Exception as exc:  # datasets raises many types for unreadable files
        raise RunError(f"{source}: cannot read as {fmt}: {exc}") from None


def read_documents(source: str, *, split: str = "train", text_field: str = "text") -> list[str]:
    """The documents of one split: a local file, or `hf:NAME[:CONFIG]` from the hub."""
    return list(_read_once(("documents", split, text_field), source, [source],
                           lambda: _read_documents(source, split, text_field)))


def _read_documents(source: str, split: str, text_field: str) -> tuple[str, ...]:
    ds = _load(source, split)
    if text_field not in ds.column_names:
        raise UsageError(f"{source}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                         f"set data.text_field")
    return tuple(t for t in ds[text_field] if t)


def encode_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """One int32 stream: each document as [bos] + its tokens, packed end to end."""
    parts = []
    for doc in docs:
        parts.append(torch.tensor([tokenizer.bos_id] + tokenizer.encode(doc), dtype=torch.int32))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


def count_bytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


def _clean(line: str) -> str:
    return line.rstrip("\n").rstrip("\r")


def read_pairs(source: str, *, split: str = "train", src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """Aligned (sources, targets) from PREFIX.src_lang + PREFIX.tgt_lang, a `src<TAB>tgt` .tsv file,
    a JSONL file of {"translation": {src_lang: ..., tgt_lang: ...}}, or `hf:NAME[:CONFIG]`."""
    files = [source] if Path(source).is_file() else [f"{source}.{src_lang}", f"{source}.{tgt_lang}"]
    src, tgt = _read_once(("pairs", split, src_lang, tgt_lang), source, files,
                          lambda: _read_pairs(source, split, src_lang, tgt_lang))
    return list(src), list(tgt)


def _read_pairs(source: str, split: str, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    path = Path(source)
    if not source.startswith("hf:") and not path.is_file():
        files = [Path(f"{source}.{src_lang}"), Path(f"{source}.{tgt_lang}")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UsageError(f"{source}: no such file, nor {' / '.join(missing)}")
        src, tgt = ([_clean(x) for x in f.read_text(encoding="utf-8", errors="replace").split("\n")] for f in files)
        src, tgt = (x[:-1] if x and x[-1] == "" else x for x in (src, tgt))
        if len(src) != len(tgt):
            raise UsageError(f"misaligned files: {files[0]} has {len(src)} lines, {files[1]} has {len(tgt)}")
        return src, tgt
    if path.suffix.lower() == ".tsv":
        src, tgt = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            a, sep, b = line.partition("\t")
            if not sep:
                raise UsageError(f"{source}:{n}: expected source<TAB>target")
            src.append(a)
            tgt.append(b)
        return src, tgt
    rows = _load(source, split)
    if "translation" not in rows.column_names:
        raise UsageError(f"{source}: expected a 'translation' column of {{{src_lang!r}: ..., {tgt_lang!r}: ...}}")
    pairs = rows["translation"]
    try:
        return [p[src_lang] for p in pairs], [p[tgt_lang] for p in pairs]
    except (KeyError, TypeError):
        raise UsageError(f"{source}: translations lack the keys {src_lang!r} and {tgt_lang!r} "
                         f"(set data.src_lang / data.tgt_lang)") from None


def read_labelled(source: str, *, split: str = "train", text_field: str = "text",
                  label_field: str = "label") -> tuple[list[str], list[str]]:
    """(texts, labels as strings) from a .tsv/.csv/.jsonl/.parquet file or `hf:NAME[:CONFIG]`."""
    texts, labels = _read_once(("labelled", split, text_field, label_field), source, [source],
                               lambda: _read_labelled(source, split, text_field, label_field))
    return list(texts), list(labels)


def _read_labelled(source: str, split: str, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    rows = _load(source, split)
    for field in (text_field, label_field):
        if field not in rows.column_names:
            raise UsageError(f"{source}: no column {field!r} (columns: {', '.join(rows.column_names)}); "
                             f"set data.text_field / data.label_field")
    texts = ["" if t is None else str(t) for t in rows[text_field]]
    return texts, [str(x) for x in rows[label_field]]
