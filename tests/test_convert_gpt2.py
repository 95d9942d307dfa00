"""`tfx convert` with GPT-2: a random HF GPT-2 imported gives the same logits and greedy tokens;
a trained tfx run exported loads in transformers with no weight warnings and gives them back."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, TINY, run_tfx, sets, tfx_in_process
from hf_models import byte_bpe, load_clean, max_gap, random_ids, save_hf
from tfx.convert import convert
from tfx.decoding.generate import generate_ids
from tfx.rundir import load_run

transformers = pytest.importorskip("transformers")
TOL = 1e-5
LM = str(REPO / "recipes" / "lm" / "shakespeare-char.toml")


def gpt2_dir(path, **kw):
    n = byte_bpe(path)
    cfg = transformers.GPT2Config(vocab_size=n, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=n - 1, eos_token_id=n - 1, **kw)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    save_hf(model, path)
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    hf = gpt2_dir(root / "hf")
    convert(root / "hf", root / "run", log=lambda s: None)
    return root, hf


def test_import_gives_the_same_logits_and_greedy_tokens(imported):
    root, hf = imported
    recipe, tok, model = load_run(root / "run")
    assert recipe.model.ffn == "gelu_tanh" and tok.kind == "hf" and tok.eos_id == hf.config.eos_token_id
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        gap = max_gap(model(ids)[0], hf(ids).logits)
    assert gap < TOL
    prompt = ids[0, :5]
    ours = generate_ids(model, prompt.tolist(), max_new_tokens=12, temperature=0.0)
    theirs = hf.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=12,
                         do_sample=False, pad_token_id=0, eos_token_id=None)[0, 5:].tolist()
    assert ours == theirs


def test_export_round_trip_loads_cleanly(imported):
    root, hf = imported
    convert(root / "run", root / "back", log=lambda s: None)
    back = load_clean(transformers.GPT2LMHeadModel, root / "back")
    ids = random_ids(hf.config.vocab_size, seed=1)
    with torch.no_grad():
        assert max_gap(back(ids).logits, hf(ids).logits) < TOL
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "back"))
    assert tok("the quick fox", add_special_tokens=False).input_ids == \
        load_run(root / "run")[1].encode("the quick fox")


def test_a_trained_run_exports_with_the_same_logits(tmp_path, small_text):
    run_tfx("train", LM, *sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1",
                               "tokenizer.kind='byte'", "model.position.kind='learned'",
                               "model.norm='layernorm'", "model.ffn='gelu'", "model.bias=true", "train.steps=3",
                               "train.eval_every=0"), "--out", str(tmp_path / "g"), check=True)
    _, _, model = load_run(tmp_path / "g")
    result = tfx_in_process("convert", str(tmp_path / "g"), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "weights only" in result.stderr  # a byte tokenizer has no Hugging Face form
    hf = load_clean(transformers.GPT2LMHeadModel, tmp_path / "hf")
    ids = random_ids(260, seed=2)
    with torch.no_grad():
        assert max_gap(hf(ids).logits, model(ids)[0]) < TOL


def test_refusals_are_usage_errors(tmp_path, imported):
    root, _ = imported
    gpt2_dir(tmp_path / "cross", scale_attn_by_inverse_layer_idx=True)
    r = tfx_in_process("convert", str(tmp_path / "cross"), str(tmp_path / "x"))
    assert r.returncode == 2 and "scale_attn_by_inverse_layer_idx" in r.stderr and not (tmp_path / "x").exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    r = tfx_in_process("convert", str(pickled), str(tmp_path / "y"))
    assert r.returncode == 2 and "pickle" in r.stderr
    r = tfx_in_process("convert", str(root / "hf"), str(root / "run"))
    assert r.returncode == 2 and "exists" in r.stderr
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    r = tfx_in_process("convert", str(tmp_path / "t5"), str(tmp_path / "z"))
    assert r.returncode == 2 and "model_type 't5'" in r.stderr


def test_cli_generates_from_an_imported_run(imported):
    root, _ = imported
    r = run_tfx("generate", str(root / "run"), "the quick", "--max-new-tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
