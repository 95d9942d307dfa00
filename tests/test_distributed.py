"""Data parallel on torch.distributed, CPU/gloo, DDP and FSDP2 (train.parallel): 2 processes under
torchrun train the same model as 1 process on the same global batch; only rank 0 writes and speaks;
resume at another world size; each rank's RNG kept; refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_tfx, sets, tfx_in_process

LM = REPO / "recipes/lm/shakespeare-char.toml"
STEPS = ["train.steps=12", "train.save_every=0", "train.eval_every=6"]


def torchrun(*args: str, log_dir: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m tfx ARGS`, each rank's stdout/stderr in log_dir."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--log-dir", str(log_dir), "--redirects=3", "-m", "tfx", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def records(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "split" not in r], [r for r in lines if r.get("split") == "valid"]


def assert_same_losses(one: Path, two: Path, steps: int) -> None:
    train1, valid1 = records(one)
    train2, valid2 = records(two)
    assert [r["step"] for r in train1] == [r["step"] for r in train2] == list(range(1, steps + 1))
    for a, b in zip(train1, train2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    assert [r["step"] for r in valid1] == [r["step"] for r in valid2]  # validated once per eval, not per rank
    for a, b in zip(valid1, valid2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_seq2seq_two_processes_equal_one_and_nproc_launches_torchrun(tmp_path, parallel):
    """`tfx train --nproc 2` (torchrun for the user); pairs of different lengths, so padding and
    the global token count matter."""
    pairs = [(f"ein {'grosses ' * (i % 5)}haus {i}", f"a {'big ' * (i % 3)}house {i}") for i in range(48)]
    (tmp_path / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    recipe = tmp_path / "mt.toml"
    recipe.write_text(f'''
family = "seq2seq"
[data]
train = "{tmp_path / 'pairs.tsv'}"
valid = "{tmp_path / 'pairs.tsv'}"
[tokenizer]
kind = "char"
[model]
d_model = 32
n_heads = 4
d_ff = 64
encoder_layers = 1
decoder_layers = 1
context = 32
[train]
batch_size = 8
device = "cpu"
precision = "fp32"
threads = 1
log_every = 1
eval_bleu = false
parallel = "{parallel}"
''')
    args = sets(*STEPS)
    one, two = tmp_path / "one", tmp_path / "two"
    run_tfx("train", str(recipe), *args, "--out", str(one), check=True)
    proc = run_tfx("train", "--nproc", "2", str(recipe), *args, "--out", str(two))
    assert proc.returncode == 0, proc.stderr
    assert_same_losses(one, two, 12)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # torchrun prefixes nothing here: every line of stderr is rank 0's (rank 1 says nothing)
    assert proc.stderr.count("step 12/12") == 1 and proc.stderr.count("training the char tokenizer") == 1


def test_a_batch_that_does_not_divide_is_refused(small_text, tmp_path):
    proc = tfx_in_process("train", "--nproc", "2", str(LM), *sets(*TINY, "train.batch_size=5",
                                                                   f"data.train={small_text}"),
                          "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "train.batch_size (5) is the global batch and must divide by the number of processes (2)" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_segment_memory_is_refused_on_several_processes(small_text, tmp_path):
    proc = tfx_in_process("train", str(LM), *sets(*TINY, "model.memory.kind=xl", f"data.train={small_text}"),
                          "--out", str(tmp_path / "run"), env={"WORLD_SIZE": "2", "RANK": "0"})
    assert proc.returncode == 2
    assert "model.memory.kind = 'xl' cannot train on 2 processes" in proc.stderr


def test_shard_takes_each_rank_its_rows():
    from tfx.train.distributed import shard

    batch = {"input": torch.arange(10).view(5, 2), "reset": torch.tensor(True)}
    parts = [shard(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p["input"] for p in parts]), batch["input"])
    assert [len(p["input"]) for p in parts] == [2, 3] and all(p["reset"] is batch["reset"] for p in parts)


def _grad_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from tfx.train import distributed as dist

    with dist.process_group("cpu"):
        grads = _sgd_grads(dist.wrap)
        if rank == 0:
            torch.save(grads, out)


def _sgd_grads(wrap=None) -> dict:
    """One TrainStep (2 micro-batches, rows with 0..10 ignored targets) with SGD at lr 1: the update
    is the gradient. With `wrap`, through DDP on the ranks' rows of the same global batches."""
    import contextlib

    from tfx.config import validate
    from tfx.families import build_model
    from tfx.train.loop import TrainStep

    torch.set_num_threads(1)
    r = validate({"data": {"train": "x"}, "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "context": 12},
                  "train": {"device": "cpu", "clip": 0.0, "grad_accum": 2, "precision": "fp32"}})
    torch.manual_seed(0)
    model = build_model(r, vocab_size=17)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 17, (16, 13), generator=g)
    target = rows[:, 1:].clone()
    for i in range(16):
        target[i, : (i * 5) % 11] = -100
    micro = [{"input": rows[s, :-1], "target": target[s]} for s in (slice(0, 8), slice(8, 16))]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    step = TrainStep(model, opt, cfg=r.train, autocast=contextlib.nullcontext,
                     parallel=wrap(model, torch.device("cpu")) if wrap else None)
    step(micro, [None, None])
    return {k: before[k] - v.detach() for k, v in model.named_parameters()}


def test_the_synced_gradient_is_the_one_process_gradient(tmp_path):
    """AdamW hides a gradient's scale; SGD does not: the DDP gradient (rows whose token counts differ
    per rank, 2 micro-batches accumulated) equals one process's on the same global batch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_grad_worker, args=(2, port, str(tmp_path / "g.pt")), nprocs=2)
    two, one = torch.load(tmp_path / "g.pt"), _sgd_grads()
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)
    assert sum(float(v.abs().sum()) for v in one.values()) > 0


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_and_resume_at_the_other_world_size(small_text, tmp_path, parallel):
    """2 processes under torchrun train the LM as 1 process does on the same global batch (the same
    losses, one validation per eval, the same run files, rank 1 quiet); a run saved by 2 processes
    resumes on 1, and one saved by 1 resumes on 2, continuing the losses of an uninterrupted run: the
    data position and the batch are global (dropout 0; a constant schedule, since the first leg is
    told fewer steps and cosine depends on their number)."""
    args = sets(*TINY, "model.n_layers=1", "model.dropout=0", "train.save_every=3", "train.eval_every=4",
                'train.schedule={kind = "constant", warmup = 2}', f"data.train={small_text}",
                f"data.valid={small_text}", 'data.corpus=""', f"train.parallel={parallel}")
    whole, two_then_one, one_then_two = tmp_path / "whole", tmp_path / "2to1", tmp_path / "1to2"
    run_tfx("train", str(LM), *args, "--set", "train.steps=8", "--out", str(whole), check=True)
    first = torchrun("train", str(LM), *args, "--set", "train.steps=4", "--out", str(two_then_one),
                     log_dir=tmp_path / "logs")
    assert first.returncode == 0, first.stderr
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "logs").rglob("stderr.log")}
    assert set(logs) == {"0", "1"}
    assert logs["1"] == ""  # rank 1 is quiet on success
    assert "step 4/4" in logs["0"] and logs["0"].count("| valid ") == 1  # validated once per eval
    assert (two_then_one / "state/ckpt-00000004/dcp").is_dir() == (parallel == "fsdp")  # sharded checkpoints
    run_tfx("train", str(LM), *args, "--set", "train.steps=4", "--out", str(one_then_two), check=True)
    assert sorted(p.name for p in two_then_one.iterdir()) == sorted(p.name for p in one_then_two.iterdir())
    run_tfx("train", "--resume", str(two_then_one), "--set", "train.steps=8", check=True)
    second = torchrun("train", "--resume", str(one_then_two), "--set", "train.steps=8", log_dir=tmp_path / "logs-b")
    assert second.returncode == 0, second.stderr
    assert_same_losses(whole, two_then_one, 8)
    assert_same_losses(whole, one_then_two, 8)


def test_each_rank_resumes_its_own_rng(small_text, tmp_path):
    """With dropout every rank draws its own masks: a 2-process run stopped and resumed on 2
    processes goes on exactly as the uninterrupted one only if rank 1 gets back rank 1's RNG."""
    args = sets(*TINY, "model.n_layers=1", "model.dropout=0.2", "train.save_every=3", "train.eval_every=0",
                'train.schedule={kind = "constant", warmup = 2}', f"data.train={small_text}", 'data.corpus=""')
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for out, steps in ((whole, 6), (parts, 3)):
        proc = torchrun("train", str(LM), *args, "--set", f"train.steps={steps}", "--out", str(out),
                        log_dir=tmp_path / f"logs-{out.name}")
        assert proc.returncode == 0, proc.stderr
    proc = torchrun("train", "--resume", str(parts), "--set", "train.steps=6", log_dir=tmp_path / "logs-resume")
    assert proc.returncode == 0, proc.stderr
    train_w, _ = records(whole)
    train_p, _ = records(parts)
    assert [r["loss"] for r in train_p] == [r["loss"] for r in train_w]
    saved = torch.load(parts / "state/ckpt-00000006/optim.pt", weights_only=True)["rng_ranks"]
    assert saved.shape[0] == 2 and not torch.equal(saved[0], saved[1])  # two different streams were kept


def test_sharded_run_loads_in_one_process_and_refuses_a_ddp_checkpoint(small_text, tmp_path):
    """An FSDP run's sharded checkpoint: eval, generate and average read it in one process (the last
    validation loss comes back); a DDP run's checkpoint is not resumed into FSDP shards."""
    args = sets(*TINY, "model.n_layers=1", "train.steps=4", "train.save_every=2", "train.eval_every=4",
                "train.keep_checkpoints=2", "train.eval_tokens=100000", f"data.train={small_text}",
                f"data.valid={small_text}", 'data.corpus=""')  # validation on the whole text, as tfx eval
    run = tmp_path / "fsdp"
    proc = torchrun("train", str(LM), *args, "--set", "train.parallel=fsdp", "--out", str(run),
                    log_dir=tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr
    _, valid = records(run)
    report = json.loads(run_tfx("eval", str(run), "--split", "valid", "--json", "--checkpoint", "last",
                                check=True).stdout)
    assert report["loss"] == pytest.approx(valid[-1]["loss"], rel=1e-5)
    assert len(run_tfx("generate", str(run), "ROMEO:", "--max-new-tokens", "5", "--seed", "1", check=True).stdout) >= 5
    run_tfx("average", str(run), "--last", "2", "--out", str(tmp_path / "avg"), check=True)
    ddp = tmp_path / "ddp"
    run_tfx("train", str(LM), *args, "--out", str(ddp), check=True)
    proc = torchrun("train", "--resume", str(ddp), "--set", "train.steps=6", "--set", "train.parallel=fsdp",
                    log_dir=tmp_path / "logs-refused")
    assert proc.returncode != 0
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "logs-refused").rglob("stderr.log")}
    assert "was saved with train.parallel = 'ddp' (full tensors, not sharded ones)" in logs["0"]
