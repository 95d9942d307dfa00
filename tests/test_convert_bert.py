"""`tfx convert` with BERT: a random HF BertForMaskedLM / BertForSequenceClassification imported gives
the same logits, padding included; exported back (and a tfx classifier trained with BERT's options)
it loads in transformers with no weight warnings and gives them again; settings tfx cannot express
are refused with their reason."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from conftest import TINY, sets, tfx_in_process
from hf_models import lines, load_clean, max_gap, random_ids
from tfx.convert import bert, convert
from tfx.convert.hfdir import read_config, read_tensors
from tfx.rundir import load_run

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
TOL = 1e-5
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MASK = 4  # [MASK]'s id in the WordPiece vocabulary (the specials come first)
LABELS = {0: "neg", 1: "neutral", 2: "pos"}  # not in sorted order: id2label's order must be kept


def wordpiece(directory) -> int:
    """A BERT-style WordPiece tokenizer.json and special_tokens_map.json; returns its size."""
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(lines(), trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIALS,
                                                               show_progress=False))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}))
    assert tok.token_to_id("[MASK]") == MASK
    return tok.get_vocab_size()


def bert_dir(path, cls, **kw):
    """A random tiny `cls` saved in `path` with a WordPiece tokenizer. The norms, biases and token
    type table are random too (a fresh model has unit gains and zeros there), so that each tensor's
    place is checked."""
    n = wordpiece(path)
    cfg = transformers.BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, initializer_range=0.1, **kw)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
            elif "LayerNorm" in name:
                p.normal_(1, 0.3)
        model.bert.embeddings.token_type_embeddings.weight.normal_(0, 0.5)
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    mlm = bert_dir(root / "mlm", transformers.BertForMaskedLM)
    clf = bert_dir(root / "clf", transformers.BertForSequenceClassification, id2label=LABELS,
                   label2id={v: k for k, v in LABELS.items()})
    for name in ("mlm", "clf"):
        convert(root / name, root / f"{name}-run", log=lambda s: None)
    return root, mlm, clf


def padded(vocab: int, seed: int = 0):
    """(2, 12) ids starting with [CLS] and an attention mask with the second row's last 4 positions padding."""
    ids = random_ids(vocab, seed=seed)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = 0  # [PAD]
    return ids, mask


def test_masked_lm_import_gives_the_same_logits_with_padding(imported):
    root, hf, _ = imported
    recipe, tok, model = load_run(root / "mlm-run")
    m = recipe.model
    assert recipe.family == "mlm"
    assert (m.norm_position, m.embed_norm, m.head_transform, m.ffn, m.context) == ("post", True, True, "gelu", 32)
    assert tok.kind == "hf" and (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 0)  # [CLS], [SEP], [PAD]
    V = hf.config.vocab_size
    assert model.mask_id == V and model.encoder.embed.num_embeddings == V + 1
    ids, mask = padded(V)
    real = mask.bool()
    with torch.no_grad():
        ours, theirs = model(ids, real)[..., :V], hf(ids, attention_mask=mask).logits
        unmasked = model(ids, None)[..., :V]
    gap = max_gap(ours[real], theirs[real])
    assert gap < TOL, gap
    assert max_gap(unmasked[real], theirs[real]) > 1e-3  # the padding mask is what makes them equal


def test_the_extra_mask_row_is_berts_mask_when_the_tokenizer_files_are_read(imported):
    """to_tfx with the model directory copies [MASK]'s embedding and output bias to tfx's id V, so
    masking with V is masking with BERT's [MASK]; without it (config.json names no mask id) the row is zero."""
    root, hf, _ = imported
    config, tensors = read_config(root / "mlm"), read_tensors(root / "mlm")
    assert bert.mask_token_id(config, root / "mlm") == MASK
    imp = bert.to_tfx(config, tensors, None, hf_dir=root / "mlm")
    _, _, model = load_run(root / "mlm-run")
    assert all(torch.equal(imp.state[k], v) for k, v in model.state_dict().items())
    V = hf.config.vocab_size
    ids, mask = padded(V, seed=3)
    ids[:, 3:5] = MASK
    ours = ids.clone()
    ours[ids == MASK] = V
    with torch.no_grad():
        gap = max_gap(model(ours, mask.bool())[..., :V][mask.bool()], hf(ids, attention_mask=mask).logits[mask.bool()])
    assert gap < TOL, gap
    plain = bert.to_tfx(config, tensors, None)
    assert not plain.state["encoder.embed.weight"][-1].any() and plain.state["head.bias"][-1] == 0
    # tfx convert hands the module the model directory: the run's row V is BERT's [MASK]
    assert torch.equal(model.encoder.embed.weight[-1], hf.bert.embeddings.word_embeddings.weight[MASK])


def test_classifier_import_gives_the_same_logits_and_labels_in_id_order(imported):
    root, _, hf = imported
    recipe, _, model = load_run(root / "clf-run")
    assert recipe.family == "classifier" and recipe.model.pool == "pooler"
    assert json.loads((root / "clf-run" / "labels.json").read_text()) == ["neg", "neutral", "pos"]
    ids, mask = padded(hf.config.vocab_size, seed=1)
    with torch.no_grad():
        ours, theirs = model(ids, mask.bool()), hf(ids, attention_mask=mask).logits
        unmasked = model(ids, torch.ones_like(mask, dtype=torch.bool))
    gap = max_gap(ours, theirs)
    assert gap < TOL, gap
    assert theirs.abs().max() > 0.1 and max_gap(unmasked[1], theirs[1]) > 1e-4


@pytest.mark.parametrize("name,cls", [("mlm", "BertForMaskedLM"), ("clf", "BertForSequenceClassification")])
def test_export_round_trip_loads_cleanly(imported, name, cls):
    root = imported[0]
    hf = imported[1] if name == "mlm" else imported[2]
    convert(root / f"{name}-run", root / f"{name}-back", log=lambda s: None)
    back = load_clean(getattr(transformers, cls), root / f"{name}-back")
    ids, mask = padded(hf.config.vocab_size, seed=2)
    with torch.no_grad():
        ours, theirs = back(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    real = mask.bool() if name == "mlm" else slice(None)
    gap = max_gap(ours[real], theirs[real])
    assert gap < TOL, gap
    config = json.loads((root / f"{name}-back" / "config.json").read_text())
    assert config["architectures"] == [cls] and config["vocab_size"] == hf.config.vocab_size
    assert config["pad_token_id"] == 0 and config["type_vocab_size"] == 2
    tok = transformers.AutoTokenizer.from_pretrained(str(root / f"{name}-back"))
    assert tok("the quick fox", add_special_tokens=False).input_ids == \
        load_run(root / f"{name}-run")[1].encode("the quick fox")
    assert (tok.mask_token, tok.cls_token, tok.sep_token) == ("[MASK]", "[CLS]", "[SEP]")  # kept from the import
    if name == "clf":  # the labels in the run's order: tfx convert hands the module the run's folder
        assert config["id2label"] == {str(k): v for k, v in LABELS.items()}
        assert config["label2id"] == {v: k for k, v in LABELS.items()}


def test_a_trained_classifier_exports_with_the_same_logits(tmp_path):
    rng = random.Random(0)
    words = {"good": "great fine lovely".split(), "bad": "awful poor dull".split(), "meh": "okay plain so".split()}
    rows = [f"{' '.join(rng.choice(words[label]) for _ in range(4))} film\t{label}"
            for label in words for _ in range(6)]
    (tmp_path / "data.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    (tmp_path / "recipe.toml").write_text(f"""name = "bertish"
family = "classifier"
[data]
train = "{tmp_path / 'data.tsv'}"
holdout = 0.25
[tokenizer]
kind = "byte"
[model]
norm_position = "post"
embed_norm = true
pool = "pooler"
norm = "layernorm"
ffn = "gelu"
bias = true
dropout = 0.1
norm_eps = 1e-12
[model.position]
kind = "learned"
[train]
steps = 2
eval_every = 0
[train.schedule]
kind = "cosine"
""")
    r = tfx_in_process("train", str(tmp_path / "recipe.toml"), *sets(*TINY, "train.threads=1"),
                       "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    recipe, tok, model = load_run(tmp_path / "run")
    result = tfx_in_process("convert", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "as a bert model" in result.stderr and "weights only" in result.stderr  # a byte tokenizer
    hf = load_clean(transformers.BertForSequenceClassification, tmp_path / "hf")
    assert hf.config.vocab_size == tok.vocab_size and hf.config.pad_token_id == tok.pad_id
    ids, mask = padded(tok.vocab_size, seed=4)
    ids[:, 0] = tok.bos_id
    with torch.no_grad():
        gap = max_gap(hf(ids, attention_mask=mask).logits, model(ids, mask.bool()))
    assert gap < TOL, gap
    config, _ = bert.from_tfx(recipe, model, tok, run_dir=tmp_path / "run")
    assert config["id2label"] == {"0": "bad", "1": "good", "2": "meh"}  # the run's (sorted) label ids


def test_refusals_are_usage_errors(tmp_path, imported):
    root = imported[0]

    def edited(name: str, src: str, **changes):
        shutil.copytree(root / src, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **changes}))
        return str(tmp_path / name)

    def refused(src: str, *args: str) -> str:
        r = tfx_in_process("convert", src, str(tmp_path / "out"), *args)
        assert r.returncode == 2 and not (tmp_path / "out").exists(), (r.returncode, r.stderr)
        return r.stderr

    relative = edited("rel", "clf", position_embedding_type="relative_key")
    assert "position_embedding_type 'relative_key'" in refused(relative)
    assert "problem_type 'regression'" in refused(edited("reg", "clf", problem_type="regression"))
    one = tmp_path / "one"
    bert_dir(one, transformers.BertForSequenceClassification, num_labels=1)
    assert "num_labels 1" in refused(str(one))
    assert "hidden_act 'relu'" in refused(edited("relu", "mlm", hidden_act="relu"))
    assert "is_decoder" in refused(edited("dec", "mlm", is_decoder=True))
    assert "--family" in refused(edited("plain", "mlm", architectures=["BertModel"]))
    assert "no classifier.weight" in refused(str(root / "mlm"), "--family", "classifier")
    assert "no cls.predictions.bias" in refused(str(root / "clf"), "--family", "mlm")
    r = tfx_in_process("convert", str(root / "mlm-run"), str(tmp_path / "gpt"), "--arch", "gpt2")
    assert r.returncode == 2 and "converts lm runs, not mlm" in r.stderr
