"""`tfx data stats` and the warning for a vocabulary that is large for its training text
(tfx.data.stats), on real Shakespeare text: the numbers against a direct count, the inputs
(text, table, parallel pair, data folder, corpus name), the warning and its suggestion, the errors."""
from __future__ import annotations

import json
import re
import statistics

import pytest

from conftest import REPO, TINY, sets, tfx_in_process
from tfx.config import validate_kind
from tfx.data.stats import MIN_TOKENS_PER_PIECE, ROUND, vocab_warning
from tfx.data.tokenizers import train_tokenizer
from tfx.registry import TOKENIZER


def sp(vocab_size: int):
    return validate_kind(TOKENIZER, {"kind": "sentencepiece", "vocab_size": vocab_size}, "--kind")


def stats(*args: str, env: dict | None = None) -> dict:
    proc = tfx_in_process("data", "stats", *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def direct_tokens(tok, lines: list[str]) -> int:
    return sum(len(tok.encode(line)) for line in lines)


@pytest.fixture(scope="module")
def lines(small_text) -> list[str]:
    return small_text.read_text(encoding="utf-8").splitlines()


def test_stats_of_a_text_file_match_a_direct_count(small_text, lines):
    result = stats(str(small_text))
    (text,) = result["texts"]
    nonblank = [len(line.split()) for line in lines if line.split()]
    assert result["source"] == [str(small_text)] and result["tokenizer"] is None
    assert (text["unit"], text["lines"], text["blank"]) == ("lines", len(lines), len(lines) - len(nonblank))
    assert text["characters"] == sum(len(line) for line in lines)
    assert text["words"] == sum(nonblank)
    assert text["distinct_words"] == len({w for line in lines for w in line.split()})
    spread = text["words_per_line"]
    assert spread["mean"] == pytest.approx(statistics.mean(nonblank))
    assert spread["median"] == statistics.median(nonblank) and spread["max"] == max(nonblank)
    assert spread["p95"] == pytest.approx(statistics.quantiles(nonblank, n=20, method="inclusive")[-1])
    table = tfx_in_process("data", "stats", str(small_text))  # the human table: the same numbers
    assert table.returncode == 0 and table.stderr == ""
    assert re.search(rf"^characters +{text['characters']:,}$", table.stdout, re.M)
    assert re.search(rf"^distinct words +{text['distinct_words']:,}$", table.stdout, re.M)


def test_vocab_size_gives_tokens_per_piece_and_a_suggestion_that_holds(small_text, lines):
    result = stats(str(small_text), "--vocab-size", "2000")
    tok = result["tokenizer"]
    direct = direct_tokens(train_tokenizer(sp(2000), lines), lines)  # the same seeded training, line by line
    assert {"kind", "model_type", "vocab_size", "tokens", "tokens_per_piece", "threshold", "large",
            "suggested_vocab_size", "suggestion_exact"} <= set(tok)
    assert tok["vocab_size"] == 2000 and tok["tokens"] == direct == result["texts"][0]["tokens"]
    assert tok["tokens_per_piece"] == pytest.approx(direct / 2000) and tok["large"]
    assert set(result["texts"][0]["tokens_per_line"]) == {"mean", "median", "p95", "max"}
    size = tok["suggested_vocab_size"]
    assert size % ROUND == 0 and tok["suggestion_exact"]
    assert direct_tokens(train_tokenizer(sp(size), lines), lines) >= MIN_TOKENS_PER_PIECE * size
    bigger = train_tokenizer(sp(size + ROUND), lines)  # the largest: one step more misses
    assert direct_tokens(bigger, lines) < MIN_TOKENS_PER_PIECE * bigger.vocab_size
    table = tfx_in_process("data", "stats", str(small_text), "--vocab-size", "2000").stdout
    assert f"2,000 pieces trained, {direct:,} tokens" in table
    assert re.search(rf"^suggested vocab size +{size:,}  \(", table, re.M)


def test_a_table_counts_its_examples(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\nA fine film .\tfresh\n\tfresh\nDull, dull, dull.\trotten\n", encoding="utf-8")
    (text,) = stats(str(path))["texts"]
    assert (text["unit"], text["examples"], text["words"], text["distinct_words"]) == ("examples", 2, 7, 7)
    char = stats(str(path), "--kind", "char")["tokenizer"]
    assert char["tokens"] == len("A fine film .") + len("Dull, dull, dull.")
    assert char["vocab_size"] == 4 + len(set("A fine film .Dull, dull, dull."))


def test_a_parallel_pair_its_folder_and_a_corpus_name(tmp_path, lines, shakespeare):
    src, tgt = lines[:300], [line.upper() for line in lines[:300]]
    (tmp_path / "train.de").write_text("\n".join(src) + "\n", encoding="utf-8")
    (tmp_path / "train.en").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    result = stats(str(tmp_path / "train.de"), str(tmp_path / "train.en"), "--vocab-size", "600")
    assert [t["name"] for t in result["texts"]] == ["de", "en"]
    assert [t["lines"] for t in result["texts"]] == [300, 300]
    joint = train_tokenizer(sp(600), src + tgt)  # one vocabulary for both sides, as a recipe's [tokenizer]
    assert [t["tokens"] for t in result["texts"]] == [direct_tokens(joint, src), direct_tokens(joint, tgt)]
    assert result["tokenizer"]["tokens"] == direct_tokens(joint, src + tgt)
    assert stats(str(tmp_path))["texts"] == stats(str(tmp_path / "train.de"), str(tmp_path / "train.en"))["texts"]
    env = {"TFX_DATA": str(shakespeare)}
    corpus = stats("shakespeare", "--split", "valid", env=env)
    assert corpus["source"] == [str(shakespeare / "shakespeare" / "valid.txt")]
    (tmp_path / "train.en").write_text("\n".join(tgt[:-1]) + "\n", encoding="utf-8")
    bad = tfx_in_process("data", "stats", str(tmp_path / "train.de"), str(tmp_path / "train.en"))
    assert bad.returncode == 2 and "misaligned pair" in bad.stderr and "299" in bad.stderr


def test_tokenize_train_warns_for_a_large_vocabulary_only(tmp_path, small_text, lines):
    proc = tfx_in_process("tokenize", "train", str(small_text), "--vocab-size", "2000", "--out", str(tmp_path / "a"))
    warning = [line for line in proc.stderr.splitlines() if line.startswith("tfx: warning:")]
    assert proc.returncode == 0 and proc.stdout == "" and len(warning) == 1
    size = int(re.search(r"try --vocab-size (\d+)$", warning[0]).group(1))
    tokens = direct_tokens(train_tokenizer(sp(2000), lines), lines)
    assert f"2,000 pieces for {tokens:,} training tokens is {tokens / 2000:.0f} tokens per piece" in warning[0]
    assert direct_tokens(train_tokenizer(sp(size), lines), lines) >= MIN_TOKENS_PER_PIECE * size
    quiet = tfx_in_process("tokenize", "train", str(small_text), "--vocab-size", str(size),
                           "--out", str(tmp_path / "b"))
    assert quiet.returncode == 0 and "warning" not in quiet.stderr
    char = validate_kind(TOKENIZER, {"kind": "char"}, "--kind")  # a char vocabulary is not chosen: no warning
    assert vocab_warning(char, train_tokenizer(char, lines[:5]), lines[:5]) is None


def test_tfx_train_warns_with_the_recipe_key(tmp_path, small_text):
    recipe = str(REPO / "recipes/lm/shakespeare-bpe.toml")
    proc = tfx_in_process("train", recipe, *sets(*TINY, f"data.train={json.dumps(str(small_text))}",
                                                 "data.holdout=0.1", "tokenizer.vocab_size=2000", "train.steps=1"),
                          "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("tfx: warning:")]
    assert len(warning) == 1 and re.search(r"2,000 pieces .* try tokenizer\.vocab_size = \d+$", warning[0])


@pytest.mark.parametrize("content, args, message", [
    (None, (), "no such file, folder or corpus"),
    (b"good line\n\xff\xfe bad\n", (), "not UTF-8 text (byte 0xff on line 2)"),
    (b"", (), "is empty"),
    (b" \n\t\n", (), "holds only whitespace"),
    (b"text\n", ("--kind", "char", "--vocab-size", "100"), "--vocab-size is for --kind sentencepiece"),
    (b"text\n", ("--split", "valid"), "--split is for a data folder or a corpus name"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, content, args, message):
    path = tmp_path / "in.txt"
    if content is not None:
        path.write_bytes(content)
    proc = tfx_in_process("data", "stats", str(path), *args)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("tfx: error: ") and message in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_the_search_finds_the_same_largest_size_from_either_side(tmp_path, shakespeare):
    text = (shakespeare / "shakespeare" / "train.txt").read_text(encoding="utf-8")[:300_000]
    path = tmp_path / "more.txt"
    path.write_text(text, encoding="utf-8")
    lines = text.splitlines()
    low, high = (stats(str(path), "--vocab-size", n)["tokenizer"] for n in ("500", "6000"))
    assert not low["large"] and high["large"] and low["suggestion_exact"] and high["suggestion_exact"]
    size = low["suggested_vocab_size"]
    assert size == high["suggested_vocab_size"] > 500
    assert direct_tokens(train_tokenizer(sp(size), lines), lines) >= MIN_TOKENS_PER_PIECE * size
    assert direct_tokens(train_tokenizer(sp(size + ROUND), lines), lines) < MIN_TOKENS_PER_PIECE * (size + ROUND)
