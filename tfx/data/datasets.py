"""Reading text through HF `datasets`: local text/jsonl/csv/parquet files or `hf:NAME[:CONFIG]`.

A local .txt file is one document (its newlines are text); in tabular files each row is one.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from tfx.errors import RunError, UsageError

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet"}
HF_SPLITS = {"valid": ("validation", "valid", "dev"), "test": ("test",), "train": ("train",)}


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def read_documents(source: str, *, split: str = "train", text_field: str = "text") -> list[str]:
    """The documents of one split: a local file, or `hf:NAME[:CONFIG]` from the hub."""
    datasets = _quiet_datasets()
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        last = None
        for hf_split in HF_SPLITS.get(split, (split,)):
            try:
                ds = datasets.load_dataset(name, config or None, split=hf_split)
                break
            except ValueError as exc:  # unknown split name: try the next spelling
                last = exc
        else:
            raise UsageError(f"{source}: no {split!r} split ({last})")
    else:
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
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kw)
        except Exception as exc:  # datasets raises many types for unreadable files
            raise RunError(f"{source}: cannot read as {fmt}: {exc}") from None
    if text_field not in ds.column_names:
        raise UsageError(f"{source}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                         f"set data.text_field")
    return [t for t in ds[text_field] if t]


def encode_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """One int32 stream: each document as [bos] + its tokens, packed end to end."""
    parts = []
    for doc in docs:
        parts.append(torch.tensor([tokenizer.bos_id] + tokenizer.encode(doc), dtype=torch.int32))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


def count_bytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)
