"""Subword regularisation (tokenizer.sampling_alpha): BPE-dropout / unigram sampling of TRAINING batches.

tfx draws the samples itself (tfx.data.subword_sampling), on sentencepiece's normalisation, vocabulary,
scores and n-best lists, because sentencepiece's own sampler differs per process. Here: the samplers
are sentencepiece's algorithms (alpha 0, alpha 1 and a near-argmax alpha give sentencepiece's ids exactly,
and the sampled lengths match sentencepiece's own sampler's); sampled ids decode to the same text, change
with the epoch and repeat for the same (seed, epoch) in another process; validation, `tfx eval` and
`tokenizer.encode` stay deterministic; a seq2seq run stopped and resumed in a new process gives the
uninterrupted run's losses step for step; lm and mlm refuse the key.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_tfx, tfx_in_process
from tfx.config import validate
from tfx.data.batching import DataPosition
from tfx.data.tokenizers import SentencePieceConfig, train_tokenizer, training_sampler
from tfx.errors import UsageError
from tfx.families import get_task
from tfx.tasks.common import sampling_seed

N_TRAIN, N_VALID = 200, 40  # 200 pairs = 13 batches of 16: an epoch is 13 steps


@pytest.fixture(scope="module")
def bible(tmp_path_factory) -> Path:
    """PREFIX of 200 training and 40 validation pairs of short bible-de-en verses (PREFIX/train.de, ...)."""
    root = REPO / "data"
    if not (root / "bible-de-en" / "train.de").is_file():  # a fresh checkout: build the corpus privately
        from tfx.data.corpora import get_corpus

        root = tmp_path_factory.mktemp("tfxdata")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TFX_DATA", str(root))
            get_corpus("bible-de-en", log=lambda m: None)
    de, en = ((root / "bible-de-en" / f"train.{lang}").read_text(encoding="utf-8").splitlines()
              for lang in ("de", "en"))
    pairs = [(a, b) for a, b in zip(de, en) if len(a) < 70 and len(b) < 70][: N_TRAIN + N_VALID]
    out = tmp_path_factory.mktemp("bible")
    for split, rows in (("train", pairs[:N_TRAIN]), ("valid", pairs[N_TRAIN:])):
        for lang, side in (("de", 0), ("en", 1)):
            (out / f"{split}.{lang}").write_text("".join(p[side] + "\n" for p in rows), encoding="utf-8")
    return out


def recipe(bible: Path, family: str = "seq2seq", tokenizer: dict | None = None, **tables):
    tok = {"kind": "sentencepiece", "vocab_size": 300, "byte_fallback": False, "sampling_alpha": 0.1,
           **(tokenizer or {})}
    data = {"train": str(bible / "train"), "valid": str(bible / "valid"), "src_lang": "de", "tgt_lang": "en"}
    return validate({"family": family, "data": data, "tokenizer": tok, "train": {"batch_size": 16},
                     "model": {"d_model": 32, "n_heads": 4, "context": 64}, **tables})


def lines(bible: Path, name: str) -> list[str]:
    return (bible / name).read_text(encoding="utf-8").splitlines()


def epoch_rows(batches, epoch: int, key: str) -> list[list[int]]:
    """The rows of `key` of every batch of one epoch, started afresh at (epoch, 0) as a resume would."""
    rows = []
    for batch, pos in batches(DataPosition(epoch, 0)):
        if pos.epoch != epoch:
            return rows
        rows += [[i for i in r.tolist() if i > 2] for r in batch[key]]  # without pad, bos, eos


# ----------------------------------------------------------------------------- the samplers

TRICKY = ["", " ", "  two  spaces ", "你好 world ☃☃ x", "Ünïcödé — “quotes” …", "\t tab", "a"]


def mean_length(encode, texts: list[str], times: int = 5) -> float:
    return sum(len(ids) for _ in range(times) for ids in encode(texts)) / times


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_bpe_dropout_is_sentencepieces_algorithm(bible, byte_fallback):
    """alpha 0 merges as encode does and alpha 1 skips every merge, id for id (the second against
    sentencepiece's own sampler, which draws nothing then); at alpha 0.1 the mean sampled length is
    sentencepiece's own sampler's."""
    from tfx.data.subword_sampling import SubwordSampler

    texts = lines(bible, "train.de") + lines(bible, "train.en")
    cfg = SentencePieceConfig(vocab_size=300 + 256 * byte_fallback, byte_fallback=byte_fallback)
    sp = train_tokenizer(cfg, texts)._sp
    probe = texts + TRICKY
    assert SubwordSampler(sp, model_type="bpe", alpha=0.0)(probe, 1) == [sp.encode(t) for t in probe]
    assert SubwordSampler(sp, model_type="bpe", alpha=1.0)(probe, 1) == [
        sp.encode(t, enable_sampling=True, alpha=1.0, nbest_size=-1) for t in probe]
    ours, seeds = SubwordSampler(sp, model_type="bpe", alpha=0.1), iter(range(100))
    theirs = mean_length(lambda x: sp.encode(x, enable_sampling=True, alpha=0.1, nbest_size=-1), texts)
    mine = mean_length(lambda x: ours(x, next(seeds)), texts)
    assert mine > 1.05 * sum(len(ids) for ids in sp.encode(texts)) and mine == pytest.approx(theirs, rel=0.03)


def test_unigram_sampling_is_sentencepieces(bible):
    """The lattice (every piece, an unknown character's node) and the n-best scores are sentencepiece's:
    at alpha 1e5 (all but the best segmentation weigh nothing) both samplers give encode's ids; at alpha
    0.5 the mean sampled length is sentencepiece's own sampler's."""
    from tfx.data.subword_sampling import SubwordSampler

    texts = lines(bible, "train.de") + lines(bible, "train.en")
    sp = train_tokenizer(SentencePieceConfig(vocab_size=300, byte_fallback=False, model_type="unigram"), texts)._sp
    probe = texts + TRICKY
    for nbest in (-1, 4):
        assert SubwordSampler(sp, model_type="unigram", alpha=1e5, nbest_size=nbest)(probe, 1) == [
            sp.encode(t) for t in probe]
        ours, seeds = SubwordSampler(sp, model_type="unigram", alpha=0.5, nbest_size=nbest), iter(range(100))
        theirs = mean_length(lambda x: sp.encode(x, enable_sampling=True, alpha=0.5, nbest_size=nbest), texts)
        mine = mean_length(lambda x: ours(x, next(seeds)), texts)
        assert mine > sum(len(ids) for ids in sp.encode(texts)) and mine == pytest.approx(theirs, rel=0.03)


# ----------------------------------------------------------------------------- the tokenizer


@pytest.mark.parametrize("model_type,nbest", [("bpe", -1), ("unigram", -1), ("unigram", 4)])
def test_sampled_ids_decode_back_change_with_the_seed_and_repeat(bible, tmp_path, model_type, nbest):
    """Through the tokenizer (multi-line texts too): every sample decodes to its text, another seed samples
    otherwise, encode stays the best segmentation, and the same seed repeats, in this process and another."""
    texts = lines(bible, "train.en") + ["In the beginning\nGod created  the heaven."]  # two lines, two spaces
    cfg = SentencePieceConfig(vocab_size=300, byte_fallback=False, model_type=model_type,
                              sampling_alpha=0.1 if model_type == "bpe" else 0.5, nbest_size=nbest)
    tok = train_tokenizer(cfg, texts)
    best = [tok.encode(t) for t in texts]
    sample = training_sampler(cfg, tok)
    a, b = sample(texts, 7), sample(texts, 8)
    assert [tok.decode(ids) for ids in a] == [tok.decode(ids) for ids in b] == texts
    assert sum(x != y for x, y in zip(a, best)) > len(texts) // 4, "sampling must change many segmentations"
    assert sum(x != y for x, y in zip(a, b)) > len(texts) // 4, "another seed, other segmentations"
    assert [tok.encode(t) for t in texts] == best, "encode stays the best segmentation (eval, generate, tokenize)"
    assert sample(texts, 7) == a  # after other sampling: from the seed alone
    # Another process (a torchrun rank, a resumed run) loading the tokenizer samples the same ids for the
    # same seed (sentencepiece's own sampler, seeded alike, does not: its samples differ per process).
    tok.save(tmp_path / "tok")
    code = (f"import json, sys; from tfx.data.tokenizers import load_tokenizer; "
            f"t = load_tokenizer({str(tmp_path / 'tok')!r}); texts = json.loads(sys.stdin.read()); "
            f"print(json.dumps(t.encode_sampled(texts, alpha={cfg.sampling_alpha}, nbest_size={nbest}, seed=7)))")
    other = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                           cwd=REPO, check=True)
    assert json.loads(other.stdout) == a


def test_recipe_keys_are_validated():
    base = {"family": "seq2seq", "data": {"train": "x"}}
    for tok, says in (({"sampling_alpha": 1.5}, "tokenizer.sampling_alpha: for a bpe model"),
                      ({"sampling_alpha": 0.0}, "tokenizer.sampling_alpha: Input should be greater than 0"),
                      ({"sampling_alpha": 0.1, "nbest_size": 1}, "tokenizer.nbest_size: nbest_size is -1"),
                      ({"model_type": "unigram", "sampling_alpha": -1}, "greater than 0")):
        with pytest.raises(UsageError, match=says):
            validate({**base, "tokenizer": {"kind": "sentencepiece", **tok}})
    with pytest.raises(UsageError, match="src_tokenizer.sampling_alpha: for a bpe model"):
        validate({**base, "src_tokenizer": {"kind": "sentencepiece", "sampling_alpha": 2}})
    with pytest.raises(UsageError, match="unknown key 'tokenizer.sampling_alpha'"):
        validate({**base, "tokenizer": {"kind": "char", "sampling_alpha": 0.1}})
    assert validate({**base, "tokenizer": {"kind": "sentencepiece", "model_type": "unigram",
                                           "sampling_alpha": 2.0, "nbest_size": 8}}).tokenizer.sampling_alpha == 2.0


def test_a_saved_bpe_model_refuses_a_unigram_alpha(bible, tmp_path):
    """tokenizer.path names a saved model: the recipe's model_type may not be the model's; the real one decides."""
    tok = train_tokenizer(SentencePieceConfig(vocab_size=300, byte_fallback=False), lines(bible, "train.en"))
    tok.save(tmp_path / "tok")
    cfg = SentencePieceConfig(path=str(tmp_path / "tok"), model_type="unigram", sampling_alpha=2.0)
    with pytest.raises(UsageError, match=r"tokenizer.sampling_alpha: 2.0 for a bpe model \(tokenizer.path holds one\)"):
        training_sampler(cfg, train_tokenizer(cfg, []))


def test_lm_and_mlm_refuse_sampling(bible, tmp_path):
    for family in ("lm", "mlm"):
        r = validate({"family": family, "data": {"train": str(bible / "train.en")},
                      "tokenizer": {"kind": "sentencepiece", "sampling_alpha": 0.1}})
        with pytest.raises(UsageError, match=f"sentence-level families \\(seq2seq, classifier\\), not {family}: "
                                             "its blocks are cut from one token stream"):
            get_task(r)
    (tmp_path / "lm.toml").write_text(f'family = "lm"\n[data]\ntrain = "{bible / "train.en"}"\n'
                                      '[tokenizer]\nkind = "sentencepiece"\nsampling_alpha = 0.1\n')
    proc = tfx_in_process("train", str(tmp_path / "lm.toml"), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "tokenizer.sampling_alpha: subword sampling is for" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists(), "refused before anything is written"


# ----------------------------------------------------------------------------- the tasks' training data


def test_seq2seq_epochs_sample_anew_the_same_pairs_and_validation_stays_deterministic(bible, tmp_path):
    r = recipe(bible)
    task = get_task(r, tmp_path)
    tok = train_tokenizer(r.tokenizer, task.tokenizer_texts())
    batches, validate_run = task.prepare(tok)
    epochs = [(epoch_rows(batches, e, "src"), epoch_rows(batches, e, "tgt_in")) for e in (0, 1)]
    for src, tgt in epochs:  # every pair once an epoch, decoding to its text
        assert Counter(map(tok.decode, src)) == Counter(lines(bible, "train.de"))
        assert Counter(map(tok.decode, tgt)) == Counter(lines(bible, "train.en"))
    best = Counter(tuple(tok.encode(t)) for t in lines(bible, "train.en"))
    assert Counter(map(tuple, epochs[0][1])) != best and Counter(map(tuple, epochs[1][1])) != best
    assert Counter(map(tuple, epochs[0][1])) != Counter(map(tuple, epochs[1][1]))
    # a resume: a new task started at (1, 0) rebuilds epoch 1 as it was; sampling seeds are (seed, epoch)
    again, _ = get_task(r, tmp_path).prepare(tok)
    assert epoch_rows(again, 1, "tgt_in") == epochs[1][1]
    assert sampling_seed(1337, 1) == sampling_seed(1337, 1) != sampling_seed(1337, 2) != sampling_seed(1338, 2)
    # without sampling, every epoch has the best segmentation
    plain, _ = get_task(recipe(bible, tokenizer={"sampling_alpha": None}), tmp_path).prepare(tok)
    assert Counter(map(tuple, epoch_rows(plain, 1, "tgt_in"))) == best
    # validation (and eval/generate: task.encode) sees the best segmentation, whatever sampling ran before
    torch.manual_seed(0)
    from tfx.families import build_model

    model = build_model(r, tokenizer=tok)
    first = validate_run(model, torch.device("cpu"), None)
    epoch_rows(batches, 2, "src")
    plain_task = get_task(recipe(bible, tokenizer={"sampling_alpha": None}), tmp_path)
    assert validate_run(model, torch.device("cpu"), None) == first == plain_task.score(
        model, tok, lines(bible, "valid.de"), lines(bible, "valid.en"), device=torch.device("cpu"))
    assert task.encode(tok, ["Und Gott sprach"]) == [(tok.encode("Und Gott sprach") + [tok.eos_id], [])]


def test_a_separate_source_tokenizer_samples_on_its_own(bible, tmp_path):
    """src_tokenizer.sampling_alpha samples the source side alone; the target keeps its best segmentation."""
    r = recipe(bible, tokenizer={"sampling_alpha": None}, src_tokenizer={
        "kind": "sentencepiece", "vocab_size": 200, "byte_fallback": False, "sampling_alpha": 0.2})
    task = get_task(r, tmp_path)
    train_tokenizer(r.src_tokenizer, task.tokenizer_texts("src")).save(tmp_path / "tokenizer-src")
    tok = train_tokenizer(r.tokenizer, task.tokenizer_texts("tgt"))
    batches, _ = task.prepare(tok)
    src_tok = task.source_tokenizer(tok)
    assert src_tok is not tok and src_tok.vocab_size != tok.vocab_size
    (s0, t0), (s1, t1) = ((epoch_rows(batches, e, "src"), epoch_rows(batches, e, "tgt_in")) for e in (0, 1))
    assert Counter(map(src_tok.decode, s0)) == Counter(map(src_tok.decode, s1)) == Counter(lines(bible, "train.de"))
    assert Counter(map(tuple, s0)) != Counter(map(tuple, s1))
    assert Counter(map(tuple, t0)) == Counter(map(tuple, t1)) == Counter(tuple(tok.encode(t))
                                                                         for t in lines(bible, "train.en"))


def test_classifier_epochs_sample_anew(bible, tmp_path):
    texts = lines(bible, "train.en")
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{'god' if 'God' in t else 'other'}\n"
                                                                   for t in texts), encoding="utf-8")
    r = validate({"family": "classifier", "data": {"train": str(tmp_path / "train.tsv")},
                  "tokenizer": {"kind": "sentencepiece", "vocab_size": 300, "byte_fallback": False,
                                "sampling_alpha": 0.1}, "model": {"d_model": 32, "n_heads": 4, "context": 64}})
    task = get_task(r, tmp_path)
    tok = train_tokenizer(r.tokenizer, task.tokenizer_texts())
    batches, _ = task.prepare(tok)
    e0, e1 = epoch_rows(batches, 0, "input"), epoch_rows(batches, 1, "input")
    assert Counter(map(tok.decode, e0)) == Counter(map(tok.decode, e1)) == Counter(texts)
    assert Counter(map(tuple, e0)) != Counter(map(tuple, e1))
    assert Counter(map(tuple, e0)) != Counter(tuple(tok.encode(t)) for t in texts)


# ----------------------------------------------------------------------------- a run, interrupted and resumed


def steps(run: Path) -> tuple[dict[int, float], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "split" not in r and "loss" in r}, [r for r in rows if "split" in r]


def position(run: Path) -> dict:
    latest = (run / "state/LATEST").read_text().strip()
    return json.loads((run / "state" / latest / "trainer.json").read_text())["data"]


def test_a_resumed_run_with_sampling_gives_the_same_losses_and_eval_is_deterministic(bible, tmp_path):
    """16 steps, then `tfx train --resume` to 32 in a new process == 32 straight, per step: step 16 is in
    epoch 1 (13 steps an epoch), so the resume re-samples epoch 1 from (seed, epoch) alone, and epoch 2 starts
    in between. Under torchrun every rank builds the same global batches through the same seeds (the same
    ids in another process: test_sampled_ids_decode_back_change_with_the_seed_and_repeat)."""
    from tfx import run

    text = (f'family = "seq2seq"\n[data]\ntrain = "{bible / "train"}"\nvalid = "{bible / "valid"}"\n'
            'src_lang = "de"\ntgt_lang = "en"\n'
            '[tokenizer]\nkind = "sentencepiece"\nvocab_size = 300\nbyte_fallback = false\nsampling_alpha = 0.1\n'
            '[model]\nd_model = 32\nn_heads = 4\nn_layers = 1\ncontext = 64\ndropout = 0.1\n'
            '[train]\nsteps = 32\nbatch_size = 16\nlog_every = 1\neval_every = 0\nsave_every = 0\nthreads = 1\n'
            'device = "cpu"\nprecision = "fp32"\n[train.schedule]\nkind = "inverse_sqrt"\nwarmup = 4\n')
    (tmp_path / "r.toml").write_text(text, encoding="utf-8")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run.train(str(tmp_path / "r.toml"), overrides=[], out=str(straight), resume=None)
    run.train(str(tmp_path / "r.toml"), overrides=["train.steps=16"], out=str(stopped), resume=None)
    assert position(stopped) == {"epoch": 1, "cursor": 3}
    run_tfx("train", "--resume", str(stopped), "--set", "train.steps=32", check=True)
    assert position(stopped) == position(straight) == {"epoch": 2, "cursor": 6}
    losses, valid = steps(straight)
    assert sorted(losses) == list(range(1, 33)) and steps(stopped)[0] == losses
    # the validation loss logged during training is what `tfx eval` computes on the same weights
    (last,) = [v for v in valid if v["step"] == 32]
    evaluated = run.evaluate(str(straight), split="valid", checkpoint="last")
    assert evaluated["loss"] == pytest.approx(last["loss"], abs=1e-6)
