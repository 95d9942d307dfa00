"""CALM's early exits (tfx/nn/early_exit.py) against their definition: the depth-weighted loss written
out, the classifier's labels and its stopped gradient, decoding with exits equal to the stack run by
hand with exited states copied up (outputs and every layer's KV cache), threshold 1 = the full
model, and the recipes that cannot take exits."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY, run_tfx, sets
from tfx.config import import_kinds, validate
from tfx.errors import UsageError
from tfx.families import build_model
from tfx.kinds import problems
from tfx.nn.attention.base import AttnSpec
from tfx.nn.early_exit import exit_report, exit_weights, reset_exit_tallies
from tfx.registry import POSITION

import_kinds()
V = 17
T = 9


def recipe(family="lm", **exit_):
    model = {"d_model": 16, "n_layers": 3, "n_heads": 2, "n_kv_heads": 1, "context": 16,
             "position": {"kind": "rope"}, "exit": {"kind": "calm", **exit_}}
    data = {"train": "x.txt"}
    if family == "seq2seq":
        model.update(encoder_layers=2, decoder_layers=3)
    if family == "classifier":
        data["valid"] = "y.txt"
    return validate({"family": family, "data": data, "model": model})


def lm(**exit_):
    torch.manual_seed(0)
    return roughen(build_model(recipe(**exit_), vocab_size=V).double())


def roughen(model):
    """Exits whose norms differ from one another and from the final one; blocks that change the state
    enough for the exits to disagree."""
    with torch.no_grad():
        for norm in model.exits.norms:
            norm.weight.normal_(1.0, 0.3)
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear) and layer is not model.head:
                layer.weight.normal_(0, 0.3)
    return model.eval()


def first_exit_median(model, stack, tokens, **source):
    """The median of exit 1's confidence over the tokens (in a full pass): a threshold that about
    half of them reach at layer 1."""
    outputs = []
    with torch.no_grad():
        stack(tokens, outputs=outputs, **source)
        x0 = stack.enter(tokens, None, **source)[0]  # the first layer's input
        return float(model.exits.confidence(0, model.exits.norms[0](outputs[0]), outputs[0], x0, model.head).median())


TOKENS = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


def test_loss_weights_each_layers_exit_by_its_depth():
    assert exit_weights(3) == [1 / 6, 2 / 6, 3 / 6]
    model = lm().train()
    with torch.no_grad():
        model.stack.drop.p = 0.0
    target = TOKENS.roll(-1, 1)
    loss, parts, _ = model.loss({"input": TOKENS, "target": target})
    # by hand: the stack's blocks one by one, exit i = head(norm_i(h_i)), the last through the final norm
    pos = torch.arange(T)
    spec = AttnSpec(q_pos=pos, k_pos=pos, causal=True)
    x, expected = model.stack.embed(TOKENS), 0.0
    for i, block in enumerate(model.stack.blocks):
        x = block(x, pos=model.stack.pos, spec=spec, q_pos=pos)
        norm = model.exits.norms[i] if i < 2 else model.stack.norm
        expected = expected + (i + 1) / 6 * F.cross_entropy(model.head(norm(x)).flatten(0, 1), target.flatten(),
                                                            reduction="sum")
    torch.testing.assert_close(loss, expected)
    assert parts == {}
    loss.backward()
    assert all(norm.weight.grad.abs().sum() > 0 for norm in model.exits.norms)
    model.eval()  # evaluation scores the model: the last exit alone
    plain, _, _ = model.loss({"input": TOKENS, "target": target})
    logits, _ = model(TOKENS)
    torch.testing.assert_close(plain, F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))


def test_the_classifier_learns_whether_an_exit_agrees_with_the_last_and_leaves_the_model_alone():
    model = lm(measure="classifier").train()
    model.stack.drop.p = 0.0
    target = TOKENS.roll(-1, 1)
    _, parts, _ = model.loss({"input": TOKENS, "target": target})
    outputs = []
    with torch.no_grad():
        h, _ = model.stack(TOKENS, outputs=outputs)
        last = model.head(h).argmax(-1)
        logits = torch.cat([model.exits.classifier(model.exits.norms[i](outputs[i])).squeeze(-1).flatten()
                            for i in range(2)])
        labels = torch.cat([(model.head(model.exits.norms[i](outputs[i])).argmax(-1) == last).double().flatten()
                            for i in range(2)])
    assert 0 < labels.sum() < labels.numel()  # both kinds of label occur
    torch.testing.assert_close(parts["aux_loss"], F.binary_cross_entropy_with_logits(logits, labels))
    parts["aux_loss"].backward()
    assert model.exits.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.stack.parameters())  # detached: the model is not trained by it


def by_hand(model, tokens, exit_layers):
    """The stack run by hand, each position leaving at its exit layer (L: none): from there on its state
    is copied up, every later layer reads it as its input and output. Returns (logits, the keys and values
    every layer computes from its input)."""
    stack, L = model.stack, len(model.stack.blocks)
    pos = torch.arange(tokens.shape[1])
    spec = AttnSpec(q_pos=pos, k_pos=pos, causal=True)
    x, kvs, leaving = stack.embed(tokens), [], None
    for j, block in enumerate(stack.blocks):
        attn = block.attn
        H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.d_head
        _, k, v = attn.qkv(block.norm1(x)).split((H * D, Hkv * D, Hkv * D), dim=-1)
        k, v = (t.view(*tokens.shape, Hkv, D).transpose(1, 2) for t in (k, v))
        kvs.append((stack.pos.rotate(k, k, pos, pos)[1], v))
        x = torch.where((exit_layers <= j)[..., None], x, block(x, pos=stack.pos, spec=spec, q_pos=pos))
        if j == L - 1:
            break
        out = model.exits.norms[j](x)
        leaving = torch.where((exit_layers == j + 1)[..., None], out, leaving if leaving is not None else out)
    h = torch.where((exit_layers < L)[..., None], leaving, stack.norm(x))
    return model.head(h), kvs


def decode(model, tokens):
    """Token-by-token decoding with exits through the KV cache: (logits, exit layers, state)."""
    state = model.new_state(tokens.shape[0], 16)
    logits, layers = [], []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            lg, lay = model.exits.run(model.stack, model.head, tokens[:, t:t + 1], state)
            logits.append(lg)
            layers.append(lay)
    return torch.cat(logits, 1), torch.cat(layers, 1), state


@pytest.mark.parametrize("measure", ["softmax", "saturation", "classifier"])
def test_decoding_with_exits_equals_the_stack_with_exited_states_copied_up(measure):
    model = lm(measure=measure)
    if measure == "classifier":
        with torch.no_grad():
            model.exits.classifier.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(3))
    reference, _, _ = decode(model, TOKENS)  # threshold 1: every token through every layer
    model.exits.threshold = first_exit_median(model, model.stack, TOKENS)
    logits, layers, state = decode(model, TOKENS)
    assert 1 in layers and layers.gt(1).any()  # tokens that left at the first exit, tokens that went on
    with torch.no_grad():
        expected, kvs = by_hand(model, TOKENS, layers)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    for cache, (k, v) in zip(state.layers, kvs):  # every layer holds every token's keys and values
        assert cache.length == T
        torch.testing.assert_close(cache.k[:, :, :T], k, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache.v[:, :, :T], v, rtol=1e-10, atol=1e-10)
    first = int(layers.ne(3).any(0).nonzero()[0])  # tokens before any exit: the full model's
    torch.testing.assert_close(logits[:, :first], reference[:, :first], rtol=1e-10, atol=1e-10)
    # the forced parallel pass is the same computation
    with torch.no_grad():
        forced, _ = model.exits.run(model.stack, model.head, TOKENS, model.new_state(2, 16), exit_layers=layers)
    torch.testing.assert_close(forced, logits, rtol=1e-10, atol=1e-10)
    for row in range(2):  # batch 1 takes the unmasked path (run_one): the same exits and outputs
        one, one_layers, one_state = decode(model, TOKENS[row:row + 1])
        assert torch.equal(one_layers, layers[row:row + 1])
        torch.testing.assert_close(one, logits[row:row + 1], rtol=1e-10, atol=1e-10)
        for cache, full_cache in zip(one_state.layers, state.layers):
            torch.testing.assert_close(cache.k[:, :, :T], full_cache.k[row:row + 1, :, :T], rtol=1e-10, atol=1e-10)


def test_threshold_one_is_the_full_model_exactly():
    model = lm()
    assert model.exits.threshold == 1.0
    full, _ = model(TOKENS)
    state = model.new_state(2, 16)
    steps = []
    with torch.no_grad():
        for t in range(T):
            lg, state = model(TOKENS[:, t:t + 1], state)
            steps.append(lg)
        forced, layers = model.exits.run(model.stack, model.head, TOKENS, model.new_state(2, 16),
                                          exit_layers=torch.full_like(TOKENS, 3))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(forced, full, rtol=0, atol=0)
    model.exits.threshold = 0.999999  # below 1: the forward decodes with exits, and tallies them
    reset_exit_tallies(model)
    state = model.new_state(2, 16)
    with torch.no_grad():
        for t in range(T):
            _, state = model(TOKENS[:, t:t + 1], state)
    report = exit_report(model)
    assert report["positions"] == 2 * T and report["mean_layers"] == 3.0  # none that confident at init


def test_seq2seq_decoder_exits_copy_states_into_its_caches():
    torch.manual_seed(0)
    model = roughen(build_model(recipe("seq2seq", measure="saturation"), vocab_size=V).double())
    src = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.no_grad():
        source = model.encode(src, mask)
        full, _ = model.decoder(TOKENS, source=source, source_mask=mask)
        full = model.head(full)
        model.exits.threshold = first_exit_median(model, model.decoder, TOKENS, source=source, source_mask=mask)
        state = model.new_state(source, mask, 16)
        steps, layers = [], []
        for t in range(T):
            lg, lay = model.exits.run(model.decoder, model.head, TOKENS[:, t:t + 1], state)
            steps.append(lg)
            layers.append(lay)
        layers = torch.cat(layers, 1)
        forced, _ = model.exits.run(model.decoder, model.head, TOKENS, model.new_state(source, mask, 16),
                                    exit_layers=layers)
    assert 1 in layers and layers.gt(1).any()
    torch.testing.assert_close(torch.cat(steps, 1), forced, rtol=1e-10, atol=1e-10)
    first = int(layers.ne(3).any(0).nonzero()[0])  # the tokens before the first exit: the full model's
    torch.testing.assert_close(forced[:, :first], full[:, :first], rtol=1e-10, atol=1e-10)
    assert first < T


@pytest.mark.parametrize("change, reason", [
    ({"family": "classifier"}, "does not generate text"),
    ({"n_layers": 1}, "at least 2 decoder layers"),
    ({"attention": {"kind": "lsh", "chunk": 4}}, "keeps none"),
    ({"memory": {"kind": "xl", "mem_len": 8}}, "segment memory"),
    ({"depth": {"kind": "universal"}}, "universal depth"),
    ({"reversible": True}, "two streams"),
    ({"ffn": "dwconv"}, "dwconv"),
])
def test_recipes_that_cannot_take_exits_are_refused_with_the_reason(change, reason):
    change = dict(change)
    data = recipe().model_dump()
    if "family" in change:
        data["family"] = change.pop("family")
        data["data"]["valid"] = "y.txt"
    data["model"].update(change)
    with pytest.raises(UsageError, match=reason) as refused:
        validate(data)
    assert "model.exit" in str(refused.value)
    assert not problems(recipe()) and not problems(recipe("seq2seq"))


def test_train_calibrate_then_generate_and_bench_with_exits(tmp_path, small_text):
    """The CLI end to end: a char LM trained with exits (classifier), `tfx calibrate-exit` choosing a
    threshold that keeps agreement at 1 - delta on the split it reads, generation with it, and
    `tfx bench generate` timing the exits against the full model."""
    run = tmp_path / "calm"
    data = [f"data.train={small_text}", f"data.valid={small_text}", f"data.test={small_text}", 'data.corpus=""']
    run_tfx("train", "recipes/lm/shakespeare-char.toml", "--out", str(run),
            *sets(*TINY, *data, "train.steps=30", 'model.exit.kind="calm"', 'model.exit.measure="classifier"'),
            check=True, cwd=REPO)
    proc = run_tfx("calibrate-exit", str(run), "--delta", "0.1", "--measure", "saturation", "--max-tokens", "1024",
                   "--json", check=True)
    result = json.loads(proc.stdout)
    assert result["measure"] == "saturation" and result["tokens"] == 1024 and result["layers"] == 2
    assert result["agreement"] >= 0.9 and 1.0 <= result["mean_layers"] <= 2.0
    assert all(t["threshold"] < 1 for t in result["tried"]) and result["tried"]
    passed = [t for t in result["tried"] if t["agreement"] >= 0.9]
    if passed:  # the lowest threshold that kept the agreement
        assert result["threshold"] == min(t["threshold"] for t in passed)
    failed = [t["threshold"] for t in result["tried"] if t["agreement"] < 0.9]
    assert len(failed) <= 2  # a descent stops at its first failure: the coarse one, then the fine one
    if result["threshold"] < 1:
        assert result["mean_layers"] < 2.0
    assert result["check"]["split"] == "test" and result["check"]["threshold"] == result["threshold"]
    assert json.loads((run / "exit.json").read_text())["threshold"] == result["threshold"]
    gen = run_tfx("generate", str(run), "ROMEO:", "--max-new-tokens", "20", "--temperature", "0", check=True)
    assert "early exit: saturation threshold" in gen.stderr and gen.stdout.strip()
    full = run_tfx("generate", str(run), "ROMEO:", "--max-new-tokens", "20", "--temperature", "0",
                   "--exit-threshold", "1", check=True)
    assert "early exit" not in full.stderr
    knn = run_tfx("generate", str(run), "ROMEO:", "--knn", "--exit-threshold", "0.5")
    assert knn.returncode == 2 and "exits early" in knn.stderr and "Traceback" not in knn.stderr
    bench = json.loads(run_tfx("bench", "generate", str(run), "--prompt-len", "8", "--new-tokens", "16",
                               "--repeats", "1", "--exit-threshold", "0", "--json", check=True).stdout)
    assert bench["mean_layers"] == 1.0 and bench["exit_threshold"] == 0.0 and bench["full_decode_tokens_per_s"] > 0
    bad = run_tfx("calibrate-exit", str(run), "--delta", "1.5")
    assert bad.returncode == 2 and "--delta" in bad.stderr and "Traceback" not in bad.stderr


def test_a_run_without_exits_refuses_an_exit_threshold():
    from tfx.calibrate import use_exit

    plain_recipe = validate({"data": {"train": "x.txt"}, "model": {"d_model": 16, "n_layers": 2, "n_heads": 2}})
    plain = build_model(plain_recipe, vocab_size=V)
    use_exit(plain, plain_recipe, "nowhere", None)  # nothing asked, nothing to do
    with pytest.raises(UsageError, match="no early exits"):
        use_exit(plain, plain_recipe, "nowhere", 0.9)
    with pytest.raises(UsageError, match="between 0 and 1"):
        use_exit(lm(), recipe(), "nowhere", 1.5)


SCHEMES = [p for p in POSITION.names() if not POSITION.get(p).images_only]


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("position", SCHEMES)
def test_exits_copy_states_up_under_every_position_scheme(position, norm_position):
    """A prefill, then one-token steps with exits, equal the parallel pass with the same exits: the
    keys and values written for skipped layers are the ones those layers' attention would compute."""
    data = recipe().model_dump()
    data["model"].update(position={"kind": position}, norm_position=norm_position)
    torch.manual_seed(0)
    model = roughen(build_model(validate(data), vocab_size=V).double())
    model.exits.measure = "saturation"
    model.exits.threshold = first_exit_median(model, model.stack, TOKENS)
    state = model.new_state(2, 16)
    with torch.no_grad():
        prefill, _ = model.exits.run(model.stack, model.head, TOKENS[:, :3], state,
                                     exit_layers=torch.full((2, 3), 3))
        steps, layers = [prefill], [torch.full((2, 3), 3)]
        for t in range(3, T):
            lg, lay = model.exits.run(model.stack, model.head, TOKENS[:, t:t + 1], state)
            steps.append(lg)
            layers.append(lay)
        layers = torch.cat(layers, 1)
        forced, _ = model.exits.run(model.stack, model.head, TOKENS, model.new_state(2, 16), exit_layers=layers)
    assert layers[:, 3:].eq(1).any() and layers[:, 3:].gt(1).any()
    torch.testing.assert_close(torch.cat(steps, 1), forced, rtol=1e-9, atol=1e-9)


def test_a_translation_models_decoder_is_calibrated_on_reference_translations(tmp_path):
    """seq2seq: calibration reads the references after their sources (padding excluded); translating
    then uses the saved threshold."""
    from tfx import run
    from tfx.calibrate import calibrate_exit

    pairs = [(f"ein haus {i} ist rot", f"a house {i} is red") for i in range(60)]
    for name in ("train", "valid", "test"):
        (tmp_path / f"{name}.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
family = "seq2seq"
[data]
train = "{tmp_path / 'train.tsv'}"
valid = "{tmp_path / 'valid.tsv'}"
test = "{tmp_path / 'test.tsv'}"
[tokenizer]
kind = "char"
[model]
d_model = 16
n_heads = 2
n_layers = 3
context = 32
[model.exit]
kind = "calm"
measure = "saturation"
[train]
steps = 20
batch_size = 8
eval_every = 0
device = "cpu"
""")
    out = tmp_path / "run"
    run.train(str(recipe), overrides=[], out=str(out), resume=None)
    result = calibrate_exit(str(out), delta=0.2, max_tokens=300, log=lambda _: None)
    target_tokens = 0  # characters + EOS, pair after pair until 300 are reached
    for _, b in pairs:
        if target_tokens >= 300:
            break
        target_tokens += len(b) + 1
    assert result["tokens"] == target_tokens and result["check"]["tokens"] == target_tokens
    assert result["agreement"] >= 0.8 and result["layers"] == 3 and result["tried"]
    lines = list(run.generate_lines(str(out), ["ein haus 3 ist rot"]))
    assert len(lines) == 1 and isinstance(lines[0][1], str)
