"""`tfx bench train|generate|attention`: counted FLOPs, the decode loop, and the CLI's output."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from torch import nn

from conftest import REPO, TINY, run_tfx, sets, tfx_in_process
from tfx import config as C
from tfx.bench.generate import decode_once
from tfx.bench.train import step_flops
from tfx.cli.bench import show_rows
from tfx.decoding.generate import generate_ids
from tfx.families import build_model

RECIPE = str(REPO / "recipes/lm/shakespeare-char.toml")


def tiny_lm(*extra: str, vocab: int = 70):
    recipe = C.load_recipe(RECIPE, [*TINY, *extra], files=False)
    torch.manual_seed(0)
    return recipe, build_model(recipe, vocab_size=vocab)


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_counted_flops_are_the_transformer_formula(ffn):
    """Forward + backward = 6 x (matmul weights) per token + 12 x layers x context x d_model for
    attention (Kaplan et al. 2020; PaLM's MFU): every matmul is counted, once, attention included."""
    recipe, model = tiny_lm(f"model.ffn={ffn!r}")
    B, T, d, L = 3, recipe.model.context, recipe.model.d_model, recipe.model.n_layers
    tokens = torch.randint(0, 70, (B, T + 1))
    batch = {"input": tokens[:, :-1], "target": tokens[:, 1:]}
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    flops = step_flops(model, [batch], contextlib.nullcontext)
    assert flops == (6 * weights + 12 * L * T * d) * B * T
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradient behind


def test_bench_decode_equals_greedy_generation():
    recipe, model = tiny_lm()
    model.eval()
    prompt = torch.randint(0, 70, (1, 5))
    _, _, out = decode_once(model, prompt, 20, contextlib.nullcontext)
    expected = generate_ids(model, prompt[0].tolist(), max_new_tokens=20, temperature=0)
    assert out[0].tolist() == expected
    batch = torch.randint(0, 70, (3, 5))
    _, _, rows = decode_once(model, batch, 10, contextlib.nullcontext)
    for row, ids in zip(rows, batch):  # batched decoding gives each row its own greedy text
        assert row.tolist() == generate_ids(model, ids.tolist(), max_new_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def env(shakespeare):
    return {"TFX_DATA": str(shakespeare)}


def test_cli_bench_train_json(env, tmp_path):
    trace = tmp_path / "trace.json"
    proc = run_tfx("bench", "train", RECIPE, *sets(*TINY), "--steps", "3", "--warmup", "1", "--json",
                   "--profile", str(trace), env=env, check=True)
    row = json.loads(proc.stdout)
    assert row["steps"] == 3 and row["tokens_per_step"] == 4 * 32 and row["family"] == "lm"
    assert row["ms_min"] <= row["ms_per_step"] <= row["ms_max"] and 0 <= row["data_frac"] < 1
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / row["ceiling_flops"])
    assert "bench train" in proc.stderr
    assert "aten::mm" in proc.stderr and "profiled steps" in proc.stderr  # the operator table
    assert any(e.get("name") == "aten::mm" for e in json.loads(trace.read_text())["traceEvents"])
    bad = tfx_in_process("bench", "train", RECIPE, "--profile", str(tmp_path / "no" / "trace.json"), env=env)
    assert bad.returncode == 2 and "no such directory" in bad.stderr
    bad = tfx_in_process("bench", "train", RECIPE, "--set", "model.nope=1", env=env)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_bench_generate(tmp_path, env):
    run = tmp_path / "run"
    run_tfx("train", RECIPE, *sets(*TINY, "train.steps=2", "train.eval_every=0"), "--out", str(run), env=env,
            check=True)
    proc = run_tfx("bench", "generate", str(run), "--prompt-len", "8", "--new-tokens", "16", "--batch", "2",
                   "--repeats", "2", "--json", env=env, check=True)
    row = json.loads(proc.stdout)
    assert (row["batch"], row["prompt_len"], row["new_tokens"]) == (2, 8, 16)
    assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert row["decode_ms_per_token"] == pytest.approx(2 * 1000 / row["decode_tokens_per_s"])
    table = run_tfx("bench", "generate", str(run), "--prompt-len", "8", "--new-tokens", "4", env=env, check=True)
    assert "decode_tokens_per_s" in table.stdout
    bad = tfx_in_process("bench", "generate", str(run), "--prompt-len", "30", "--new-tokens", "16", env=env)
    assert bad.returncode == 2 and "exceeds the model's context (32)" in bad.stderr


def test_cli_bench_attention_json_plot_and_table(tmp_path):
    """A tiny sweep through the CLI: --json rows with their fields, a --plot PNG; the table off a
    terminal keeps every cell whole; an unknown kind is a usage error."""
    plot = tmp_path / "attention.png"
    proc = run_tfx("bench", "attention", "--kinds", "dense", "--seq", "16,32", "--mode", "fwd", "--heads", "2",
                   "--d-head", "8", "--repeats", "1", "--device", "cpu", "--json", "--plot", str(plot),
                   env={"OMP_NUM_THREADS": "1"}, check=True)
    rows = json.loads(proc.stdout)
    assert [(r["kind"], r["T"]) for r in rows] == [("dense", 16), ("dense", 32)]
    for r in rows:
        assert (r["mode"], r["causal"], r["status"]) == ("fwd", True, "ok")
        assert r["ms"] > 0 and r["tokens_per_s"] == pytest.approx(r["T"] / (r["ms"] / 1000))
        assert isinstance(r["peak_mib"], float)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot written to {plot}" in proc.stderr
    wide = [{**r, "status": "over memory budget (8 GiB): " + "x" * 150} for r in rows]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # stdout not a terminal: the table as the CLI prints it
        show_rows(wide, ["kind", "T", "ms", "tokens_per_s", "peak_mib", "status"], title="attention", fmt="table")
    assert "…" not in out.getvalue() and wide[0]["status"] in out.getvalue()
    bad = tfx_in_process("bench", "attention", "--kinds", "dens", "--seq", "16")
    assert bad.returncode == 2 and "did you mean 'dense'" in bad.stderr


def test_bench_attention_on_a_patch_grid_runs_window_attention():
    from conftest import tfx_in_process
    from tfx.bench.attention import BenchSettings, measure_kind

    rows = measure_kind("window", BenchSettings(seqs=[], grids=[(6, 6), (4, 4)], causal=False, repeats=1, d_head=8,
                                                params={"window": {"window": 2}}))
    assert [(r["grid"], r["T"], r["status"]) for r in rows] == [("4x4", 16, "ok"), ("6x6", 36, "ok")]
    refused = tfx_in_process("bench", "attention", "--kinds", "window", "--seq", "64")
    assert refused.returncode == 2 and "needs a patch grid (--grid 64x64)" in refused.stderr
    assert tfx_in_process("bench", "attention", "--grid", "8y8").returncode == 2
