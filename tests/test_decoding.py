"""Sampling filters and cached generation against a cache-free reference."""
from __future__ import annotations

import pytest
import torch

from tfx.config import validate
from tfx.decoding.generate import generate_ids
from tfx.decoding.sample import process_logits, sample
from tfx.families import build_model


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out[0]).tolist()  # noqa: E731
    assert kept(process_logits(logits, temperature=1.0, top_k=2)) == [True, True, False, False]
    assert kept(process_logits(logits, temperature=1.0, top_p=0.5)) == [True, False, False, False]
    assert kept(process_logits(logits, temperature=1.0, top_p=0.8)) == [True, True, False, False]
    assert kept(process_logits(logits, temperature=1.0, top_p=0.81)) == [True, True, True, False]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(process_logits(shuffled, temperature=1.0, top_p=0.8)) == [False, True, False, True]


def test_temperature_zero_is_argmax_and_seeded_sampling_repeats():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    a = sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def tiny_lm(position="rope", context=16):
    recipe = validate({"data": {"train": "x"}, "model": {"d_model": 32, "n_layers": 2, "n_heads": 2,
                                                         "context": context, "position": {"kind": position}}})
    torch.manual_seed(0)
    return build_model(recipe, vocab_size=11).eval()


def greedy_without_cache(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        window = ids[-model.context:] if len(ids) < model.context else ids[-(model.context // 2):]
        logits, _ = model(torch.tensor([window]))
        ids.append(int(logits[0, -1].argmax()))
    return ids


def test_cached_greedy_generation_equals_full_forwards():
    model = tiny_lm()
    out = generate_ids(model, [1, 4, 5], max_new_tokens=10, temperature=0)
    assert [1, 4, 5] + out == greedy_without_cache(model, [1, 4, 5], 10)


def re_prefill_without_cache(model, ids, n, seed):
    """The documented rule past the context, by full forwards only: the model reads the text from
    `start` (positions from zero) up to now; once that window holds `context` tokens and a new
    token arrives, the window restarts at the last context // 2 tokens. Tokens are sampled at
    temperature 1 from a seeded generator (greedy on a random tiny model repeats one token,
    which any window rule would reproduce)."""
    ids, start, windows, g = list(ids), 0, [], torch.Generator().manual_seed(seed)
    for _ in range(n):
        window = ids[start:]
        assert len(window) <= model.context
        windows.append(len(window))
        logits, _ = model(torch.tensor([window]))  # no state: one full forward
        ids.append(int(sample(logits[:, -1].float(), temperature=1.0, generator=g)))
        if len(ids) - 1 - start >= model.context:
            start = len(ids) - model.context // 2
    return ids, windows


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_generation_past_the_context_equals_full_forwards_over_the_re_prefilled_window(position):
    model = tiny_lm(position, context=6).double()
    prompt = [1, 2, 3]
    out = generate_ids(model, prompt, max_new_tokens=20, temperature=1.0, generator=torch.Generator().manual_seed(7))
    expected, windows = re_prefill_without_cache(model, prompt, 20, seed=7)
    assert prompt + out == expected
    assert max(windows) == 6 and windows.count(3) >= 4  # the window restarted several times
    assert len(set(out)) >= 4  # a varied text, so that a wrong window would show
    if position == "rope":  # the re-prefill matters: an endless context gives another text
        endless = tiny_lm(position, context=64).double()
        assert prompt + out != re_prefill_without_cache(endless, prompt, 20, seed=7)[0]
