"""SPALM (model.memory.kind = "spalm"): with the gate forced to 0 it is the XL model; forced to 1,
the head reads the neighbours' mix alone, written out here from a brute-force search; the gate and
the embeddings get gradients; training never retrieves the query's own stretch of text;
generation token by token equals evaluation by segments; the CLI trains, evaluates and generates."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_tfx, sets

from tfx.config import import_kinds, validate
from tfx.decoding.segments import SegmentReader
from tfx.families import build_model, get_task
from tfx.knn.keys import KeyCapture
from tfx.rundir import load_run

import_kinds()
RECIPE = "recipes/lm/shakespeare-char.toml"
C, K = 8, 4  # the SPALM model's context (its segment) and neighbours per position


pytestmark = pytest.mark.usefixtures("one_thread")  # faiss follows torch's thread count


@pytest.fixture(scope="module")
def store_text(tmp_path_factory, small_text) -> Path:
    path = tmp_path_factory.mktemp("spalmtext") / "store.txt"
    path.write_text(small_text.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, store_text) -> Path:
    """A tiny char LM (context 16) trained 20 steps on the store text, with an exact datastore of it."""
    out = tmp_path_factory.mktemp("spalmruns") / "base"
    env = {"OMP_NUM_THREADS": "1"}
    run_tfx("train", RECIPE, *sets(*TINY, "model.context=16", "train.steps=20", "train.eval_every=0",
                                   "train.optimizer.lr=1e-2", "data.corpus=''", f"data.train={store_text}",
                                   "data.holdout=0.1"), "--out", str(out), env=env, check=True)
    run_tfx("knn", "build", str(out), "--data", str(store_text), "--index", "flat", "--dtype", "float32", env=env,
            check=True)
    return out


def spalm(base: Path, kind: str = "spalm", **memory):
    vocab = load_run(base)[2].head.weight.shape[0]
    mem = {"kind": kind, "mem_len": 4, **({"datastore": str(base), "top_k": K} if kind == "spalm" else {}), **memory}
    recipe = validate({"data": {"train": "x.txt"}, "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "context": C,
                                                             "position": {"kind": "rope"}, "memory": mem}})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=vocab).double().eval()


def text_ids(base: Path, store_text: Path, n: int = 3 * C) -> torch.Tensor:
    _, tokenizer, _ = load_run(base)
    return torch.tensor(tokenizer.encode(store_text.read_text(encoding="utf-8")[1000:1000 + n]))


def by_segments(model, ids: torch.Tensor) -> torch.Tensor:
    state, out = model.stack.new_memory(), []
    for s in range(0, ids.numel(), C):
        logits, state = model(ids[None, s:s + C], state)
        out.append(logits[0])
    return torch.cat(out)


def test_gate_zero_is_the_xl_model(base, store_text):
    """Same weights (the gate's are not random draws), gate forced to 0: the logits of the XL model
    over three segments with the memory carried."""
    model, xl = spalm(base), spalm(base, kind="xl")
    model.stack.recurrence.forced_gate = 0.0
    ids = text_ids(base, store_text)
    assert set(model.state_dict()) - set(xl.state_dict()) == {"stack.recurrence.gate_weight",
                                                              "stack.recurrence.gate_bias"}
    torch.testing.assert_close(by_segments(model, ids), by_segments(xl, ids), rtol=0, atol=0)
    model.stack.recurrence.forced_gate = None  # learned gate: sigmoid(-2) mixes the neighbours in
    assert not torch.allclose(by_segments(model, ids), by_segments(xl, ids))


def brute_force_neighbours(base: Path, segment: torch.Tensor) -> torch.Tensor:
    """(T, K) next tokens of the K nearest stored keys (exact L2 over keys.npy) to the base model's
    keys of the segment read from its first token."""
    _, _, lm = load_run(base)
    with KeyCapture(lm) as capture, torch.no_grad():
        lm(segment[None])
        q = capture.keys[0].double()  # (T, d)
    keys = torch.from_numpy(np.load(base / "knn" / "keys.npy")).double()
    values = torch.from_numpy(np.load(base / "knn" / "values.npy")).long()
    d = torch.cdist(q, keys)  # (T, N)
    return values[d.topk(K, largest=False).indices]


def test_gate_one_is_the_retrieved_part_alone(base, store_text):
    """Gate forced to 1: logits = head(m), m = sum_k softmax(e(y_k) . h) e(y_k) over the brute-force
    neighbours, h the stack's last hidden state (the gate-0 output)."""
    model = spalm(base)
    ids = text_ids(base, store_text)
    memory = model.stack.recurrence
    state_h, state_m = model.stack.new_memory(), model.stack.new_memory()
    for s in range(0, ids.numel(), C):
        segment = ids[s:s + C]
        memory.forced_gate = 0.0
        h, state_h = model.stack(segment[None], state=state_h)
        memory.forced_gate = 1.0
        got, state_m = model(segment[None], state_m)
        y = model.stack.embed(brute_force_neighbours(base, segment))  # (T, K, d)
        m = ((y @ h[0][..., None]).squeeze(-1).softmax(-1)[..., None] * y).sum(-2)  # (T, d)
        torch.testing.assert_close(got[0], model.head(m), rtol=1e-9, atol=1e-9)


def test_state_save_restore_and_reorder(base, store_text):
    """The state a checkpoint saves (the XL memory) continues the same; reorder selects rows."""
    model = spalm(base)
    ids = text_ids(base, store_text, 6 * C).view(2, 3 * C)
    _, state = model(ids[:, :C], model.stack.new_memory())
    restored = model.restore_memory(state.memory.save(), "cpu")
    torch.testing.assert_close(model(ids[:, C:2 * C], restored)[0], model(ids[:, C:2 * C], state)[0], rtol=0, atol=0)
    _, state = model(ids[:, :C], model.stack.new_memory())  # the state before the second segment, again
    _, alone = model(ids[1:, :C], model.stack.new_memory())
    state.reorder(torch.tensor([1]))
    torch.testing.assert_close(model(ids[1:, C:2 * C], state)[0], model(ids[1:, C:2 * C], alone)[0],
                               rtol=1e-10, atol=1e-10)


def test_the_gate_and_the_embeddings_get_gradients(base, store_text):
    model = spalm(base).train()
    ids = text_ids(base, store_text, 2 * C + 1)
    state = None
    for s in (0, C):
        loss, _, state = model.loss({"input": ids[None, s:s + C], "target": ids[None, s + 1:s + C + 1]}, state)
        loss.backward()
    memory = model.stack.recurrence
    assert memory.gate_weight.grad.abs().sum() > 0 and memory.gate_bias.grad.abs() > 0
    rows = model.stack.embed.weight.grad.abs().sum(-1) > 0
    neighbours = memory.retriever(rows.numel(), "cpu").neighbours(ids[None, :C], K, None, 1)
    assert rows[neighbours.flatten()].all()  # every retrieved token's embedding learns (through m)


def test_training_batches_pass_their_positions(base, store_text, monkeypatch):
    """LanguageModel.loss hands a lane batch's `position` to the retrieval, advanced by the segment
    length within a step's state; evaluation (no position) retrieves without exclusion."""
    from tfx.data.batching import DataPosition, StreamBlocks
    from tfx.nn.memory.spalm import Retriever

    seen = []
    real = Retriever.rows
    monkeypatch.setattr(Retriever, "rows", lambda self, t, k, p, e: seen.append(None if p is None else p.tolist())
                        or real(self, t, k, p, e))
    model = spalm(base).train()
    ids = text_ids(base, store_text, 400)
    batch, _ = next(StreamBlocks(ids, block=C, seed=0).batches(2, DataPosition()))
    assert batch["position"].tolist() == [0, (ids.numel() - 1) // 2]
    model.loss(batch, None)
    model.eval()
    model(batch["input"], model.stack.new_memory())
    assert seen == [batch["position"].tolist(), None]


def test_training_never_retrieves_its_own_stretch(base, store_text):
    """A segment taken from the store text at a build window's start has its own keys in the store
    (distance 0): without the exclusion its own row is the nearest; with it, no row within `exclude`
    of the query's position is kept and the K kept are the brute-force nearest of the others."""
    model = spalm(base)
    vocab = model.stack.embed.num_embeddings
    r = model.stack.recurrence.retriever(vocab, "cpu")
    recipe, tokenizer, _ = load_run(base)
    stream, _ = get_task(recipe, base).token_stream(tokenizer, split="train", data=str(store_text))  # as knn build
    stream = stream.long()
    start = 2 * r.context  # a window of the build (stride = its context)
    segment = stream[None, start:start + C]
    plain = r.rows(segment, K, None, 0)
    assert plain[:, 0].tolist() == list(range(start, start + C))  # the query finds itself
    exclude = 12
    kept = r.rows(segment, K, torch.tensor([start]), exclude)
    own = torch.arange(start, start + C)[:, None]
    assert (kept >= 0).all() and ((kept - own).abs() >= exclude).all()
    keys = torch.from_numpy(np.load(base / "knn" / "keys.npy")).double()
    q = r.queries(segment)[0].double()
    d = torch.cdist(q, keys)  # (C, N)
    far = (torch.arange(keys.shape[0])[None, :] - own).abs() >= exclude
    want = d.masked_fill(~far, float("inf")).topk(K, largest=False).indices
    assert torch.equal(torch.sort(kept, 1).values, torch.sort(want, 1).values)


def test_generation_token_by_token_equals_evaluation(base, store_text):
    model = spalm(base)
    ids = text_ids(base, store_text, 3 * C + 2)
    want = by_segments(model, ids)
    reader = SegmentReader(model, "cpu")
    got = [reader.feed(ids[:5].tolist())[0, -1]] + [reader.feed([int(t)])[0, -1] for t in ids[5:]]
    torch.testing.assert_close(torch.stack(got), want[4:], rtol=1e-10, atol=1e-10)


def test_cli_train_eval_generate(base, store_text, tmp_path):
    """A SPALM run trained on the store text over the base's datastore: the training batches carry
    their positions, eval reads by segments, generate writes text; a missing datastore run is a
    clear error."""
    env = {"OMP_NUM_THREADS": "1"}
    common = sets(*TINY, "model.context=16", "model.position.kind='rope'", "model.memory.kind='spalm'",
                  f"model.memory.datastore='{base}'", "model.memory.mem_len=16", "data.corpus=''",
                  f"data.train={store_text}", "data.holdout=0.1", "data.blocks='lanes'", "train.steps=12",
                  "train.eval_every=6", "train.save_every=6")
    out = tmp_path / "spalm"
    proc = run_tfx("train", RECIPE, *common, "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    ev = run_tfx("eval", str(out), "--split", "valid", "--json", env=env)
    assert ev.returncode == 0, ev.stderr
    assert np.isfinite(json.loads(ev.stdout)["loss"])
    gen = run_tfx("generate", str(out), "-", "--max-new-tokens", "20", "--seed", "1", input="ROMEO:\n", env=env)
    assert gen.returncode == 0 and len(gen.stdout) > 0, gen.stderr
    moved = tmp_path / "moved"
    shutil.move(str(base), str(moved))
    try:
        bad = run_tfx("eval", str(out), "--split", "valid", env=env)
    finally:
        shutil.move(str(moved), str(base))
    assert bad.returncode != 0 and "model.memory.datastore" in bad.stderr and "Traceback" not in bad.stderr
