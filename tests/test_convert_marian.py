"""`tfx convert` with Marian (MarianMTModel): a random HF Marian imported gives the same teacher-forced
logits and greedy translations; exported back, and a trained tfx seq2seq run exported, it loads in
transformers with no weight warnings and gives the same logits; what tfx cannot express is refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tfx_in_process
from hf_models import byte_bpe, load_clean, max_gap, random_ids, save_hf
from tfx.convert import convert
from tfx.convert.marian import export_problems, sinusoid
from tfx.decoding.beam import greedy
from tfx.nn.positions import sinusoid_table
from tfx.rundir import load_run

transformers = pytest.importorskip("transformers")
TOL = 1e-5
SPECIALS = ("</s>", "<unk>", "<pad>")  # last in the tokenizer: eos, unk, pad = n - 3, n - 2, n - 1
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "<unk>",
                    "pad_token": "<pad>"}


def marian_dir(path, *, layers=(2, 2), randomize=True, **kw):
    """A random MarianMTModel (every weight, norm and bias drawn, so no mapping hides behind an init
    of zeros and ones) saved with a byte-BPE tokenizer.json; Marian starts the target with pad."""
    n = byte_bpe(path, specials=SPECIALS, config=TOKENIZER_CONFIG)
    cfg = transformers.MarianConfig(
        vocab_size=n, d_model=32, encoder_layers=layers[0], decoder_layers=layers[1], encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
        activation_function="swish", scale_embedding=True, eos_token_id=n - 3, forced_eos_token_id=n - 3,
        pad_token_id=n - 1, decoder_start_token_id=n - 1, **kw)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(cfg).eval()
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "embed_positions" not in name:
                    p.copy_(torch.randn_like(p) * 0.3 + name.endswith("layer_norm.weight"))
    save_hf(model, path)
    return model


def sources(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two source rows ending in eos, the second padded (ids from the byte-BPE part, no specials)."""
    src = random_ids(n - 3, (2, 9), seed=3)
    src[:, -1] = n - 3
    src[1, 5], src[1, 6:] = n - 3, n - 1
    return src, src != n - 1


@pytest.fixture(scope="module", params=[(2, 2), (3, 1)], ids=["2+2", "3+1"])
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("marian")
    hf = marian_dir(root / "hf", layers=request.param)
    convert(root / "hf", root / "run", log=lambda s: None)
    return root, hf


def teacher_forced(model, src, mask, tgt) -> torch.Tensor:
    """tfx's decoder logits over the target ids `tgt` (B, T) given the source."""
    with torch.no_grad():
        return model(tgt, model.new_state(model.encode(src, mask), mask, tgt.shape[1]))[0]


def hf_logits(hf, src, mask, tgt) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits


def targets(n: int, seed: int = 4) -> torch.Tensor:
    return torch.cat([torch.full((2, 1), n - 1), random_ids(n - 3, (2, 7), seed=seed)], 1)


def test_import_gives_the_same_logits(imported):
    root, hf = imported
    recipe, tok, model = load_run(root / "run")
    n = hf.config.vocab_size
    m = recipe.model
    assert (m.encoder_layers, m.decoder_layers) == (hf.config.encoder_layers, hf.config.decoder_layers)
    assert (m.ffn, m.norm_position, m.position.layout) == ("silu", "post", "halves")
    assert tok.kind == "hf" and (tok.eos_id, tok.pad_id, tok.bos_id) == (n - 3, n - 1, hf.config.decoder_start_token_id)
    assert model.encoder.embed is model.decoder.embed and model.head.weight is model.encoder.embed.weight
    src, mask = sources(n)
    tgt = targets(n)
    ours = teacher_forced(model, src, mask, tgt)
    gap = max_gap(ours, hf_logits(hf, src, mask, tgt))
    print(f"import logit gap {gap:.3g}")
    assert gap < TOL
    # both compute the position table in float64: with tfx's table in HF's model the logits are the
    # same to the bit
    same = copy.deepcopy(hf)
    table = sinusoid_table(torch.arange(32), 32, 10000.0, "halves")
    with torch.no_grad():
        for stack in (same.model.encoder, same.model.decoder):
            stack.embed_positions.weight.copy_(table)
    assert max_gap(ours, hf_logits(same, src, mask, tgt)) == 0


def test_import_gives_the_same_greedy_translations(imported):
    root, hf = imported
    _, tok, model = load_run(root / "run")
    src, mask = sources(hf.config.vocab_size)
    ours = [h.tokens for h in greedy(model, src, mask, bos=tok.bos_id, eos=tok.eos_id, max_len=[10, 10])]
    with torch.no_grad():  # the saved generation config: start with pad, eos forced at the 10th token
        out = hf.generate(input_ids=src, attention_mask=mask.long(), do_sample=False, num_beams=1, max_new_tokens=10)
    assert (out[:, 0] == tok.bos_id).all()
    theirs = [row[1:].tolist() for row in out]
    theirs = [row[:row.index(tok.eos_id)] for row in theirs]  # each ends with eos (forced at the latest)
    assert ours == theirs
    # the comparison means something: the tokens vary and depend on the source (random models soon
    # repeat one token: these weights were drawn to avoid it)
    assert any(len(set(t)) > 2 for t in ours) and ours[0] != ours[1]


def test_cli_translates_as_hf_generates(imported):
    """`tfx generate RUN TEXT` on the imported run: the source gets eos, the target starts with the
    decoder start token, and the translation is HF's greedy one (same length limit, eos forced)."""
    root, hf = imported
    _, tok, _ = load_run(root / "run")
    text = "the quick brown fox"
    src = torch.tensor([tok.encode(text) + [tok.eos_id]])
    limit = min(31, int(1.2 * src.shape[1] + 10))  # generate.max_len_a/b, capped at the context - 1
    with torch.no_grad():
        out = hf.generate(input_ids=src, attention_mask=torch.ones_like(src), do_sample=False, num_beams=1,
                          max_new_tokens=limit)[0, 1:].tolist()
    r = tfx_in_process("generate", str(root / "run"), text)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == tok.decode(out[:out.index(tok.eos_id)])


def test_export_round_trip_loads_cleanly(imported):
    root, hf = imported
    convert(root / "run", root / "back", log=lambda s: None)
    back = load_clean(transformers.MarianMTModel, root / "back")
    config = json.loads((root / "back" / "config.json").read_text())
    for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id", "encoder_layers", "decoder_layers",
                "activation_function", "max_position_embeddings"):
        assert config[key] == getattr(hf.config, key), key
    n = hf.config.vocab_size
    src, mask = sources(n)
    tgt = targets(n, seed=5)
    gap = max_gap(hf_logits(back, src, mask, tgt), hf_logits(hf, src, mask, tgt))
    print(f"round-trip logit gap {gap:.3g}")
    assert gap < TOL
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "back"))
    assert tok("the quick fox", add_special_tokens=False).input_ids == \
        load_run(root / "run")[1].encode("the quick fox")


def test_a_trained_run_exports_with_the_same_logits(tmp_path):
    from tfx import run

    pairs = [(f"ein haus {i}", f"a house {i}") for i in range(40)]
    (tmp_path / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'''
family = "seq2seq"
[data]
train = "{tmp_path / 'pairs.tsv'}"
[tokenizer]
kind = "byte"
[model]
d_model = 32
n_heads = 4
encoder_layers = 2
decoder_layers = 1
d_ff = 64
context = 32
norm_position = "post"
ffn = "silu"
bias = true
tie_embeddings = true
[model.position]
kind = "sinusoidal"
layout = "halves"
[train]
steps = 2
batch_size = 8
device = "cpu"
threads = 1
eval_every = 0
precision = "fp32"
''')
    threads = torch.get_num_threads()
    try:
        run.train(str(recipe), overrides=[], out=str(tmp_path / "run"), resume=None)
    finally:
        torch.set_num_threads(threads)
    _, tok, model = load_run(tmp_path / "run")
    result = tfx_in_process("convert", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "as a marian model" in result.stderr and "weights only" in result.stderr  # a byte tokenizer
    hf = load_clean(transformers.MarianMTModel, tmp_path / "hf")
    assert hf.config.decoder_start_token_id == tok.bos_id and hf.config.pad_token_id == tok.pad_id
    src = torch.tensor([tok.encode("ein haus 7") + [tok.eos_id], tok.encode("ein 3") + [tok.eos_id] + [tok.pad_id] * 5])
    mask = src != tok.pad_id  # the second row padded
    tgt = torch.tensor([[tok.bos_id, *tok.encode("a house")], [tok.bos_id, *tok.encode("a cat 3")]])
    gap = max_gap(hf_logits(hf, src, mask, tgt), teacher_forced(model, src, mask, tgt))
    print(f"trained-run export logit gap {gap:.3g}")
    assert gap < TOL


def test_export_problems_name_what_marian_lacks():
    from tfx.config import validate

    plain = validate({"family": "seq2seq", "data": {"train": "x"}, "model": {"d_model": 32, "n_heads": 4}})
    problems = "; ".join(export_problems(plain))
    assert "model.norm_position" in problems and "sinusoidal" in problems
    marian = validate({"family": "seq2seq", "data": {"train": "x"}, "tokenizer": {"kind": "byte"},
                       "model": {"d_model": 32, "n_heads": 4, "norm_position": "post", "ffn": "relu",
                                 "position": {"kind": "sinusoidal", "layout": "halves"}}})
    assert export_problems(marian) == []
    untied = marian.model_copy(update={"model": marian.model.model_copy(update={"tie_embeddings": False,
                                                                                "ffn": "swiglu"})})
    assert {p.split(" ")[0] for p in export_problems(untied)} == {"model.tie_embeddings", "model.ffn"}


def test_older_saves_with_tied_copies_and_position_tables(tmp_path, imported):
    """Older transformers (and the opus-mt safetensors) also store the tied matrix's copies and both
    position tables: taken where they equal the shared matrix and Marian's sinusoid, else refused."""
    from safetensors.torch import load_file, save_file

    root, hf = imported
    tensors = load_file(str(root / "hf" / "model.safetensors"))
    shared = tensors["model.shared.weight"]
    table = hf.model.encoder.embed_positions.create_weight()
    assert (table.double() - sinusoid(32, 32)).abs().max() < 1e-6
    old = {**tensors, "model.encoder.embed_tokens.weight": shared, "model.decoder.embed_tokens.weight": shared,
           "lm_head.weight": shared, "model.encoder.embed_positions.weight": table,
           "model.decoder.embed_positions.weight": table}

    def attempt(name, stored):
        path = tmp_path / name
        path.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (path / f).write_bytes((root / "hf" / f).read_bytes())
        save_file({k: v.clone() for k, v in stored.items()}, str(path / "model.safetensors"))
        return tfx_in_process("convert", str(path), str(tmp_path / f"{name}-run"))

    assert attempt("old", old).returncode == 0
    _, _, model = load_run(tmp_path / "old-run")
    n = hf.config.vocab_size
    src, mask = sources(n)
    tgt = targets(n)
    assert max_gap(teacher_forced(model, src, mask, tgt), hf_logits(hf, src, mask, tgt)) < TOL
    r = attempt("interleaved", {**old, "model.decoder.embed_positions.weight":
                                sinusoid_table(torch.arange(32), 32, 10000.0, "interleaved")})
    assert r.returncode == 2 and "embed_positions.weight is not the sinusoid" in r.stderr, r.stderr
    r = attempt("head", {**old, "lm_head.weight": shared + 1})
    assert r.returncode == 2 and "lm_head.weight unlike" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("marian-base") / "hf"
    marian_dir(path, randomize=False)
    return path


@pytest.mark.parametrize("change, reason", [
    ({"normalize_before": True}, "normalize_before"),
    ({"scale_embedding": False}, "scale_embedding"),
    ({"normalize_embedding": True}, "layernorm_embedding"),
    ({"activation_function": "tanh"}, "activation_function"),
])
def test_config_refusals(tmp_path, base, change, reason):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (hf / name).write_bytes((base / name).read_bytes())
    config = json.loads((base / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **change}))
    r = tfx_in_process("convert", str(hf), str(tmp_path / "x"))
    assert r.returncode == 2 and reason in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_weight_refusals(tmp_path):
    marian_dir(tmp_path / "shared", randomize=False, share_encoder_decoder_embeddings=False)
    r = tfx_in_process("convert", str(tmp_path / "shared"), str(tmp_path / "x"))
    assert r.returncode == 2 and "share_encoder_decoder_embeddings" in r.stderr, r.stderr
    from safetensors.torch import load_file, save_file

    path = tmp_path / "extra"
    marian_dir(path, randomize=False)
    tensors = load_file(str(path / "model.safetensors"))
    save_file({**tensors, "model.encoder.layernorm_embedding.weight": torch.ones(32)}, str(path / "model.safetensors"))
    r = tfx_in_process("convert", str(path), str(tmp_path / "z"))
    assert r.returncode == 2 and "layernorm_embedding" in r.stderr, r.stderr
    assert not any((tmp_path / x).exists() for x in "xz")


def test_a_trained_output_bias_is_the_heads_bias(tmp_path):
    """opus-mt models carry Marian's output bias in final_logits_bias: model.head_bias holds it."""
    hf = marian_dir(tmp_path / "hf", randomize=False)
    with torch.no_grad():
        hf.final_logits_bias.normal_()
    save_hf(hf, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "run", log=lambda s: None)
    recipe, _, model = load_run(tmp_path / "run")
    n = hf.config.vocab_size
    src, mask = sources(n)
    assert recipe.model.head_bias and max_gap(teacher_forced(model, src, mask, targets(n)),
                                              hf_logits(hf, src, mask, targets(n))) < TOL
    convert(tmp_path / "run", tmp_path / "back", log=lambda s: None)
    back = load_clean(transformers.MarianMTModel, tmp_path / "back")
    assert torch.equal(back.final_logits_bias, hf.final_logits_bias)
