"""Recipes: every bad-recipe case gets one clear message naming the key (exit 2 on the CLI)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, run_tfx, tfx_in_process
from tfx.config import apply_overrides, load_recipe, parse_value, to_toml, recipe_dict, validate
from tfx.errors import UsageError

GOOD = """
name = "t"
[data]
train = "{train}"
"""


@pytest.fixture
def write(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("hello world\n")

    def _write(body: str) -> Path:
        path = tmp_path / "r.toml"
        path.write_text(body.replace("{train}", str(train)))
        return path

    return _write


BAD = {
    "unknown key": ("[model]\nd_modle = 3\n", ["model.d_modle", "d_model", "did you mean"]),
    "unknown top-level table": ("[trian]\nsteps = 3\n", ["trian", "train"]),
    "wrong type": ("[model]\nd_model = \"big\"\n", ["model.d_model", "integer", "'big'"]),
    "out of range": ("[train]\nsteps = 0\n", ["train.steps", "greater than 0"]),
    "unknown attention kind": ("[model.attention]\nkind = \"dens\"\n", ["model.attention.kind", "'dens'", "dense"]),
    "unknown position kind": ("[model.position]\nkind = \"rotary\"\n", ["model.position.kind", "rope, rope_2d, shaw, sinusoidal"]),
    "unknown kind parameter": ("[model.position]\nkind = \"rope\"\nbas = 1.0\n", ["model.position.bas", "base"]),
    "unknown tokenizer kind": ("[tokenizer]\nkind = \"wordpiece\"\n", ["tokenizer.kind", "sentencepiece"]),
    "bad literal": ("[model]\nnorm = \"batchnorm\"\n", ["model.norm", "layernorm", "rmsnorm"]),
    "heads": ("[model]\nn_heads = 4\nn_kv_heads = 3\n", ["n_kv_heads"]),
    "unknown memory kind": ("[model.memory]\nkind = \"xll\"\n",
                            ["model.memory.kind", "'xll'", "allowed: compressive", "did you mean 'xl'"]),
}


def test_unknown_family_names_the_registered_ones(write):
    path = write('family = "seq2sec"\n' + GOOD)
    with pytest.raises(UsageError) as exc:
        load_recipe(path)
    for needle in ("family:", "'seq2sec'", "allowed: classifier, lm, mim, mlm, seq2seq, vit", "did you mean 'seq2seq'"):
        assert needle in str(exc.value), str(exc.value)


@pytest.mark.parametrize("case", BAD)
def test_bad_recipe_messages(write, case):
    extra, needles = BAD[case]
    path = write(GOOD + extra)
    with pytest.raises(UsageError) as exc:
        load_recipe(path)
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)


def test_missing_data_file_and_missing_recipe(tmp_path, write):
    path = write('[data]\ntrain = "nowhere.txt"\n')
    with pytest.raises(UsageError, match=r"data.train: file not found: 'nowhere.txt'"):
        load_recipe(path)
    with pytest.raises(UsageError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.toml")


def test_unknown_corpus(write):
    with pytest.raises(UsageError, match=r"data.corpus: unknown corpus 'shakespear'.*did you mean 'shakespeare'"):
        load_recipe(write('[data]\ncorpus = "shakespear"\n'))


def test_malformed_toml(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[model\nd_model = 3")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_recipe(path)


def test_overrides_keep_toml_types(write):
    recipe = load_recipe(write(GOOD), ["model.n_layers=2", "train.optimizer.betas=[0.9, 0.99]",
                                       "model.position.kind=rope", "name=plain-word", "model.bias=false"])
    assert recipe.model.n_layers == 2 and recipe.model.bias is False
    assert recipe.train.optimizer.betas == (0.9, 0.99)
    assert recipe.model.position.kind == "rope" and recipe.name == "plain-word"
    assert parse_value("1e-3") == 1e-3 and parse_value("abc") == "abc"


def test_bad_override():
    with pytest.raises(UsageError, match="KEY=VALUE"):
        apply_overrides({}, ["model.d_model"])
    with pytest.raises(UsageError, match="is a value, not a table"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_resolved_recipe_round_trips_through_toml(write, tmp_path):
    recipe = load_recipe(write(GOOD), ["model.position.kind=alibi"])
    out = tmp_path / "resolved.toml"
    out.write_text(to_toml(recipe_dict(recipe)))
    assert load_recipe(out) == recipe


def test_shipped_recipes_check_and_show():
    proc = run_tfx("recipe", "check", "recipes/", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("ok ") == len(list((REPO / "recipes").rglob("*.toml")))
    proc = run_tfx("recipe", "show", "recipes/lm/shakespeare-char.toml", "--set", "model.n_layers=2", cwd=REPO)
    assert proc.returncode == 0 and "n_layers = 2" in proc.stdout
    assert validate(__import__("tomllib").loads(proc.stdout)).model.n_layers == 2


def test_cli_bad_recipe_exits_2_without_traceback(write):
    path = write(GOOD + "[model.attention]\nkind = \"dens\"\n")
    for args in (["recipe", "check", str(path)], ["train", str(path)], ["recipe", "show", str(path)]):
        proc = tfx_in_process(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "did you mean 'dense'" in proc.stderr and "Traceback" not in proc.stderr
    proc = tfx_in_process("train", str(path), "--set", "train.steps=abc")
    assert proc.returncode == 2 and "train.steps" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_usage_errors_exit_2_without_traceback(tmp_path):
    for args in (["trian"], ["train", "--bogus"], [], ["eval"], ["tokenize", "encode", str(tmp_path / "none")],
                 ["generate", str(tmp_path / "none"), "hi"]):
        proc = tfx_in_process(*args)
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
    assert "Did you mean 'train'" in tfx_in_process("trian").stderr
    assert tfx_in_process("--help").returncode == 0
