"""The "hf" tokenizer kind: a Hugging Face tokenizer.json with the model's own ids, saved, reloaded and
exported; special ids from a model directory; generation never bans its stop token."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from tfx.config import validate
from tfx.data.tokenizer_hf import HF_FILE, HFTokenizer, HFTokenizerConfig
from tfx.data.tokenizers import SPEC_FILE, Tokenizer, load_tokenizer, train_tokenizer
from tfx.decoding.generate import generate_text
from tfx.errors import UsageError
from tfx.families import build_model

tokenizers = pytest.importorskip("tokenizers")

WORDS = ("the quick brown fox jumps over a lazy dog while café naïve über Straße 東京 😀 "
         "ninety-nine bottles of beer on the wall").split()
TEXT = "Straße café, 東京 😀 — the quick fox\n  jumps over\tthe lazy dog!"
EOT = "<|endoftext|>"


def _lines(n: int = 300) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """A GPT-2-like byte-level BPE (no pad, no unk) whose one special token comes last, as GPT-2's."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_lines(), trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([EOT])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A BERT-like WordPiece model directory: specials in special_tokens_map.json, pad in config.json."""
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_lines(), trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    d = tmp_path_factory.mktemp("bert")
    tok.save(str(d / "tokenizer.json"))
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}
    (d / "special_tokens_map.json").write_text(json.dumps(specials))
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "pad_token_id": 0}))
    return d


def _eot(path) -> int:
    return tokenizers.Tokenizer.from_file(str(path)).token_to_id(EOT)


def test_encode_is_the_files_ids_and_decode_round_trips(bpe_file):
    ref = tokenizers.Tokenizer.from_file(str(bpe_file))
    tok = HFTokenizer.from_hf_file(bpe_file, eos_id=_eot(bpe_file))
    assert tok.encode(TEXT) == ref.encode(TEXT, add_special_tokens=False).ids
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode("") == [] and tok.decode([]) == ""
    # no pad, bos or unk token: all are eos, which decode skips, as it skips ids outside the file
    eot = _eot(bpe_file)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (eot, eot, eot, eot) == (300, 300, 300, 300)
    assert tok.vocab_size == 301 and tok.special_tokens["eos"] == EOT
    ids = tok.encode("the fox")
    assert tok.decode([eot, *ids, -1, 301, 10**12, eot]) == "the fox"
    assert tok.decode(torch.tensor(ids)) == "the fox"


def test_save_and_load_keep_ids_special_ids_and_a_padded_vocab_size(bpe_file, tmp_path):
    tok = HFTokenizer.from_hf_file(bpe_file, vocab_size=320, eos_id=_eot(bpe_file), pad_id=5)
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / HF_FILE).read_bytes() == bpe_file.read_bytes()
    spec = json.loads((tmp_path / "tok" / SPEC_FILE).read_text())
    assert spec["kind"] == "hf" and spec["vocab_size"] == 320 and spec["pad_id"] == 5
    assert spec["special_tokens"]["eos"] == EOT
    back = load_tokenizer(tmp_path / "tok")
    assert isinstance(back, HFTokenizer) and back.vocab_size == 320 and back.n_tokens == 301
    assert (back.pad_id, back.bos_id, back.eos_id, back.unk_id) == (5, 300, 300, 300)
    assert back.encode(TEXT) == tok.encode(TEXT) and back.decode(back.encode(TEXT)) == TEXT
    assert back.decode([310, 319]) == ""  # padded rows beyond the file's tokens
    assert (Tokenizer.pad_id, Tokenizer.eos_id) == (0, 2)  # the other kinds' class defaults are untouched


def test_bad_arguments_are_value_errors(bpe_file):
    with pytest.raises(ValueError, match="smaller than the tokenizer's 301 tokens"):
        HFTokenizer.from_hf_file(bpe_file, vocab_size=300, eos_id=300)
    with pytest.raises(ValueError, match="no eos"):
        HFTokenizer.from_hf_file(bpe_file)
    with pytest.raises(ValueError, match="pad_id"):
        HFTokenizer.from_hf_file(bpe_file, eos_id=300, pad_id=301)
    assert HFTokenizer.from_hf_file(bpe_file, bos_id=300).eos_id == 300  # bos alone serves as eos


@pytest.mark.parametrize("damage", ["corrupt", "missing", "bad id"])
def test_a_damaged_directory_is_a_usage_error(bpe_file, tmp_path, damage):
    HFTokenizer.from_hf_file(bpe_file, eos_id=300).save(tmp_path)
    if damage == "corrupt":
        (tmp_path / HF_FILE).write_text('{"model": [1, 2')
    elif damage == "missing":
        (tmp_path / HF_FILE).unlink()
    else:
        spec = json.loads((tmp_path / SPEC_FILE).read_text())
        (tmp_path / SPEC_FILE).write_text(json.dumps({**spec, "eos_id": "300"}))
    with pytest.raises(UsageError, match="corrupt hf tokenizer"):
        load_tokenizer(tmp_path)


def test_special_ids_from_model_directories(bpe_file, bert_dir, tmp_path):
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "tokenizer.json").write_bytes(bpe_file.read_bytes())
    (gpt / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": EOT, "special": True}, "eos_token": EOT, "pad_token": None}))
    (gpt / "config.json").write_text("{not json")  # unreadable: skipped
    assert HFTokenizer.special_ids_from_hf_dir(gpt) == {"pad_id": None, "bos_id": 300, "eos_id": 300, "unk_id": None}
    assert HFTokenizer.from_hf_dir(gpt).pad_id == 300

    ids = HFTokenizer.special_ids_from_hf_dir(bert_dir)  # [CLS] as bos, [SEP] as eos
    assert ids == {"pad_id": 0, "bos_id": 2, "eos_id": 3, "unk_id": 1}
    bert = HFTokenizer.from_hf_dir(bert_dir, unk_id=4)
    assert (bert.pad_id, bert.bos_id, bert.eos_id, bert.unk_id) == (0, 2, 3, 4)
    assert bert.encode("the fox") == tokenizers.Tokenizer.from_file(
        str(bert_dir / "tokenizer.json")).encode("the fox", add_special_tokens=False).ids

    marian = tmp_path / "marian"  # ids from config.json only: a list of eos ids, a decoder start
    marian.mkdir()
    (marian / "config.json").write_text(json.dumps(
        {"is_encoder_decoder": True, "eos_token_id": [7, 8], "bos_token_id": 7, "pad_token_id": 9,
         "decoder_start_token_id": 9}))
    assert HFTokenizer.special_ids_from_hf_dir(marian) == {"pad_id": 9, "bos_id": 9, "eos_id": 7, "unk_id": None}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert set(HFTokenizer.special_ids_from_hf_dir(empty).values()) == {None}


def test_save_hf_loads_in_transformers_with_the_same_ids(bpe_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = HFTokenizer.from_hf_file(bpe_file, eos_id=300)
    tok.save_hf(tmp_path / "export")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert auto.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)
    assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token_id) == (300, 300, 300)
    assert auto.decode(tok.encode(TEXT)) == TEXT
    tok.save(tmp_path / "tfx")
    with pytest.raises(ValueError, match="tfx tokenizer directory"):
        tok.save_hf(tmp_path / "tfx")


def test_training_is_a_usage_error_and_path_reuses_a_tokenizer(bpe_file, bert_dir, tmp_path):
    recipe = validate({"data": {"train": "x"}, "tokenizer": {"kind": "hf"}})
    assert recipe.tokenizer.kind == "hf"
    with pytest.raises(UsageError, match="imported with `tfx convert`"):
        train_tokenizer(recipe.tokenizer, ["some text"])
    assert train_tokenizer(HFTokenizerConfig(path=str(bert_dir)), []).eos_id == 3
    with pytest.raises(UsageError, match="no eos"):  # a bare tokenizer.json whose folder names no specials
        train_tokenizer(HFTokenizerConfig(path=str(bpe_file)), [])
    HFTokenizer.from_hf_file(bpe_file, eos_id=300, pad_id=4).save(tmp_path / "saved")
    assert train_tokenizer(HFTokenizerConfig(path=str(tmp_path / "saved")), []).pad_id == 4
    with pytest.raises(UsageError, match="does not exist"):
        train_tokenizer(HFTokenizerConfig(path=str(tmp_path / "nothing")), [])


def test_generation_stops_at_eos_when_pad_and_unk_are_eos(bpe_file):
    recipe = validate({"data": {"train": "x"}, "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "context": 32}})
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=301).eval()
    prompt = "the fox"
    probe = HFTokenizer.from_hf_file(bpe_file, eos_id=300)
    logits, _ = model(torch.tensor([[probe.bos_id, *probe.encode(prompt)]]))
    first = int(logits[0, -1].argmax())  # what greedy decoding picks first
    # eos = pad = unk = that token: generation stops at once; banning pad/unk would have banned it
    tok = HFTokenizer.from_hf_file(bpe_file, eos_id=first, bos_id=300)
    assert generate_text(model, tok, prompt, max_new_tokens=8, temperature=0) == ""
    assert generate_text(model, probe, prompt, max_new_tokens=8, temperature=0) != ""  # eos elsewhere: it goes on


def test_importing_tfx_does_not_import_tokenizers():
    code = "import sys, tfx, tfx.data.tokenizers, tfx.config; print('tokenizers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
