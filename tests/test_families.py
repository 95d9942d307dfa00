"""The family registry: every family is one record, nothing else tests a family's name, and the
keys every family shares (data.holdout) work in each of them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import REPO
from tfx.config import GenerateConfig, generate_settings, load_recipe
from tfx.errors import UsageError
from tfx.families import FAMILY, build_model, family_of, get_task


def _recipe(tmp_path, family: str, train: Path, extra: str = "") -> object:
    path = tmp_path / "r.toml"
    path.write_text(f'family = "{family}"\n[data]\ntrain = "{train}"\n{extra}'
                    '[model]\nd_model = 16\nn_layers = 1\nn_heads = 2\ncontext = 16\n')
    return load_recipe(path)


def test_every_family_is_one_record_with_a_task_and_a_model(tmp_path):
    from tfx.data.tokenizers import train_tokenizer
    from tfx.registry import TOKENIZER

    tok = train_tokenizer(TOKENIZER.config_model("char")(), ["abc def"])
    (tmp_path / "labels.json").write_text('["a", "b"]')
    train = tmp_path / "t.txt"
    train.write_text("x\n")
    for name in FAMILY.names():
        family = FAMILY.get(name)
        assert family.name == name and family.stacks and "loss" in family.metrics(_recipe(tmp_path, name, train))
        recipe = _recipe(tmp_path, name, train)
        task = get_task(recipe, tmp_path)
        assert type(task) is family.task()
        codec = None
        if family.images:  # an image family's "tokenizer" is its codec, saved in the run (8 x 8 images: 4 patches)
            from tfx.data.image_codec import ImageCodec, ImageConfig

            codec = ImageCodec(ImageConfig(), height=8, width=8, channels=1, mean=[0.5], std=[0.2])
            codec.save(tmp_path / "tokenizer")
        model = build_model(recipe, tokenizer=codec or tok, run_dir=tmp_path)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_no_family_name_test_outside_the_family_modules():
    """`recipe.family == "lm"` and the like belong to tfx/families/ and nowhere else."""
    offenders = []
    for path in sorted((REPO / "tfx").rglob("*.py")):
        if "families" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [x for x in [node.left, *node.comparators] if isinstance(x, (ast.Name, ast.Attribute))]
                if any((x.id if isinstance(x, ast.Name) else x.attr) == "family" for x in names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_classifier_holdout_is_a_seeded_stratified_split(tmp_path):
    rows = [(f"text {i}", "pos" if i % 4 else "neg") for i in range(200)]  # 150 pos, 50 neg
    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    recipe = _recipe(tmp_path, "classifier", train, "holdout = 0.1\n")
    task = get_task(recipe, tmp_path)
    tr, va = task.labelled("train"), task.labelled("valid")
    assert (va[1].count("pos"), va[1].count("neg")) == (15, 5)  # 10% of every label
    assert sorted(tr[0] + va[0]) == sorted(t for t, _ in rows) and not set(tr[0]) & set(va[0])
    assert task.labelled("valid") == va  # seeded: the same rows every time
    other = get_task(_recipe(tmp_path, "classifier", train, "holdout = 0.1\n[train]\nseed = 7\n"), tmp_path)
    assert other.labelled("valid")[0] != va[0]
    assert task.labelled("test") is None


def test_seq2seq_and_mlm_holdout_take_the_tail(tmp_path):
    src, tgt = tmp_path / "p.src", tmp_path / "p.tgt"
    src.write_text("".join(f"s{i}\n" for i in range(20)))
    tgt.write_text("".join(f"t{i}\n" for i in range(20)))
    task = get_task(_recipe(tmp_path, "seq2seq", tmp_path / "p", "holdout = 0.25\n"), tmp_path)
    assert task.pairs("valid") == ([f"s{i}" for i in range(15, 20)], [f"t{i}" for i in range(15, 20)])
    assert task.pairs("train")[0] == [f"s{i}" for i in range(15)]
    from tfx.data.tokenizers import train_tokenizer
    from tfx.registry import TOKENIZER

    docs = tmp_path / "d.txt"
    docs.write_text("abcdefghij" * 10)
    tok = train_tokenizer(TOKENIZER.config_model("char")(), ["abcdefghij"])
    mlm = get_task(_recipe(tmp_path, "mlm", docs, "holdout = 0.2\n"), tmp_path)
    whole = get_task(_recipe(tmp_path, "mlm", docs), tmp_path).stream(tok, "train")
    train, valid = mlm.stream(tok, "train"), mlm.stream(tok, "valid")
    assert valid.numel() > 0 and torch.equal(torch.cat([train, valid]), whole)  # the tail of the same stream


def test_classifier_trains_with_a_holdout_validation(tmp_path, capsys):
    from tfx import run

    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\n" + "".join(f"w{i % 7} w{i % 3}\t{'ab'[i % 2]}\n" for i in range(60)))
    recipe = tmp_path / "c.toml"
    recipe.write_text(f'family = "classifier"\n[data]\ntrain = "{train}"\nholdout = 0.2\n'
                      '[model]\nd_model = 16\nn_layers = 1\nn_heads = 2\ncontext = 16\n'
                      '[train]\nsteps = 2\nbatch_size = 8\neval_every = 2\nsave_every = 0\nthreads = 1\n')
    run.train(str(recipe), overrides=[], out=str(tmp_path / "run"), resume=None)
    assert "48 training examples" in capsys.readouterr().err
    valid = [line for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if '"valid"' in line]
    assert valid and '"accuracy"' in valid[-1]


def test_generate_overrides_are_validated_by_the_config_model():
    base = GenerateConfig()
    assert generate_settings(base, {"top_p": 0.5, "beam": None}).top_p == 0.5
    assert generate_settings(base, {"beam": None}).beam == base.beam
    with pytest.raises(UsageError, match=r"--top-p 2.0: .*less than or equal to 1"):
        generate_settings(base, {"top_p": 2.0})
    with pytest.raises(UsageError, match=r"--max-new-tokens 0"):
        generate_settings(base, {"max_new_tokens": 0})


def test_memory_is_refused_outside_the_families_that_take_it(tmp_path):
    train = tmp_path / "t.tsv"
    train.write_text("text\tlabel\na\tx\n")
    with pytest.raises(UsageError, match="'xl' is for the lm family"):
        _recipe(tmp_path, "classifier", train, '[model.memory]\nkind = "xl"\n')
    assert family_of("lm").memory and not family_of("classifier").memory
