"""Translation, classification and MLM pretraining end to end through the CLI, on real corpora."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_tfx, sets, tfx_in_process

SMALL = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "train.log_every=1", "train.threads=1",
         "train.eval_every=0", "train.precision=fp32"]


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("famdata")
    for name in ("bible-de-en", "rotten-tomatoes", "movie-reviews"):
        run_tfx("data", "get", name, env={"TFX_DATA": str(root)}, check=True)
    return {"TFX_DATA": str(root)}, root


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory, data_env):
    env, _ = data_env
    out = tmp_path_factory.mktemp("mt") / "run"
    run_tfx("train", str(REPO / "recipes/seq2seq/bible-de-en.toml"),
            *sets(*SMALL, "model.encoder_layers=1", "model.decoder_layers=1", "tokenizer.vocab_size=600",
                  "train.max_tokens=600", "train.steps=6", "train.save_every=2", "train.keep_checkpoints=3",
                  "train.schedule.warmup=2", "train.eval_bleu=false"),
            "--out", str(out), env=env, check=True)
    return out


def test_translate_stdin_and_bleu_equals_sacrebleu_cli(mt_run, data_env, tmp_path):
    env, root = data_env
    src = (root / "bible-de-en/test.de").read_text().splitlines()[:12]
    ref = (root / "bible-de-en/test.en").read_text().splitlines()[:12]
    (tmp_path / "sub.de").write_text("\n".join(src) + "\n")
    (tmp_path / "sub.en").write_text("\n".join(ref) + "\n")
    out = run_tfx("generate", str(mt_run), "-", "--beam", "2", "--max-new-tokens", "5",
                  input="\n".join(src[:5]) + "\n\n", check=True).stdout
    assert len(out.split("\n")) == 7  # 6 lines in (one empty), 6 out, final newline
    hyp = tmp_path / "hyp.en"
    result = json.loads(run_tfx("eval", str(mt_run), "--data", str(tmp_path / "sub"), "--beam", "2",
                                "--hyp-out", str(hyp), "--json", check=True).stdout)
    assert {"bleu", "chrf", "signature", "loss", "perplexity"} <= set(result)
    assert len(hyp.read_text().splitlines()) == 12
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "sub.en"), "-i", str(hyp), "-b"],
                         capture_output=True, text=True, check=True)
    assert float(cli.stdout.strip()) == pytest.approx(round(result["bleu"], 1), abs=0.051)
    assert result["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")


# references and hypotheses with real overlap (exact lines, substitutions, drops, reordering):
# corpus BLEU ~50, far from 0, so that misalignment or another BLEU shows
REFS = ["In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
        "And God said, Let there be light: and there was light.",
        "And God saw the light, that it was good: and God divided the light from the darkness.",
        "And God called the light Day, and the darkness he called Night.",
        "And the evening and the morning were the first day.",
        "And God said, Let there be a firmament in the midst of the waters.",
        "And God made the firmament, and divided the waters which were under the firmament."]
HYPS = ["In the beginning God created the heaven and the earth.",
        "And the earth was empty and void, and darkness was on the face of the deep.",
        "Then God said, Let there be light: and there was light.",
        "God saw the light, that it was good, and divided the light from the darkness.",
        "And God called the light Day, and the darkness Night.",
        "The evening and the morning were the first day.",
        "And God said, Let a firmament be in the middle of the waters.",
        "And God made the firmament and divided the waters under the firmament."]


def sacrebleu_cli(ref, hyp, metric: str) -> float:
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", metric, "-b", "-w", "4"],
                         capture_output=True, text=True, check=True)
    return float(cli.stdout.strip())


def test_bleu_and_chrf_equal_the_sacrebleu_cli_on_overlapping_files(tmp_path):
    from tfx.tasks.seq2seq import bleu_chrf

    ref, hyp, shifted = tmp_path / "ref.en", tmp_path / "hyp.en", tmp_path / "shifted.en"
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    shifted.write_text("\n".join(HYPS[1:] + HYPS[:1]) + "\n", encoding="utf-8")  # one line off
    ours = bleu_chrf(hyp.read_text(encoding="utf-8").splitlines(), ref.read_text(encoding="utf-8").splitlines())
    bleu, chrf = sacrebleu_cli(ref, hyp, "bleu"), sacrebleu_cli(ref, hyp, "chrf")
    assert 30 < bleu < 90 and 50 < chrf < 95  # real overlap, not a perfect copy
    assert ours["bleu"] == pytest.approx(bleu, abs=5e-5) and ours["chrf"] == pytest.approx(chrf, abs=5e-5)
    off = sacrebleu_cli(ref, shifted, "bleu")
    assert bleu - off > 20  # misaligned lines change the score: the comparison above can tell
    assert abs(bleu_chrf(HYPS[1:] + HYPS[:1], REFS)["bleu"] - off) < 5e-5
    # and not sentence BLEU averaged over lines (a different number on these files)
    from sacrebleu.metrics import BLEU

    mean_sentence = sum(BLEU(effective_order=True).sentence_score(h, [r]).score for h, r in zip(HYPS, REFS)) / 8
    assert abs(mean_sentence - bleu) > 0.5


def test_eval_scores_its_hypotheses_line_by_line_against_the_reference_file(mt_run, tmp_path, monkeypatch):
    """`tfx eval --data` pairs the i-th hypothesis with the i-th reference line: with the model's
    translations replaced by HYPS, its BLEU is the sacrebleu CLI's on the written --hyp-out file."""
    from tfx.tasks.seq2seq import Seq2SeqTask

    monkeypatch.setattr(Seq2SeqTask, "translate", lambda self, model, tok, lines, **kw: iter(HYPS[:len(list(lines))]))
    (tmp_path / "sub.de").write_text("\n".join(f"Satz {i}" for i in range(8)) + "\n", encoding="utf-8")
    (tmp_path / "sub.en").write_text("\n".join(REFS) + "\n", encoding="utf-8")
    hyp = tmp_path / "hyp.en"
    proc = tfx_in_process("eval", str(mt_run), "--data", str(tmp_path / "sub"), "--hyp-out", str(hyp), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert hyp.read_text(encoding="utf-8").splitlines() == HYPS
    assert result["bleu"] == pytest.approx(sacrebleu_cli(tmp_path / "sub.en", hyp, "bleu"), abs=5e-5)
    assert result["chrf"] == pytest.approx(sacrebleu_cli(tmp_path / "sub.en", hyp, "chrf"), abs=5e-5)
    assert result["bleu"] > 30


def test_nbest_and_misaligned_files(mt_run, tmp_path):
    out = run_tfx("generate", str(mt_run), "Im Anfang war das Wort", "--beam", "3", "--nbest", "2",
                  check=True).stdout
    fields = out.rstrip("\n").split("\t")
    assert len(fields) == 4 and float(fields[1]) >= float(fields[3])
    (tmp_path / "bad.de").write_text("a\nb\nc\n")
    (tmp_path / "bad.en").write_text("a\nb\n")
    proc = tfx_in_process("eval", str(mt_run), "--data", str(tmp_path / "bad"))
    assert proc.returncode == 2 and "3 lines" in proc.stderr and "2" in proc.stderr


def test_average_last_checkpoints(mt_run, tmp_path, data_env):
    env, _ = data_env
    out = tmp_path / "avg"
    proc = run_tfx("average", str(mt_run), "--last", "3", "--out", str(out), check=True)
    assert "ckpt-00000002, ckpt-00000004, ckpt-00000006" in proc.stderr
    from safetensors.torch import load_file

    states = [load_file(str(mt_run / f"state/ckpt-0000000{i}/model.safetensors")) for i in (2, 4, 6)]
    avg = load_file(str(out / "model.safetensors"))
    key = "decoder.blocks.0.ffn.up.weight"
    torch.testing.assert_close(avg[key], sum(s[key] for s in states) / 3)
    run_tfx("generate", str(out), "Im Anfang", "--max-new-tokens", "3", check=True)
    again = tfx_in_process("average", str(mt_run), "--last", "4", "--out", str(tmp_path / "x"))
    assert again.returncode == 2 and "keep_checkpoints" in again.stderr


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, data_env):
    env, _ = data_env
    out = tmp_path_factory.mktemp("mlm") / "run"
    run_tfx("train", str(REPO / "recipes/classifier/mlm-movie-reviews.toml"),
            *sets(*SMALL, "model.n_layers=1", "model.context=32", "tokenizer.vocab_size=500", "train.steps=4",
                  "train.batch_size=8", "train.eval_every=4"),
            "--out", str(out), env=env, check=True)
    return out


def test_classifier_from_pretrained_encoder(mlm_run, data_env, tmp_path):
    env, root = data_env
    out = tmp_path / "rt"
    proc = run_tfx("train", str(REPO / "recipes/classifier/rotten-tomatoes-pretrained.toml"),
                   *sets(*SMALL, "model.n_layers=1", "model.context=32", f"init_from={mlm_run}", "train.steps=4",
                         "train.batch_size=8"), "--out", str(out), env=env, check=True)
    assert "encoder initialised from" in proc.stderr
    assert (out / "tokenizer/tokenizer.json").read_text() == (mlm_run / "tokenizer/tokenizer.json").read_text()
    result = json.loads(run_tfx("eval", str(out), "--split", "test", "--json", env=env, check=True).stdout)
    assert {"accuracy", "macro_f1", "per_class", "confusion"} <= set(result)
    assert sum(map(sum, result["confusion"])) == result["examples"] == 1291
    lines = run_tfx("generate", str(out), "-", "--top-k", "2", input="a triumph\n\nawful\n", check=True).stdout
    rows = [r.split("\t") for r in lines.splitlines()]
    assert len(rows) == 3 and all(len(r) == 4 and {r[0], r[2]} == {"fresh", "rotten"} for r in rows)
    assert all(abs(float(r[1]) + float(r[3]) - 1) < 1e-3 for r in rows)
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nfine film\tmeh\n")
    proc = tfx_in_process("eval", str(out), "--data", str(bad))
    assert proc.returncode == 2 and "'meh'" in proc.stderr


def test_init_from_loads_the_encoder_and_a_new_head(mlm_run, tmp_path):
    from tfx.config import load_recipe
    from tfx.families import build_model, init_encoder
    from tfx.rundir import load_run

    _, tok, mlm = load_run(mlm_run)
    recipe = load_recipe(REPO / "recipes/classifier/rotten-tomatoes-pretrained.toml",
                         [*SMALL, "model.n_layers=1", "model.context=32"], files=False)
    (tmp_path / "labels.json").write_text('["fresh", "rotten"]')
    torch.manual_seed(0)
    clf = build_model(recipe, tokenizer=tok, run_dir=tmp_path)
    head = clf.head.weight.detach().clone()
    init_encoder(clf, mlm, where=str(mlm_run), log=lambda m: None)
    for key, value in mlm.encoder.state_dict().items():
        assert torch.equal(clf.encoder.state_dict()[key], value), key
    assert torch.equal(clf.head.weight, head)  # the head is the classifier's own, untouched
    bad = load_recipe(REPO / "recipes/classifier/rotten-tomatoes-pretrained.toml",
                      [*SMALL, "model.n_layers=2", "model.context=32"], files=False)
    from tfx.errors import UsageError

    with pytest.raises(UsageError, match="does not fit"):
        init_encoder(build_model(bad, tokenizer=tok, run_dir=tmp_path), mlm, where=str(mlm_run), log=lambda m: None)
