"""`data.* = "hf:NAME[:CONFIG]"` offline: a local dataset folder that `datasets.load_dataset` reads
(the same call a hub name goes through), with two configs declared in its README card, and the
split-name fallback (valid -> validation / valid / dev). HF_DATASETS_OFFLINE=1: no network."""
from __future__ import annotations

import json

import pytest

from tfx.data.datasets import read_documents, read_labelled, read_pairs
from tfx.errors import UsageError

CARD = """---
configs:
- config_name: small
  data_files:
  - split: train
    path: small/train.jsonl
  - split: dev
    path: small/dev.jsonl
- config_name: big
  data_files:
  - split: train
    path: big/train.jsonl
  - split: validation
    path: big/validation.jsonl
  - split: test
    path: big/test.jsonl
---
"""


def rows(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")


@pytest.fixture
def offline(monkeypatch):
    import datasets

    from tfx.data import datasets as tfx_datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # read by datasets at import time
        if hasattr(datasets.config, flag):
            monkeypatch.setattr(datasets.config, flag, True)
    monkeypatch.setattr(tfx_datasets, "_LAST_READ", {})


@pytest.fixture
def hub(tmp_path, offline):
    folder = tmp_path / "hub" / "tiny-corpus"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(CARD, encoding="utf-8")
    rows(folder / "small/train.jsonl", [{"text": "small train one", "label": 0,
                                         "translation": {"de": "eins", "en": "one"}},
                                        {"text": "small train two", "label": 1,
                                         "translation": {"de": "zwei", "en": "two"}}])
    rows(folder / "small/dev.jsonl", [{"text": "small dev", "label": 1, "translation": {"de": "drei", "en": "three"}}])
    rows(folder / "big/train.jsonl", [{"text": f"big train {i}", "label": i % 3,
                                       "translation": {"de": f"d{i}", "en": f"e{i}"}} for i in range(5)])
    rows(folder / "big/validation.jsonl", [{"text": "big validation", "label": 2,
                                            "translation": {"de": "v", "en": "w"}}])
    rows(folder / "big/test.jsonl", [{"text": "big test", "label": 0, "translation": {"de": "t", "en": "u"}}])
    return folder


def test_hf_name_and_config_pick_the_config(hub):
    assert read_documents(f"hf:{hub}:small") == ["small train one", "small train two"]
    assert read_documents(f"hf:{hub}:big") == [f"big train {i}" for i in range(5)]
    assert read_documents(f"hf:{hub}:big", split="test") == ["big test"]


def test_hf_valid_falls_back_to_validation_and_dev(hub):
    assert read_documents(f"hf:{hub}:big", split="valid") == ["big validation"]  # 'validation'
    assert read_documents(f"hf:{hub}:small", split="valid") == ["small dev"]     # 'dev'
    with pytest.raises(UsageError, match="no 'test' split"):
        read_documents(f"hf:{hub}:small", split="test")


def test_hf_labelled_rows_and_translation_pairs(hub):
    texts, labels = read_labelled(f"hf:{hub}:big")
    assert texts == [f"big train {i}" for i in range(5)] and labels == ["0", "1", "2", "0", "1"]
    assert read_labelled(f"hf:{hub}:small", split="valid") == (["small dev"], ["1"])
    assert read_pairs(f"hf:{hub}:small", src_lang="de", tgt_lang="en") == (["eins", "zwei"], ["one", "two"])
    assert read_pairs(f"hf:{hub}:big", split="valid", src_lang="de", tgt_lang="en") == (["v"], ["w"])
    with pytest.raises(UsageError, match="lack the keys"):
        read_pairs(f"hf:{hub}:small", src_lang="fr", tgt_lang="en")


def test_hf_folder_without_configs(tmp_path, offline):
    plain = tmp_path / "plain"
    rows(plain / "train.jsonl", [{"text": "plain train"}])
    rows(plain / "valid.jsonl", [{"text": "plain valid"}])
    assert read_documents(f"hf:{plain}") == ["plain train"]
    assert read_documents(f"hf:{plain}", split="valid") == ["plain valid"]  # 'valid' itself


def test_a_recipe_takes_hf_sources_in_every_split(hub):
    from tfx.config import validate

    recipe = validate({"data": {"train": f"hf:{hub}:big", "valid": f"hf:{hub}:small", "test": f"hf:{hub}:big"},
                       "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "context": 8}})
    assert (recipe.data.train, recipe.data.valid) == (f"hf:{hub}:big", f"hf:{hub}:small")
    assert read_documents(recipe.data.valid, split="valid") == ["small dev"]
