"""Text through HF datasets from local text, jsonl, csv, tsv and parquet files."""
from __future__ import annotations

import json
import os

import pytest

from tfx.data.datasets import encode_documents, read_documents, read_labelled, read_pairs
from tfx.data.tokenizers import ByteTokenizer
from tfx.errors import UsageError

DOCS = ['First "quoted" line,\nwith a comma', "second\tdocument", "ünïcödé"]


def test_text_file_is_one_document_with_its_newlines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("line one\n\nline three\n", encoding="utf-8")
    assert read_documents(str(path)) == ["line one\n\nline three\n"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_tabular_files_give_one_document_per_row(tmp_path, fmt):
    path = tmp_path / f"a.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    else:
        import pandas as pd

        frame = pd.DataFrame({"body": DOCS, "id": range(3)})
        frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    assert read_documents(str(path), text_field="body") == DOCS
    with pytest.raises(UsageError, match="no column 'text'.*body"):
        read_documents(str(path))


def test_tsv_with_quotes(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text('text\tlabel\nhe said "hi\tpos\nplain\tneg\n', encoding="utf-8")
    assert read_documents(str(path)) == ['he said "hi', "plain"]


def test_stream_has_bos_before_each_document():
    tok = ByteTokenizer()
    ids = encode_documents(tok, ["ab", "c"]).tolist()
    assert ids == [tok.bos_id, *tok.encode("ab"), tok.bos_id, *tok.encode("c")]


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_documents(str(tmp_path / "nope.txt"))
    odd = tmp_path / "a.docx"
    odd.write_text("x")
    with pytest.raises(UsageError, match="unknown file type"):
        read_documents(str(odd))


@pytest.fixture
def loads(monkeypatch):
    """Every `datasets.load_dataset` call from here on, with an empty read cache."""
    import datasets

    from tfx.data import datasets as tfx_datasets

    calls, load = [], datasets.load_dataset
    monkeypatch.setattr(tfx_datasets, "_LAST_READ", {})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or load(*a, **k))
    return calls


def test_a_run_reads_its_training_file_once(tmp_path, loads):
    """The tokenizer's texts and then the training split: one load; each caller gets its own list."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    first = read_documents(str(path))
    first.append("changed by a caller")
    assert read_documents(str(tmp_path / "." / "train.jsonl"), split="train") == DOCS  # however the path is spelt
    assert len(loads) == 1
    with pytest.raises(UsageError, match="no column 'body'"):
        read_documents(str(path), text_field="body")
    assert len(loads) == 2  # other arguments: read again, and errors are never kept


def test_labelled_and_pair_files_are_read_once(tmp_path, loads):
    labelled = tmp_path / "a.tsv"
    labelled.write_text("text\tlabel\ngood film\t1\nbad film\t0\n", encoding="utf-8")
    for _ in range(2):
        assert read_labelled(str(labelled)) == (["good film", "bad film"], ["1", "0"])
    assert len(loads) == 1
    texts, labels = read_labelled(str(labelled))
    texts.clear(), labels.clear()
    assert read_labelled(str(labelled)) == (["good film", "bad film"], ["1", "0"])

    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"translation": {"de": "Hallo", "en": "Hello"}}) + "\n", encoding="utf-8")
    for _ in range(2):
        assert read_pairs(str(pairs), src_lang="de", tgt_lang="en") == (["Hallo"], ["Hello"])
    assert len(loads) == 2


def _rewrite(path, text: str, mtime_ns: int) -> None:
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_changed_file_is_read_again(tmp_path, loads):
    """Same size, only the modification time differs: the new text. A file replaced by another of
    the same size and time (only the inode differs): the new text too (pair files, which tfx reads
    itself: datasets' own cache keeps such a file's old rows, as it did before tfx kept reads)."""
    path = tmp_path / "a.txt"
    _rewrite(path, "first", 1_000_000_000)
    assert read_documents(str(path)) == ["first"]
    _rewrite(path, "other", 2_000_000_000)
    assert read_documents(str(path)) == ["other"]
    assert len(loads) == 2

    prefix = tmp_path / "train"
    _rewrite(tmp_path / "train.de", "eins\nzwei\n", 1_000_000_000)
    _rewrite(tmp_path / "train.en", "one\ntwo\n", 1_000_000_000)
    assert read_pairs(str(prefix), src_lang="de", tgt_lang="en") == (["eins", "zwei"], ["one", "two"])
    _rewrite(tmp_path / "train.en", "uno\ntwo\n", 2_000_000_000)
    assert read_pairs(str(prefix), src_lang="de", tgt_lang="en") == (["eins", "zwei"], ["uno", "two"])
    _rewrite(tmp_path / "new.en", "eno\ntwo\n", 2_000_000_000)
    os.replace(tmp_path / "new.en", tmp_path / "train.en")
    assert read_pairs(str(prefix), src_lang="de", tgt_lang="en") == (["eins", "zwei"], ["eno", "two"])


def test_hf_local_dataset_is_read_once_and_again_when_it_changes(tmp_path, loads):
    """`hf:DIR` (a dataset folder that datasets.load_dataset reads): `valid` finds the validation
    split; unchanged files are read once, a changed file again."""
    folder = tmp_path / "hfdata"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"text": "a train row"}) + "\n", encoding="utf-8")
    valid = folder / "validation.jsonl"
    _rewrite(valid, json.dumps({"text": "a valid row"}) + "\n", 1_000_000_000)
    source = f"hf:{folder}"
    assert read_documents(source, split="valid") == ["a valid row"]
    assert read_documents(source, split="valid") == ["a valid row"]
    assert len(loads) == 1
    _rewrite(valid, json.dumps({"text": "a VALID row"}) + "\n", 2_000_000_000)
    assert read_documents(source, split="valid") == ["a VALID row"]
    assert read_documents(source, split="train") == ["a train row"]
    assert len(loads) == 3
