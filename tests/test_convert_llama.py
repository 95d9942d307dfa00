"""`tfx convert` with Llama: random HF Llamas (grouped kv heads; separate or tied output layer; with
biases) imported give the same logits and greedy tokens; a trained tfx run (the Llama-shaped
shakespeare-char recipe) exported loads in transformers with no weight warnings and gives them back."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO, TINY, run_tfx, sets, tfx_in_process
from hf_models import byte_bpe, load_clean, max_gap, random_ids, save_hf
from tfx.convert import convert
from tfx.decoding.generate import generate_ids
from tfx.rundir import load_run

transformers = pytest.importorskip("transformers")
TOL = 1e-5
SPECIALS = ("<unk>", "<s>", "</s>")
TOKENS = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def llama_dir(path, **kw):
    n = byte_bpe(path, specials=SPECIALS, config=TOKENS)
    cfg = transformers.LlamaConfig(**{
        "vocab_size": n, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
        "bos_token_id": n - 2, "eos_token_id": n - 1, "rope_theta": 500.0, **kw})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    save_hf(model, path)
    return model


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
                                     "num_key_value_heads": 4}], ids=["gqa-untied", "tied-biases"])
def test_import_and_export_keep_logits_and_greedy_tokens(tmp_path, kw):
    hf = llama_dir(tmp_path / "hf", **kw)
    convert(tmp_path / "hf", tmp_path / "run", log=lambda s: None)
    recipe, tok, model = load_run(tmp_path / "run")
    assert (recipe.model.position.base, tok.bos_id, tok.eos_id) == (500.0, hf.config.bos_token_id,
                                                                      hf.config.eos_token_id)
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        assert max_gap(model(ids)[0], hf(ids).logits) < TOL
    prompt = ids[0, :5]
    ours = generate_ids(model, prompt.tolist(), max_new_tokens=12, temperature=0.0)
    theirs = hf.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=12,
                         do_sample=False, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert ours == theirs
    convert(tmp_path / "run", tmp_path / "back", log=lambda s: None)
    back = load_clean(transformers.LlamaForCausalLM, tmp_path / "back")
    with torch.no_grad():
        assert max_gap(back(ids).logits, hf(ids).logits) < TOL


def test_a_trained_char_run_exports_as_llama(tmp_path, small_text):
    run_tfx("train", str(REPO / "recipes" / "lm" / "shakespeare-char.toml"),
            *sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1", "train.steps=3",
                  "train.eval_every=0", "model.n_kv_heads=2"), "--out", str(tmp_path / "c"), check=True)
    recipe, tok, model = load_run(tmp_path / "c")
    r = tfx_in_process("convert", str(tmp_path / "c"), str(tmp_path / "hf"))
    assert r.returncode == 0 and "as a llama model" in r.stderr, r.stderr
    hf = load_clean(transformers.LlamaForCausalLM, tmp_path / "hf")
    ids = random_ids(tok.vocab_size, seed=3)
    with torch.no_grad():
        assert max_gap(hf(ids).logits, model(ids)[0]) < TOL


def test_rope_scaling_and_a_gpt2_export_of_a_llama_run_are_refused(tmp_path):
    llama_dir(tmp_path / "scaled", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    r = tfx_in_process("convert", str(tmp_path / "scaled"), str(tmp_path / "x"))
    assert r.returncode == 2 and "rope scaling 'linear'" in r.stderr
    llama_dir(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "run", log=lambda s: None)
    r = tfx_in_process("convert", str(tmp_path / "run"), str(tmp_path / "y"), "--arch", "gpt2")
    assert r.returncode == 2 and "model.position.kind is 'rope'" in r.stderr and not (tmp_path / "y").exists()
