"""tfx compare: each variant trained under the same budget in its own process, evaluated on the
same split, reported (table, JSON, curves); a second call reuses the runs; bad --vary is a clear error."""
from __future__ import annotations

import json
import re

import pytest
from conftest import TINY, run_tfx, sets, tfx_in_process

from tfx.compare import parse_variants, parse_vary, toml_value, variants
from tfx.errors import UsageError

LM = "recipes/lm/shakespeare-char.toml"


def test_vary_values_and_names():
    vary = parse_vary(["model.attention.kind=dense,local", "train.optimizer.betas=[0.9,0.99],[0.9,0.95]"])
    assert vary == [("model.attention.kind", ["dense", "local"]),
                    ("train.optimizer.betas", ["[0.9,0.99]", "[0.9,0.95]"])]
    todo = variants(vary)
    assert [v.name for v in todo] == ["dense_-0.9-0.99-", "dense_-0.9-0.95-", "local_-0.9-0.99-", "local_-0.9-0.95-"]
    assert todo[0].sets == ['model.attention.kind="dense"', "train.optimizer.betas=[0.9,0.99]"]
    assert [toml_value(x) for x in ("3e-3", "true", "rope", '"a b"')] == ["3e-3", "true", '"rope"', '"a b"']
    for bad in ("model.attention.kind", "=a,b", "x="):
        with pytest.raises(UsageError, match="expected KEY=V1,V2"):
            parse_vary([bad])


def test_named_variants_carry_their_own_keys():
    todo = parse_variants(["xl:model.memory.kind=xl,model.memory.mem_len=128", "base:",
                           "lf:model.attention.kind=longformer,model.attention.global_tokens=[0,1]"])
    assert [(v.name, v.sets) for v in todo] == [
        ("xl", ['model.memory.kind="xl"', "model.memory.mem_len=128"]), ("base", []),
        ("lf", ['model.attention.kind="longformer"', "model.attention.global_tokens=[0,1]"])]
    for bad, says in [("nocolon", "expected NAME:"), ("a b:x=1", "expected NAME:"), ("v:x", "not KEY=VALUE"),
                      ("v:=1", "not KEY=VALUE")]:
        with pytest.raises(UsageError, match=says):
            parse_variants([bad])


def test_cli_compares_resumes_and_reports(tmp_path, small_text):
    out = tmp_path / "cmp"
    base = sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1", "train.eval_every=5",
                "train.save_every=5")
    args = ["compare", LM, "--vary", "model.position.kind=rope", "--variant", "alibi:model.position.kind=alibi",
            "--steps", "10", "--out", str(out), *base]
    proc = run_tfx(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [v["name"] for v in report["variants"]] == ["rope", "alibi"]
    for v in report["variants"]:
        ev = json.loads(tfx_in_process("eval", str(out / v["name"]), "--split", "valid", "--json").stdout)
        assert v["metric"] == "perplexity" and v["value"] == pytest.approx(ev["perplexity"], rel=1e-6)
        assert v["steps"] == 10 and v["parameters"] > 0 and v["peak_mib"] > 50 and v["tokens_per_s"] > 0
        recipe = (out / v["name"] / "recipe.toml").read_text()
        assert f'kind = "{v["name"]}"' in recipe and "steps = 10" in recipe
    assert report["best"] == min(report["variants"], key=lambda v: v["value"])["name"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    again = tfx_in_process(*args)  # nothing trains again: the table comes from the cache
    assert again.returncode == 0 and "measured already" in again.stderr and "training" not in again.stderr
    assert "rope" in again.stdout and "alibi" in again.stdout and "perplexity" in again.stdout


def test_cli_refusals(tmp_path):
    for bad, says in [(["--vary", "model.position.kind=rope"], "give the budget"),
                      (["--vary", "model.position.kind=rope", "--steps", "5", "--minutes", "1"], "give the budget"),
                      (["--vary", "model.nonsense=1,2", "--steps", "5"], "nonsense"),
                      (["--vary", "model.position.kind=rope,rope", "--steps", "5"], "the same name"),
                      (["--vary", "model.position.kind=rope", "--variant", "rope:", "--steps", "5"], "named alike"),
                      (["--steps", "5"], "nothing to compare")]:
        proc = tfx_in_process("compare", LM, *bad, "--out", str(tmp_path / "x"))
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, (bad, proc.stderr)


def test_equal_time_sizes_each_variant_by_a_probe(tmp_path, small_text):
    """--minutes: a 20-step probe times the variant; its run gets the steps that fill the time (and
    train.max_minutes as a cap), and the probe leaves nothing behind."""
    out = tmp_path / "timed"
    base = sets(*TINY, f"data.train={small_text}", "data.corpus=''", "data.holdout=0.1", "train.eval_every=0")
    proc = run_tfx("compare", LM, "--vary", "model.position.kind=rope", "--minutes", "0.1", "--out", str(out),
                   "--plot", "", *base)
    assert proc.returncode == 0, proc.stderr
    sized = re.search(r"rope: ([\d.e-]+) s a step -> train.steps = (\d+) for 0.1 minutes", proc.stderr)
    want = 0.1 * 60 / float(sized.group(1)) * 0.95  # (the printed seconds have 4 significant digits)
    assert sized and abs(int(sized.group(2)) - want) <= 0.01 * want + 1 and want > 20
    recipe = (out / "rope" / "recipe.toml").read_text()
    assert f"steps = {sized.group(2)}" in recipe and "max_minutes = 0.1" in recipe
    assert not (out / "probe").exists() and not (out / "curves.png").exists()
