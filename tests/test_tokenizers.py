"""Tokenizers: exact round trips, unknowns, save/load, sentencepiece training, bad directories."""
from __future__ import annotations

import json

import numpy as np
import pydantic
import pytest

from tfx.data.tokenizers import (
    ByteConfig,
    ByteTokenizer,
    CharConfig,
    CharTokenizer,
    SentencePieceConfig,
    SentencePieceTokenizer,
    load_tokenizer,
    train_tokenizer,
)
from tfx.errors import UsageError
from tfx.registry import TOKENIZER

# Real English to train on: Lincoln's Gettysburg Address (public domain) and Sonnet 18.
SAMPLE = """\
Four score and seven years ago our fathers brought forth on this continent, a new nation,
conceived in Liberty, and dedicated to the proposition that all men are created equal.

Now we are engaged in a great civil war, testing whether that nation, or any nation so
conceived and so dedicated, can long endure. We are met on a great battle-field of that war.
We have come to dedicate a portion of that field, as a final resting place for those who here
gave their lives that that nation might live. It is altogether fitting and proper that we
should do this.

But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow --
this ground. The brave men, living and dead, who struggled here, have consecrated it, far
above our poor power to add or detract. The world will little note, nor long remember what we
say here, but it can never forget what they did here. It is for us the living, rather, to be
dedicated here to the unfinished work which they who fought here have thus far so nobly
advanced. It is rather for us to be here dedicated to the great task remaining before us --
that from these honored dead we take increased devotion to that cause for which they gave the
last full measure of devotion -- that we here highly resolve that these dead shall not have
died in vain -- that this nation, under God, shall have a new birth of freedom -- and that
government of the people, by the people, for the people, shall not perish from the earth.

SONNET XVIII:
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
  So long as men can breathe or eyes can see,
  So long lives this, and this gives life to thee.
"""

# Hard cases: blank lines, repeated/leading/trailing spaces, tabs, unseen and non-ASCII text.
TRICKY = [
    "",
    "\n",
    "a",
    "Shall I compare thee to a summer's day?\nThou art more lovely.\n",
    "\n\nFIRST:\n  two  spaces  inside   and three\n\n\nlast line without newline",
    "   leading and trailing   \n\t tab\tseparated\t\n \n",
    "Grüße, naïve café — 日本語 😀 \u00a0nbsp",
    "a literal <nl> and <s> </s> <unk> <pad> stay text",
    "CRLF line\r\nnext\r\n",
]


def roundtrip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.pad_id not in ids
    return tok.decode(ids)


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sp_tok(request):
    cfg = SentencePieceConfig(vocab_size=600, model_type=request.param)
    return train_tokenizer(cfg, [SAMPLE] * 3)


def test_registry_has_the_three_kinds_with_their_configs():
    assert {"byte", "char", "sentencepiece"} <= set(TOKENIZER.names())
    assert issubclass(TOKENIZER.config_model("sentencepiece"), SentencePieceConfig)
    assert SentencePieceConfig().vocab_size == 2000 and SentencePieceConfig().model_type == "bpe"
    with pytest.raises(pydantic.ValidationError):
        ByteConfig(kind="byte", vocab=3)  # unknown keys are errors
    with pytest.raises(pydantic.ValidationError):
        SentencePieceConfig(vocab_size=4)
    with pytest.raises(pydantic.ValidationError):
        SentencePieceConfig(model_type="wordpiece")


@pytest.mark.parametrize("text", TRICKY + [SAMPLE])
def test_byte_roundtrip(text):
    assert roundtrip(ByteTokenizer(), text) == text


def test_byte_ids_and_specials():
    tok = train_tokenizer(ByteConfig(), ["ignored"])
    assert tok.vocab_size == 260
    assert tok.encode("A\n") == [ord("A") + 4, ord("\n") + 4]
    assert tok.encode("é") == [0xC3 + 4, 0xA9 + 4]
    assert tok.decode([1, 72 + 4, 0, 3, 105 + 4, 2, 9999, -1]) == "Hi"
    assert tok.decode(np.array([72 + 4, 105 + 4])) == "Hi"
    assert tok.decode([0xC3 + 4]) == "\ufffd"  # a cut UTF-8 sequence never raises


@pytest.mark.parametrize("text", TRICKY + [SAMPLE])
def test_char_roundtrip_on_seen_characters(text):
    tok = train_tokenizer(CharConfig(), [text, "x"])
    assert roundtrip(tok, text) == text


def test_char_vocabulary_is_sorted_after_specials():
    tok = train_tokenizer(CharConfig(), ["hello\n", "world"])
    assert tok.chars == sorted(set("hello\nworld"))
    assert tok.vocab_size == 4 + len(tok.chars)
    assert tok.encode("\n") == [4]  # "\n" sorts first
    assert tok.decode([1, 0] + tok.encode("low") + [2]) == "low"


def test_char_unknown_becomes_unk_and_decodes_to_replacement():
    tok = train_tokenizer(CharConfig(), [SAMPLE])
    assert not {"Z", "ß", "😀"} & set(SAMPLE)
    ids = tok.encode("Zeal 😀 ß")
    assert ids.count(tok.unk_id) == 3
    assert tok.decode(ids) == "\ufffdeal \ufffd \ufffd"
    assert tok.decode([tok.vocab_size, 10**6, -3]) == "\ufffd" * 3
    assert train_tokenizer(CharConfig(), []).encode("ab") == [3, 3]


def test_char_decode_accepts_arrays():
    tok = train_tokenizer(CharConfig(), [SAMPLE])
    ids = tok.encode(SAMPLE)
    assert tok.decode(np.asarray(ids)) == SAMPLE
    assert tok.decode(iter(ids)) == SAMPLE


@pytest.mark.parametrize("text", TRICKY + [SAMPLE, SAMPLE * 2])
def test_sentencepiece_roundtrip(sp_tok, text):
    assert roundtrip(sp_tok, text) == text


def test_sentencepiece_learns_subwords_and_uses_a_newline_id(sp_tok):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert sp_tok.config.model_type in ("bpe", "unigram")
    assert sp_tok.vocab_size <= 600
    ids = sp_tok.encode(SAMPLE)
    assert len(ids) < len(SAMPLE) / 2  # real merges, not characters
    assert ids.count(sp_tok.newline_id) == SAMPLE.count("\n")
    assert sp_tok.newline_id not in sp_tok.encode("a literal <nl>")
    specials = [sp_tok.bos_id, sp_tok.pad_id, sp_tok.eos_id]
    assert sp_tok.decode(specials + sp_tok.encode("We are met.") + specials) == "We are met."
    assert sp_tok.decode([sp_tok.vocab_size + 5]) == "\ufffd"


def test_sentencepiece_without_byte_fallback_maps_unseen_to_unk():
    tok = train_tokenizer(SentencePieceConfig(vocab_size=200, byte_fallback=False), [SAMPLE])
    ids = tok.encode("nation 😀")
    assert tok.unk_id in ids
    assert tok.decode(ids) == "nation \ufffd"


def test_sentencepiece_bad_training_is_a_usage_error():
    with pytest.raises(UsageError, match="sentencepiece could not train"):
        train_tokenizer(SentencePieceConfig(vocab_size=300), [""])


@pytest.mark.parametrize("kind", ["byte", "char", "sentencepiece"])
def test_save_load_gives_identical_ids(tmp_path, kind):
    cfg = {"byte": ByteConfig(), "char": CharConfig(),
           "sentencepiece": SentencePieceConfig(vocab_size=350, model_type="unigram")}[kind]
    tok = train_tokenizer(cfg, [SAMPLE])
    tok.save(tmp_path / "tok")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert spec["kind"] == kind
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert loaded.config.model_dump() == tok.config.model_dump()
    for text in [SAMPLE, *TRICKY]:
        assert loaded.encode(text) == tok.encode(text)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == (
        ["sp.model", "tokenizer.json"] if kind == "sentencepiece" else ["tokenizer.json"])


def test_sentencepiece_path_reuses_a_saved_tokenizer(tmp_path):
    tok = train_tokenizer(SentencePieceConfig(vocab_size=400), [SAMPLE])
    tok.save(tmp_path / "sp")
    reused = train_tokenizer(SentencePieceConfig(path=str(tmp_path / "sp")), ["other text"])
    assert reused.encode(SAMPLE) == tok.encode(SAMPLE)
    ByteTokenizer().save(tmp_path / "bytes")
    with pytest.raises(UsageError, match="not a sentencepiece"):
        train_tokenizer(SentencePieceConfig(path=str(tmp_path / "bytes")), [])
    with pytest.raises(UsageError, match="no tokenizer"):
        train_tokenizer(SentencePieceConfig(path=str(tmp_path / "nowhere")), [])


def test_load_missing_or_corrupt_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no tokenizer at .*missing"):
        load_tokenizer(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    spec = bad / "tokenizer.json"
    for content, match in [("{not json", "corrupt tokenizer file"),
                           ('{"no": "kind"}', "corrupt tokenizer file"),
                           ('{"kind": "wordpiece"}', "unknown tokenizer kind 'wordpiece'"),
                           ('{"kind": "char", "chars": "abc"}', "corrupt char tokenizer"),
                           ('{"kind": "char", "chars": ["ab"]}', "corrupt char tokenizer"),
                           ('{"kind": "sentencepiece"}', "corrupt sentencepiece tokenizer")]:
        spec.write_text(content)
        with pytest.raises(UsageError, match=match) as err:
            load_tokenizer(bad)
        assert str(bad) in str(err.value)
    (bad / "sp.model").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="corrupt sentencepiece tokenizer"):
        load_tokenizer(bad)


def test_char_encode_is_vectorised_enough():
    # Not a timing assertion: a 1 MB text must simply encode correctly in one call.
    text = SAMPLE * (1_000_000 // len(SAMPLE))
    tok = CharTokenizer(chars=set(SAMPLE))
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.unk_id not in ids


def test_sentencepiece_lowercase_folds_case_in_training_and_encoding(tmp_path):
    folded = train_tokenizer(SentencePieceConfig(vocab_size=400, lowercase=True), [SAMPLE])
    kept = train_tokenizer(SentencePieceConfig(vocab_size=400), [SAMPLE])
    text = "We Are MET on a great Battle-field"
    assert folded.encode(text) == folded.encode(text.lower())
    assert folded.decode(folded.encode(text)) == text.lower()
    assert kept.encode(text) != kept.encode(text.lower())  # the default keeps case
    folded.save(tmp_path / "sp")
    assert load_tokenizer(tmp_path / "sp").encode(text) == folded.encode(text.lower())
