"""The CLI end to end, in subprocesses, on the real Shakespeare corpus (fetched once)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, run_tfx, sets, tfx_in_process

RECIPE = str(REPO / "recipes/lm/shakespeare-char.toml")


@pytest.fixture(scope="module")
def env(shakespeare):
    return {"TFX_DATA": str(shakespeare)}


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, env) -> Path:
    out = tmp_path_factory.mktemp("runs") / "char"
    proc = run_tfx("train", RECIPE, *sets(*TINY, "train.steps=40", "train.eval_every=20"), "--out", str(out),
                   env=env, check=True)
    assert "step 40/40" in proc.stderr and proc.stdout == ""
    return out


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "split" not in r}


def test_data_list_shows_fetched(env):
    proc = run_tfx("data", "list", env=env, check=True)
    assert "shakespeare" in proc.stdout and "fetched" in proc.stdout
    proc = tfx_in_process("data", "get", "shakespear", env=env)
    assert proc.returncode == 2 and "did you mean 'shakespeare'" in proc.stderr


def test_tokenize_train_encode_decode(tmp_path, shakespeare):
    train = shakespeare / "shakespeare" / "valid.txt"
    tok = tmp_path / "tok"
    run_tfx("tokenize", "train", str(train), "--kind", "sentencepiece", "--vocab-size", "500", "--out", str(tok),
            check=True)
    lines = "ROMEO: But soft, what light\n\n  two  spaces and ünïcode\n"
    ids = run_tfx("tokenize", "encode", str(tok), input=lines, check=True).stdout
    assert len(ids.splitlines()) == 3 and ids.splitlines()[1] == ""
    assert all(x.isdigit() for x in ids.split())
    back = run_tfx("tokenize", "decode", str(tok), input=ids, check=True).stdout
    assert back == lines
    bad = run_tfx("tokenize", "decode", str(tok), input="1 2 x\n")
    assert bad.returncode == 2 and "line 1" in bad.stderr


def test_train_writes_a_complete_run(char_run):
    for name in ("recipe.toml", "tokenizer/tokenizer.json", "model.safetensors", "best.safetensors",
                 "state/LATEST", "metrics.jsonl"):
        assert (char_run / name).exists(), name
    assert sorted(losses(char_run)) == list(range(1, 41))
    valid = [json.loads(x) for x in (char_run / "metrics.jsonl").read_text().splitlines() if '"valid"' in x]
    assert [v["step"] for v in valid] == [20, 40]


def test_eval_json(char_run, env):
    proc = run_tfx("eval", str(char_run), "--split", "test", "--json", env=env, check=True)
    result = json.loads(proc.stdout)
    assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(result)
    assert result["tokens"] == 252_108  # every character of the test plays scored once
    assert abs(result["perplexity"] - 2.718281828 ** result["loss"]) < 1e-6 * result["perplexity"]
    strided = json.loads(run_tfx("eval", str(char_run), "--split", "test", "--json", "--stride", "16",
                                 env=env, check=True).stdout)
    assert strided["tokens"] == result["tokens"] and strided["loss"] != result["loss"]


def test_eval_file_and_missing_run(char_run, tmp_path, env):
    text = tmp_path / "t.txt"
    text.write_text("ROMEO:\nWhat light through yonder window breaks?\n")
    result = json.loads(run_tfx("eval", str(char_run), "--data", str(text), "--json", check=True).stdout)
    assert result["tokens"] == len(text.read_text())
    proc = tfx_in_process("eval", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "not a tfx run directory" in proc.stderr


def test_generate_stdin_one_line_per_line(char_run):
    prompts = b"ROMEO:\n\nJULIET: \xff\xfe broken utf-8\nlast line without newline"
    proc = run_tfx("generate", str(char_run), "-", "--max-new-tokens", "30", "--temperature", "0.8",
                   "--top-p", "0.9", "--seed", "1", input=prompts)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split("\n")) == 5 and proc.stdout.endswith("\n")  # 4 lines + final newline
    again = run_tfx("generate", str(char_run), "-", "--max-new-tokens", "30", "--temperature", "0.8",
                    "--top-p", "0.9", "--seed", "1", input=prompts)
    assert again.stdout == proc.stdout  # seeded


def test_generate_greedy_stream_stop_and_long_prompt(char_run):
    greedy = run_tfx("generate", str(char_run), "ROMEO:", "--temperature", "0", "--max-new-tokens", "40",
                     check=True).stdout
    streamed = run_tfx("generate", str(char_run), "ROMEO:", "--temperature", "0", "--max-new-tokens", "40",
                       "--stream", check=True).stdout
    assert streamed == greedy
    text = greedy[:-1]  # without print's newline
    assert len(text) >= 12
    stop = text[10:12]
    stopped = run_tfx("generate", str(char_run), "ROMEO:", "--temperature", "0", "--max-new-tokens", "40",
                      "--stop", stop, check=True).stdout
    assert stopped == text[: text.index(stop)] + "\n"
    long = run_tfx("generate", str(char_run), "x" * 100, "--max-new-tokens", "5", check=True)
    assert "more than the context (32)" in long.stderr and len(long.stdout) > 0


def test_attention_sinks_generate_and_read_past_the_context(char_run, env):
    args = ["--temperature", "0", "--max-new-tokens", "150", "--stream-window", "12", "--sinks", "4"]
    out = run_tfx("generate", str(char_run), "x" * 60, *args, check=True)  # prompt and text past the context 32
    assert "more than the context" not in out.stderr and len(out.stdout) > 20  # the prompt was kept whole
    again = run_tfx("generate", str(char_run), "x" * 60, *args, "--stream", check=True).stdout
    assert again == out.stdout
    ev = json.loads(run_tfx("eval", str(char_run), "--split", "valid", "--stream-window", "12", "--max-tokens", "300",
                            "--batch-size", "2", "--json", env=env, check=True).stdout)
    assert ev["tokens"] == 300 and ev["sinks"] == 4 and ev["window"] == 12 and ev["lane_tokens"] == 150
    plain = json.loads(run_tfx("eval", str(char_run), "--split", "valid", "--stream-window", "16", "--sinks", "0",
                               "--max-tokens", "300", "--batch-size", "2", "--json", env=env, check=True).stdout)
    assert plain["tokens"] == 300 and plain["loss"] != ev["loss"]
    for bad in (["--sinks", "2"], ["--stream-window", "0"], ["--stream-window", "8", "--stride", "4"]):
        proc = tfx_in_process("eval", str(char_run), "--split", "valid", *bad, env=env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (bad, proc.stderr)


def test_lm_infinite_reads_and_generates_past_the_context(char_run, env):
    args = ["--temperature", "0", "--max-new-tokens", "40", "--lm-infinite", "--global-tokens", "2"]
    out = run_tfx("generate", str(char_run), "x" * 60, *args, check=True)  # prompt and text past the context 32
    assert "more than the context" not in out.stderr and len(out.stdout) > 20  # the prompt was kept whole
    ev = [json.loads(tfx_in_process("eval", str(char_run), "--split", "valid", "--context", "128", "--max-tokens",
                                    "512", "--json", *more, env=env).stdout)
          for more in ([], ["--lm-infinite"], ["--lm-infinite", "--global-tokens", "0"])]
    assert all(e["tokens"] == 512 and e["context"] == 128 for e in ev)
    assert len({e["loss"] for e in ev}) == 3  # dense past 32, the Λ with 4 global tokens, a plain window
    for bad, needle in ((["--global-tokens", "2"], "add --lm-infinite"),
                        (["--lm-infinite", "--global-tokens", "-1"], "at least 0"),
                        (["--lm-infinite", "--stream-window", "8"], "choose one")):
        proc = tfx_in_process("eval", str(char_run), "--split", "valid", *bad, env=env)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, (bad, proc.stderr)


def test_train_refuses_to_overwrite_a_run(char_run, env):
    proc = tfx_in_process("train", RECIPE, *sets(*TINY), "--out", str(char_run), env=env)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_resume_extends_a_finished_run(char_run, tmp_path, env):
    import shutil

    run = tmp_path / "more"
    shutil.copytree(char_run, run)
    proc = run_tfx("train", "--resume", str(run), "--set", "train.steps=42", env=env, check=True)
    assert "resumed from step 40" in proc.stderr
    assert sorted(losses(run)) == list(range(1, 43))


def test_kill_and_resume_gives_the_same_losses(tmp_path, env):
    """2N steps straight == N steps, SIGKILL, resume to 2N: identical per-step losses."""
    args = sets(*TINY, "train.steps=40", "train.save_every=1", "train.eval_every=0", "model.dropout=0.1")
    straight = tmp_path / "straight"
    run_tfx("train", RECIPE, *args, "--out", str(straight), env=env, check=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tfx", "train", RECIPE, *args, "--out", str(killed)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, proc.kill)  # a hung child fails the test instead of hanging it
    watchdog.start()
    reported = []
    try:
        for line in proc.stderr:  # train.log_every=1: one progress line per step, "step N/40 | ..."
            if line.startswith("step "):
                reported.append(int(line.split()[1].split("/")[0]))
                if reported[-1] == 15:
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        watchdog.cancel()
        proc.wait()
        proc.stderr.close()
    assert reported[:15] == list(range(1, 16)) and proc.returncode == -signal.SIGKILL
    done = losses(killed)
    assert 15 <= max(done) < 40, "the kill must land mid-run"
    resumed = run_tfx("train", "--resume", str(killed), env=env, check=True)
    assert "resumed from step" in resumed.stderr
    assert losses(killed) == losses(straight)


def test_sigterm_saves_and_exits_zero(tmp_path, env):
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "tfx", "train", RECIPE, *sets(*TINY, "train.steps=100000",
                             "train.save_every=0", "train.eval_every=0"), "--out", str(out)],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and losses(out)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    step = json.loads((out / "state" / (out / "state/LATEST").read_text().strip() / "trainer.json").read_text())["step"]
    assert 1 <= step < 100000 and "SIGTERM: saved step" in err.decode()


def test_corrupt_checkpoint_on_resume_is_a_clear_error(char_run, tmp_path, env):
    import shutil

    run = tmp_path / "corrupt"
    shutil.copytree(char_run, run)
    latest = run / "state" / (run / "state/LATEST").read_text().strip()
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = (run / "model.safetensors").read_bytes()
    proc = tfx_in_process("train", "--resume", str(run), "--set", "train.steps=50", env=env)
    assert proc.returncode == 1 and "truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "best.safetensors").exists() and (run / "model.safetensors").read_bytes() == before


def test_stop_strings_take_backslash_escapes():
    from tfx.cli.common import unescape

    assert unescape("a\\nb") == "a\nb" and unescape("a\\\\nb") == "a\\nb" and unescape("ü\\t\\x") == "ü\t\\x"


def test_bad_generate_options_exit_2(char_run, env):
    """The decoding options' bounds are GenerateConfig's (those of a recipe's [generate] table),
    checked once by tfx.config.generate_settings: the same message, naming the option."""
    from tfx.config import GenerateConfig, generate_settings
    from tfx.errors import UsageError

    for args in (["--temperature", "-1"], ["--top-p", "1.5"], ["--top-p", "0"], ["--top-k", "0"],
                 ["--max-new-tokens", "0"], ["--beam", "0"]):
        flag, value = args[0], float(args[1]) if args[0] in ("--temperature", "--top-p") else int(args[1])
        with pytest.raises(UsageError) as exc:
            generate_settings(GenerateConfig(), {flag[2:].replace("-", "_"): value})
        assert str(exc.value).startswith(f"{flag} {value!r}: ")
        proc = tfx_in_process("generate", str(char_run), "hi", *args)
        assert proc.returncode == 2 and f"tfx: error: {exc.value}" in proc.stderr, (args, proc.stderr)
    proc = tfx_in_process("eval", str(char_run), "--beam", "0", env=env)
    assert proc.returncode == 2 and "--beam 0: " in proc.stderr and "Traceback" not in proc.stderr
    for args, says in ((["--checkpoint", "newest"], "--checkpoint 'newest'"), (["--nbest", "0"], "--nbest 0"),
                       (["--nbest", "3", "--beam", "2"], "--nbest 3 needs a beam"), (["-", "--stream"], "--stream")):
        proc = tfx_in_process("generate", str(char_run), *(args if args[0] == "-" else ["hi", *args]), input="x\n")
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
