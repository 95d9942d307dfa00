"""Encoder-only models in process: BERT masking and the masked-LM loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tfx.config import validate
from tfx.families import build_model
from tfx.models.encoder import mask_tokens
from tfx.models.lm import IGNORE

SPECIAL = (0, 1, 2, 3)


def test_masking_is_80_10_10_on_non_special_positions():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 50, (400, 100), generator=g)
    tokens[:, 0], tokens[:, -5:] = 1, 0  # a BOS and padding, never to be predicted
    inputs, target = mask_tokens(tokens, prob=0.15, mask_id=50, vocab=51, special=SPECIAL, generator=g)
    chosen = target != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, -5:].any()
    assert torch.equal(target[chosen], tokens[chosen]) and torch.equal(inputs[~chosen], tokens[~chosen])
    n = int(chosen.sum())
    assert abs(n / (400 * 94) - 0.15) < 0.01
    masked = inputs[chosen] == 50
    kept = inputs[chosen] == tokens[chosen]
    swapped = ~masked & ~kept
    assert abs(float(masked.float().mean()) - 0.8) < 0.02
    assert abs(float((kept | swapped).float().mean()) - 0.2) < 0.02  # random ids may hit the same id
    assert ((inputs[chosen][swapped] >= 4) & (inputs[chosen][swapped] < 50)).all()  # never a special or [MASK]


def test_masked_lm_loss_equals_the_full_head_over_masked_positions():
    r = validate({"family": "mlm", "data": {"train": "x"},
                  "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "context": 16}})
    torch.manual_seed(0)
    model = build_model(r, vocab_size=40).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 40, (3, 16), generator=g)
    inputs, target = mask_tokens(tokens, prob=0.3, mask_id=40, vocab=41, special=SPECIAL, generator=g)
    pad = torch.ones_like(tokens, dtype=torch.bool)
    pad[2, 10:] = False
    target[2, 10:] = IGNORE
    loss, _, _ = model.loss({"input": inputs, "mask": pad, "target": target})
    full = F.cross_entropy(model(inputs, pad).flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
