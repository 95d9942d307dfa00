"""kNN-LM (Khandelwal et al., 2020): the datastore, the interpolation, tuning, eval and generate,
with real faiss indexes over a tiny LM trained once for this module on a piece of Shakespeare."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, run_tfx, sets, tfx_in_process
from tfx.errors import UsageError
from tfx.evaluate import score_stream
from tfx.knn.datastore import Datastore, store_dir
from tfx.knn.scoring import (LAMBDAS, KeyCapture, KNNAdjuster, KNNSettings, interpolate, knn_logprobs, knn_target_logprob,
                            knn_token_logprobs, scored_positions)

RECIPE = str(REPO / "recipes/lm/shakespeare-char.toml")


pytestmark = pytest.mark.usefixtures("one_thread")  # faiss follows torch's thread count


@pytest.fixture(scope="module")
def env(shakespeare):
    return {"TFX_DATA": str(shakespeare), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def texts(tmp_path_factory, small_text) -> dict[str, Path]:
    """store: the datastore's text (6,000 chars); heldout: another stretch of the plays (the valid split)."""
    root = tmp_path_factory.mktemp("knntext")
    text = small_text.read_text(encoding="utf-8")
    (root / "store.txt").write_text(text[:6000], encoding="utf-8")
    (root / "heldout.txt").write_text(text[50_000:53_000], encoding="utf-8")
    return {"store": root / "store.txt", "heldout": root / "heldout.txt"}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, env, texts) -> Path:
    """A tiny char LM trained 20 steps on the store text; tests copy it before adding a datastore."""
    out = tmp_path_factory.mktemp("knnruns") / "lm"
    run_tfx("train", RECIPE, *sets(*TINY, "train.steps=20", "train.eval_every=0", "train.optimizer.lr=1e-2",
                                   "data.corpus=''", f"data.train={texts['store']}", f"data.valid={texts['heldout']}"),
            "--out", str(out), env=env, check=True)
    return out


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("knn", "state"))
    return dst


@pytest.fixture(scope="module")
def built(lm_run, texts, tmp_path_factory):
    """(model, store ids, Datastore) with an exact store built on the store text, in-process."""
    from tfx import run

    path = copy_run(lm_run, tmp_path_factory.mktemp("built") / "lm")
    run.knn_build(str(path), data=str(texts["store"]))
    recipe, tokenizer, model = run.load_run(path)
    ids, _ = run.get_task(recipe, path).token_stream(tokenizer, split="train", data=str(texts["store"]))
    return model, ids, Datastore(path)


# ----------------------------------------------------------------------------- the definition, by hand

def test_knn_distribution_matches_the_definition():
    dists = torch.tensor([[0.0, 1.0, 2.0, float("inf")]])  # the last neighbour was not found
    vals = torch.tensor([[5, 5, 7, -1]])
    for temp in (1.0, 0.5):
        w = [math.exp(-d / temp) for d in (0.0, 1.0, 2.0)]
        p5, p7 = (w[0] + w[1]) / sum(w), w[2] / sum(w)
        full = knn_logprobs(dists, vals, 9, temp)[0]
        assert torch.allclose(full[[5, 7]].exp(), torch.tensor([p5, p7], dtype=torch.float64), atol=1e-12)
        assert torch.isneginf(full[[0, 1, 2, 3, 4, 6, 8]]).all()
        target = knn_target_logprob(dists, vals, torch.tensor([5]), temp)
        assert torch.allclose(target, full[5:6], atol=1e-12)
    lm = torch.log(torch.tensor([0.2, 0.8], dtype=torch.float64))
    knn = torch.log(torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(interpolate(lm, knn, 0.25).exp(), torch.tensor([0.25 + 0.75 * 0.2, 0.75 * 0.8],
                                                                         dtype=torch.float64))
    # No neighbour found at all: the LM alone, not (1 - lambda) times it.
    nothing = knn_target_logprob(torch.full((1, 2), float("inf")), torch.full((1, 2), -1), torch.tensor([3]), 1.0)
    assert torch.equal(interpolate(lm[:1], nothing, 0.5), lm[:1])


def test_every_k_at_once_equals_each_k_by_its_definition():
    from tfx.knn.scoring import knn_target_logprob_grid

    g = torch.Generator().manual_seed(0)
    dists = (torch.rand(50, 16, generator=g) * 40).sort(-1).values  # nearest first, as faiss returns them
    dists[3, 5:] = float("inf")  # a row with only 5 neighbours found
    dists[7] = float("inf")  # and one with none
    vals = torch.randint(0, 4, (50, 16), generator=g)
    targets = torch.randint(0, 4, (50,), generator=g)
    grid = knn_target_logprob_grid(dists, vals, targets, [0.5, 3.0], [1, 4, 16], rows=7)  # several row chunks
    for temp in (0.5, 3.0):
        got = {k: grid[temp, k] for k in (1, 4, 16)}
        for k in (1, 4, 16):
            scores = -dists[:, :k].double() / temp
            norm = torch.logsumexp(scores, -1)
            want = torch.logsumexp(scores.masked_fill(vals[:, :k] != targets[:, None], float("-inf")), -1) - norm
            want = want.masked_fill(torch.isneginf(norm), float("nan"))
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-12, equal_nan=True)
    assert torch.isnan(got[16][7]) and torch.isneginf(got[1]).any()  # no neighbour; target not among them


def test_the_key_is_the_last_blocks_ffn_input(built):
    model, ids, _ = built
    seen = []
    handle = model.stack.blocks[-1].norm2.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        with torch.no_grad(), KeyCapture(model) as capture:
            model(ids[None, :20].long())
            assert torch.equal(capture.keys, seen[-1])  # norm2(x) of the final block
    finally:
        handle.remove()
    assert capture.keys is None and not model.stack.blocks[-1].ffn._forward_pre_hooks  # removed on exit


# ----------------------------------------------------------------------------- the store and the scores

def test_store_layout_and_meta(built, texts):
    _, ids, store = built
    root = store.root
    assert sorted(p.name for p in root.iterdir()) == ["index.faiss", "keys.npy", "meta.json", "values.npy"]
    meta = store.meta
    assert meta["count"] == ids.numel() - 1 == store.keys.shape[0] and meta["dim"] == 32
    assert store.keys.dtype == np.float16 and store.values.dtype == np.int32 and meta["index"]["kind"] == "flat"
    assert meta["source"]["bytes"] == texts["store"].stat().st_size and len(meta["source"]["sha256"]) == 64
    assert meta["checkpoint"]["weights"] == "best.safetensors" and meta["typical_distance"] > 0
    # Row i holds the token that follows position i: the values are the text shifted by one.
    assert np.array_equal(np.asarray(store.values), ids[1:].numpy())


def test_lambda_zero_reproduces_the_lm_exactly(built):
    model, ids, store = built
    lm, mixed = knn_token_logprobs(model, store, ids, KNNSettings(lam=0.0, k=8), context=32)
    assert torch.equal(lm, mixed)
    lm2, mixed2 = knn_token_logprobs(model, store, ids, KNNSettings(lam=0.3, k=8, temperature=1.0), context=32)
    assert torch.equal(lm, lm2) and not torch.equal(mixed2, lm2)
    nll, count = score_stream(model, ids, context=32)
    assert count == lm.numel() and abs(-float(lm.sum()) - nll) < 1e-6 * nll
    # And interpolate itself, given a real retrieval, returns the LM's log-probs bit for bit.
    pos, key, lp, target = next(scored_positions(model, ids, context=32))
    dists, vals = store.search(key, 8)
    assert torch.equal(interpolate(lp, knn_target_logprob(dists, vals, target, 1.0), 0.0), lp)


def test_a_store_of_the_text_itself_drives_its_perplexity_down(built):
    model, ids, store = built
    settings = KNNSettings(lam=0.5, k=8, temperature=store.meta["typical_distance"])
    lm, mixed = knn_token_logprobs(model, store, ids, settings, context=32)
    base, knn = math.exp(-float(lm.mean())), math.exp(-float(mixed.mean()))
    assert knn < base / 2, (base, knn)
    # Each position finds itself first (up to float16 rounding of the stored keys).
    pos, key, _, target = next(scored_positions(model, ids, context=32))
    dists, vals = store.search(key, 4)
    assert (vals[:, 0] == target).float().mean() > 0.95


def test_batched_and_single_lookups_agree(built):
    model, ids, store = built
    part = ids[:700]
    settings = KNNSettings(lam=0.3, k=16, temperature=store.meta["typical_distance"])
    lm_b, mixed_b = knn_token_logprobs(model, store, part, settings, context=32, batch_size=16)
    lm_1, mixed_1 = knn_token_logprobs(model, store, part, settings, context=32, batch_size=1)
    assert torch.allclose(lm_b, lm_1, atol=1e-5, rtol=0) and torch.allclose(mixed_b, mixed_1, atol=1e-5, rtol=0)
    # One search for all queries against one search per query.
    keys = torch.cat([key for _, key, _, _ in scored_positions(model, part, context=32)])
    targets = torch.cat([t for _, _, _, t in scored_positions(model, part, context=32)])
    dists, vals = store.search(keys, 16)
    single = [store.search(keys[i:i + 1], 16) for i in range(len(keys))]
    d1, v1 = torch.cat([d for d, _ in single]), torch.cat([v for _, v in single])
    assert torch.allclose(dists, d1, rtol=1e-4, atol=1e-6)
    temp = settings.temperature
    assert torch.allclose(knn_target_logprob(dists, vals, targets, temp), knn_target_logprob(d1, v1, targets, temp),
                          atol=1e-4)


def test_ivfpq_builds_searches_and_probing_every_list_loses_nothing(built, lm_run, texts, tmp_path):
    from tfx import run

    model, ids, _ = built
    run.knn_build(str(copy_run(lm_run, tmp_path / "flat")), data=str(texts["store"]), max_tokens=3000)
    exact = Datastore(tmp_path / "flat")
    path = copy_run(lm_run, tmp_path / "lm")
    meta = run.knn_build(str(path), data=str(texts["store"]), index="ivfpq", nlist=8, pq_m=8, pq_bits=6,
                         max_tokens=3000)
    assert meta["index"] == {"kind": "ivfpq", "nlist": 8, "pq_m": 8, "pq_bits": 6, "trained_on": 3000, "nprobe": 8}
    store = Datastore(path)
    queries = torch.from_numpy(np.asarray(store.keys[::23], dtype=np.float32))  # stored keys: an easy case
    # nprobe = nlist: the IVF lists lose nothing, so the candidates are the exhaustive search over the
    # decoded PQ codes (what remains approximate is the quantization only).
    ivf = store._ivf
    ivf.nprobe = 8
    ivf.make_direct_map()
    decoded = store.index.reconstruct_n(0, store.count)
    import faiss

    brute = faiss.IndexFlatL2(store.dim)
    brute.add(decoded)
    d_ivf, _ = store.index.search(queries.numpy(), 8)
    d_all, _ = brute.search(queries.numpy(), 8)
    assert np.allclose(d_ivf, d_all, rtol=1e-3, atol=1e-5)
    # Close to exact: with exact re-ranking each stored key finds itself among the first neighbours,
    # and the perplexity of the store's own text matches the exact index's.
    d_pq, v_pq = store.search(queries, 8, nprobe=8)
    d_ex, v_ex = exact.search(queries, 8)  # an exact store of the same 3,000 keys
    assert (v_pq[:, 0] == v_ex[:, 0]).float().mean() > 0.9
    assert torch.all(d_pq[:, 1:] >= d_pq[:, :-1])  # sorted after re-ranking
    # Re-ranking more candidates: the k nearest of a superset are never farther, and re-ranking
    # every key is the exact search.
    d_more, _ = store.search(queries, 8, nprobe=8, candidates=32)
    assert d_more.shape == (len(queries), 8) and torch.all(d_more <= d_pq + 1e-6)
    assert (d_more < d_pq - 1e-6).any()  # quantization misordered some neighbours, which re-ranking repairs
    d_all_exact, _ = store.search(queries, 8, nprobe=8, candidates=store.count)
    assert torch.allclose(d_all_exact, d_ex, rtol=1e-4, atol=1e-5)
    settings = KNNSettings(lam=0.5, k=8, temperature=exact.meta["typical_distance"], nprobe=8)
    _, mixed_pq = knn_token_logprobs(model, store, ids[:3001], settings, context=32)
    _, mixed_ex = knn_token_logprobs(model, exact, ids[:3001], settings, context=32)
    assert abs(float(mixed_pq.mean()) / float(mixed_ex.mean()) - 1) < 0.1
    d_one, _ = store.search(queries, 8, nprobe=1)  # one list of ~375 keys still fills every row
    assert torch.isfinite(d_one).all()
    with pytest.raises(UsageError, match="must divide"):
        run.knn_build(str(path), data=str(texts["store"]), index="ivfpq", pq_m=7)


def test_a_failed_build_leaves_the_old_store(built, lm_run, texts, tmp_path, monkeypatch):
    from tfx import run
    from tfx.knn import datastore

    path = copy_run(lm_run, tmp_path / "lm")
    run.knn_build(str(path), data=str(texts["store"]), max_tokens=500)
    before = {p.name: p.read_bytes() for p in store_dir(path).iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("killed while indexing")

    monkeypatch.setattr(datastore, "build_index", broken)
    with pytest.raises(RuntimeError):
        run.knn_build(str(path), data=str(texts["store"]))
    assert {p.name: p.read_bytes() for p in store_dir(path).iterdir()} == before  # no temp files either
    assert Datastore(path).count == 500


def test_generation_keys_with_the_cache_equal_full_forward_keys(built):
    from tfx.decoding.generate import generate_ids

    model, ids, store = built
    prompt = ids[:10].tolist()
    plain = generate_ids(model, prompt, max_new_tokens=12, temperature=0)
    adjuster = KNNAdjuster(model, store, KNNSettings(lam=0.0, k=8))
    with adjuster:
        assert generate_ids(model, prompt, max_new_tokens=12, temperature=0, adjust_logprobs=adjuster) == plain
    used = []
    adjuster = KNNAdjuster(model, store, KNNSettings(lam=0.9, k=8, temperature=store.meta["typical_distance"]))
    with adjuster:
        original = adjuster.__call__

        def record(logprobs):
            used.append(adjuster.capture.keys[:, -1].clone())
            return original(logprobs)

        out = generate_ids(model, prompt, max_new_tokens=12, temperature=0, adjust_logprobs=record)
    with torch.no_grad(), KeyCapture(model) as capture:
        model(torch.tensor([prompt + out[:-1]]))
        full = capture.keys[0, len(prompt) - 1:]
    assert len(used) == len(out) and torch.allclose(torch.cat(used), full, atol=1e-5)


# ----------------------------------------------------------------------------- the command line

def test_cli_build_tune_eval_generate(lm_run, texts, tmp_path, env):
    path = copy_run(lm_run, tmp_path / "lm")
    proc = run_tfx("knn", "build", str(path), "--data", str(texts["store"]), env=env, check=True)
    info = json.loads(proc.stdout)
    assert info["count"] == 6000 and info["index"]["kind"] == "flat" and "knn build" in proc.stderr
    proc = run_tfx("knn", "tune", str(path), "--split", "valid", "--stride", "16", env=env, check=True)
    saved = json.loads((path / "knn" / "settings.json").read_text())
    assert {"lambda", "k", "temperature"} <= set(saved) and saved["lambda"] in LAMBDAS and saved["stride"] == 16
    header, base, best = proc.stdout.splitlines()[:3]
    assert header.split()[:3] == ["lambda", "k", "temperature"]
    assert best.split()[:2] == [f"{saved['lambda']:g}", str(saved["k"])]
    proc = run_tfx("eval", str(path), "--knn", "--data", str(texts["store"]), "--json", "--candidates", "64",
                   env=env, check=True)
    result = json.loads(proc.stdout)
    assert result["knn"]["candidates"] == 64 and result["knn"]["nprobe"] is None  # shown; an exact store ignores it
    assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(result) <= set(result["knn"]) | {
        "split", "context", "stride", "knn"}
    assert result["stride"] == 16  # the windows the settings were tuned with, without --stride
    assert result["knn"]["perplexity"] < result["perplexity"] and result["knn"]["lambda"] == saved["lambda"]
    proc = run_tfx("generate", str(path), "--knn", "-", "--max-new-tokens", "20", "--seed", "1", input="ROMEO:\n",
                   env=env, check=True)
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.strip()


def test_cli_errors(lm_run, tmp_path, env):
    path = copy_run(lm_run, tmp_path / "lm")
    proc = tfx_in_process("eval", str(path), "--knn", "--split", "valid", env=env)
    assert proc.returncode == 2 and "no kNN datastore" in proc.stderr and "tfx knn build" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    proc = tfx_in_process("knn", "build", str(path), "--data", str(tmp_path / "missing.txt"), env=env)
    assert proc.returncode == 2 and "missing.txt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (path / "knn").exists()
    proc = tfx_in_process("knn", "tune", str(path), "--candidates", "0", env=env)
    assert proc.returncode == 2 and "--candidates" in proc.stderr and "Traceback" not in proc.stderr
    proc = tfx_in_process("eval", str(path), "--candidates", "64", env=env)
    assert proc.returncode == 2 and "add --knn" in proc.stderr and "Traceback" not in proc.stderr
