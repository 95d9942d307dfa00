"""Attention sinks: a streamed token sees exactly the first `sinks` tokens and the last `window`
ones, at positions 0 .. sinks + window - 1, as if that text were read from scratch."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.families import build_model

import_kinds()
V = 19


def model_for(position="rope", kind="dense", n_layers=2):
    recipe = validate({"data": {"train": "x.txt"}, "model": {
        "d_model": 16, "n_layers": n_layers, "n_heads": 2, "context": 8, "position": {"kind": position},
        "attention": {"kind": kind, **({"window": 64} if kind == "local" else {})}}})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=V).double().eval()


TOKENS = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(3))


def streamed(model, sinks, window, tokens=TOKENS, step=1):
    state = model.new_stream_state(tokens.shape[0], sinks=sinks, window=window)
    outs = []
    for s in range(0, tokens.shape[1], step):
        out, state = model(tokens[:, s:s + step], state)
        outs.append(out)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("kind, position", [("dense", "rope"), ("dense", "alibi"), ("dense", "none"),
                                            ("local", "rope"), ("dense", "xl"), ("dense", "t5")])
def test_each_token_sees_the_sinks_and_the_window_at_cache_positions(kind, position):
    # One layer: its keys and values depend on the token alone, so the streamed output must equal a
    # fresh read of the kept text. (Deeper layers keep the keys computed when a token arrived, which
    # saw tokens since evicted, as in the paper.)
    model = model_for(position, kind, n_layers=1)
    sinks, window = 3, 6
    got, state = streamed(model, sinks, window)
    assert state.length == sinks + window
    for t in range(TOKENS.shape[1]):
        kept = TOKENS[:, :t + 1] if t < sinks + window else torch.cat([TOKENS[:, :sinks], TOKENS[:, t - window + 1:t + 1]], 1)
        want, _ = model(kept)
        torch.testing.assert_close(got[:, t], want[:, -1], rtol=1e-10, atol=1e-10)


def test_chunks_equal_single_tokens():
    model = model_for()
    one, _ = streamed(model, 2, 7)
    whole, _ = streamed(model, 2, 7, step=30)  # split by the stack once it would overflow
    mixed, _ = streamed(model, 2, 7, step=4)
    torch.testing.assert_close(whole, one, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mixed, one, rtol=1e-10, atol=1e-10)


def test_no_sinks_and_a_long_window_is_plain_dense_attention():
    model = model_for()
    got, _ = streamed(model, 0, 64, step=5)
    want, _ = model(TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_sinks_matter_once_the_window_slides():
    model = model_for()
    with_sinks, _ = streamed(model, 4, 6)
    without, _ = streamed(model, 0, 10)
    torch.testing.assert_close(with_sinks[:, :10], without[:, :10])  # same until the cache is full
    assert not torch.allclose(with_sinks[:, 12:], without[:, 12:])


@pytest.mark.parametrize("position, kind, needle", [("learned", "dense", "relative position"),
                                                    ("sinusoidal", "dense", "relative position"),
                                                    ("rope", "linear", "cache")])
def test_streaming_refuses_absolute_positions_and_cacheless_kernels(position, kind, needle):
    with pytest.raises(ValueError, match=needle):
        model_for(position, kind).new_stream_state(1, sinks=2, window=4)
