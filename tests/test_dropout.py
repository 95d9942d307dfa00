"""The fast CPU dropout: kept fraction, unbiased scale, gradients, eval identity, resumable RNG."""
from __future__ import annotations

import pytest
import torch

from tfx.nn.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_kept_fraction_and_scale(p):
    torch.manual_seed(0)
    mask, scale = keep_mask(torch.Size([1000, 1000]), p, torch.device("cpu"))
    kept = mask.float().mean().item()
    assert abs(kept - (1 - p)) < 3e-3  # 1e6 draws: the std of the fraction is below 5e-4
    assert scale * (1 - round(p * 65536) / 65536) == pytest.approx(1.0, abs=1e-12)
    # elements four apart come from different 64-bit words, elements in a word from different bits
    for lane in range(4):
        assert abs(mask.view(-1, 4)[:, lane].float().mean().item() - (1 - p)) < 6e-3
    x = torch.ones(1000, 1000)
    assert dropout(x, p).mean().item() == pytest.approx(1.0, abs=6e-3)


def test_values_and_gradient_follow_the_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.25)
    kept = y != 0
    assert 0.6 < kept.float().mean() < 0.9
    scale = 65536 / (65536 - 16384)
    assert torch.equal(y[kept], x[kept] * scale)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * scale)  # dropped elements get exactly zero gradient


def test_eval_mode_zero_p_and_module():
    x = torch.randn(5, 7)
    layer = Dropout(0.4)
    layer.eval()
    assert layer(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    torch.manual_seed(3)
    assert (dropout(x, 1 - 1e-7) == 0).all()  # rounds to 1 on the 2^-16 grid: torch's exact dropout instead
    kept = dropout(torch.ones(100), 1e-6)  # rounds to 0 on the grid: still dropout, scaled by 1 / (1 - p)
    assert torch.allclose(kept, torch.full((100,), 1 / (1 - 1e-6)), rtol=0, atol=2e-7) and (kept > 1).all()
    with pytest.raises(ValueError):
        Dropout(1.5)


def test_same_seed_same_mask():
    """Masks come from torch's global generator, so a restored RNG state repeats them (resume)."""
    x = torch.randn(3, 50)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = dropout(x, 0.5)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.5), a)
