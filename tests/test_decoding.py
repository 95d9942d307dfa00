"""Sampling filters and cached generation against a cache-free reference."""
from __future__ import annotations

import torch

from tfx.config import validate
from tfx.decoding.generate import generate_ids
from tfx.decoding.sample import process_logits, sample
from tfx.models import build_model


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


def test_generation_past_the_context_slides_for_learned_positions():
    model = tiny_lm("learned", context=8)
    out = generate_ids(model, [1, 2, 3], max_new_tokens=30, temperature=0)
    assert len(out) == 30
