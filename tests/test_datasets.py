"""Text through HF datasets from local text, jsonl, csv, tsv and parquet files."""
from __future__ import annotations

import json

import pytest

from tfx.data.datasets import encode_documents, read_documents
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
