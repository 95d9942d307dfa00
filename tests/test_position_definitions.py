"""The absolute and bias position schemes against their definitions, written out independently.

sinusoidal (Vaswani et al. 2017): PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same).
rope (Su et al. 2021, half-split pairing): feature i and i + D/2 form the complex number
    z_i = x_i + j x_{i+D/2}, rotated by pos * 10000^(-2i/D); so q·k depends only on the offset.
alibi (Press et al. 2022): head slopes 2^(-8h/n) for n a power of two; otherwise the slopes of
    the largest power of two below n, then every other slope of twice that power; bias = -slope * distance.
learned (GPT-2): a table lookup added to the token embeddings.

The schemes are built through the POSITION registry and used through their hooks only.
"""
from __future__ import annotations

import cmath
import math

import pytest
import torch

from tfx.config import import_kinds
from tfx.errors import RunError
from tfx.registry import POSITION

import_kinds()


def build(kind: str, *, d_model=8, d_head=8, n_heads=1, max_len=32, causal=True, **params):
    torch.manual_seed(0)
    return POSITION.build(POSITION.config_model(kind)(**params), d_model=d_model, d_head=d_head,
                          n_heads=n_heads, max_len=max_len, causal=causal, n_layers=1).double()


# --- sinusoidal -------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [8, 16])
def test_sinusoidal_is_the_papers_formula(d):
    pos = build("sinusoidal", d_model=d)
    positions = torch.tensor([0, 1, 2, 5, 17, 31, 100])
    x = torch.randn(1, len(positions), d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = torch.empty(len(positions), d, dtype=torch.float64)
    for r, p in enumerate(positions.tolist()):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            expected[r, 2 * i] = math.sin(angle)
            expected[r, 2 * i + 1] = math.cos(angle)
    # the token embeddings are scaled by sqrt(d_model) first, as in the paper (section 3.4)
    got = pos.embed(x, positions) - x * math.sqrt(d)
    # the table is computed in float32: angles up to 100 rad carry ~100 * 2^-24 ~ 6e-6 of rounding
    torch.testing.assert_close(got[0], expected, rtol=0, atol=2e-5)
    zero = pos.embed(torch.zeros(1, 1, d, dtype=torch.float64), torch.tensor([0]))
    assert zero[0, 0].tolist() == [0.0, 1.0] * (d // 2)  # position 0: sin 0 = 0, cos 0 = 1 exactly
    q = k = torch.randn(1, 1, 3, d, dtype=torch.float64)
    assert pos.rotate(q, k, positions[:3], positions[:3]) == (q, k) and pos.bias(positions, positions) is None


# --- rope -------------------------------------------------------------------------------------

def rope_by_complex_numbers(x: torch.Tensor, positions: list[int], base: float = 10000.0) -> torch.Tensor:
    """x: (T, D); pair i with i + D/2 as a complex number and multiply by e^{j pos theta_i}."""
    T, D = x.shape
    half = D // 2
    out = torch.empty_like(x)
    for t, p in enumerate(positions):
        for i in range(half):
            theta = base ** (-2 * i / D)
            z = complex(x[t, i].item(), x[t, i + half].item()) * cmath.exp(1j * p * theta)
            out[t, i], out[t, i + half] = z.real, z.imag
    return out


def test_rope_rotates_each_pair_by_its_position():
    D = 8
    pos = build("rope", d_head=D, max_len=64)
    positions = [0, 1, 3, 7, 20, 63]
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 1, len(positions), D, dtype=torch.float64, generator=g) for _ in range(2))
    p = torch.tensor(positions)
    rq, rk = pos.rotate(q, k, p, p)
    # cos/sin are stored in float32 (angles computed in float64): ~6e-8 relative rounding per entry
    torch.testing.assert_close(rq[0, 0], rope_by_complex_numbers(q[0, 0], positions), rtol=0, atol=1e-6)
    torch.testing.assert_close(rk[0, 0], rope_by_complex_numbers(k[0, 0], positions), rtol=0, atol=1e-6)
    torch.testing.assert_close(rq[0, 0, 0], q[0, 0, 0], rtol=0, atol=0)  # position 0: no rotation
    # a rotation keeps the norm of every pair
    half = D // 2
    norms = lambda x: x[..., :half] ** 2 + x[..., half:] ** 2  # noqa: E731
    torch.testing.assert_close(norms(rq), norms(q), rtol=1e-6, atol=0)
    assert torch.equal(pos.embed(q[0], p), q[0]) and pos.bias(p, p) is None


@pytest.mark.parametrize("shift", [1, 5, 40])
def test_rope_scores_depend_only_on_the_offset(shift):
    D = 8
    pos = build("rope", d_head=D, max_len=128)
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 2, 6, D, dtype=torch.float64, generator=g) for _ in range(2))
    qp, kp = torch.tensor([0, 2, 3, 9, 10, 30]), torch.tensor([1, 2, 5, 6, 20, 31])
    scores = lambda a, b: a @ b.transpose(-1, -2)  # noqa: E731
    base = scores(*pos.rotate(q, k, qp, kp))
    shifted = scores(*pos.rotate(q, k, qp + shift, kp + shift))
    torch.testing.assert_close(shifted, base, rtol=0, atol=1e-5)
    # and not on the positions alone: moving only the queries changes the scores
    moved = scores(*pos.rotate(q, k, qp + shift, kp))
    assert (moved - base).abs().max() > 1e-2
    # the score of a pair equals Re(sum_i q_i * conj(k_i)) after the rotation by the offset alone
    zq = torch.complex(q[..., :D // 2], q[..., D // 2:])
    zk = torch.complex(k[..., :D // 2], k[..., D // 2:])
    theta = 10000.0 ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    offset = (qp[:, None] - kp[None, :]).double()  # (Tq, Tk)
    by_offset = (zq[..., :, None, :] * zk.conj()[..., None, :, :] * torch.exp(1j * offset[..., None] * theta)).sum(-1)
    torch.testing.assert_close(base, by_offset.real, rtol=0, atol=1e-5)


# --- alibi ------------------------------------------------------------------------------------

SLOPES = {
    8: [2 ** -1, 2 ** -2, 2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6, 2 ** -7, 2 ** -8],
    4: [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8],
    # 6 heads: the 4-head slopes, then every other slope of 8 heads (2^-1, 2^-3, ...) for the rest
    6: [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3],
    # 12 heads: the 8-head slopes, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 from the 16-head series
    12: [2 ** -e for e in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5],
}


@pytest.mark.parametrize("heads", sorted(SLOPES))
@pytest.mark.parametrize("causal", [True, False])
def test_alibi_bias_is_minus_slope_times_distance(heads, causal):
    pos = build("alibi", d_model=heads * 2, d_head=2, n_heads=heads, causal=causal)
    qp, kp = torch.arange(3, 9), torch.arange(0, 9)  # queries after a cache of 3 tokens
    bias = pos.bias(qp, kp)
    assert bias.shape == (1, heads, 6, 9)
    for h in range(heads):
        for a, i in enumerate(qp.tolist()):
            for b, j in enumerate(kp.tolist()):
                if causal and j > i:
                    continue  # masked by causality: any value
                expected = -SLOPES[heads][h] * abs(i - j)
                assert bias[0, h, a, b].item() == pytest.approx(expected, rel=1e-6, abs=0), (h, i, j)
    if not causal:
        torch.testing.assert_close(bias[0, :, :, 3:], bias[0, :, :, 3:].transpose(-1, -2), rtol=0, atol=0)


# --- learned ----------------------------------------------------------------------------------

def test_learned_is_a_table_lookup_added_to_the_embeddings():
    pos = build("learned", d_model=6, max_len=10)
    table = pos.table.weight.detach().clone()  # (max_len, d_model)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    positions = torch.tensor([7, 0, 3, 9])
    expected = torch.stack([torch.stack([x[b, t] + table[p] for t, p in enumerate(positions.tolist())])
                            for b in range(2)])
    torch.testing.assert_close(pos.embed(x, positions), expected, rtol=0, atol=0)
    # the gradient of the table reaches exactly the rows used
    pos.embed(x, positions).sum().backward()
    used = pos.table.weight.grad.abs().sum(-1) > 0
    assert used.tolist() == [i in (0, 3, 7, 9) for i in range(10)]
    with pytest.raises(RunError, match="stop at the context"):
        pos.ensure(11)


# --- none, and the meta-test ------------------------------------------------------------------

def test_none_is_the_identity_everywhere():
    pos = build("none")
    x, q, k = (torch.randn(2, 1, 5, 8, dtype=torch.float64) for _ in range(3))
    positions = torch.arange(5)
    assert torch.equal(pos.embed(x[:, 0], positions), x[:, 0])
    assert all(torch.equal(a, b) for a, b in zip(pos.rotate(q, k, positions, positions), (q, k)))
    assert pos.bias(positions, positions) is None and pos.relative


# Every registered scheme and the test that checks it against its definition (module: test name).
DEFINITIONS = {
    "none": "test_position_definitions:test_none_is_the_identity_everywhere",
    "sinusoidal": "test_position_definitions:test_sinusoidal_is_the_papers_formula",
    "rope": "test_position_definitions:test_rope_rotates_each_pair_by_its_position",
    "alibi": "test_position_definitions:test_alibi_bias_is_minus_slope_times_distance",
    "learned": "test_position_definitions:test_learned_is_a_table_lookup_added_to_the_embeddings",
    "shaw": "test_positions:test_shaw_adds_clipped_relative_vectors_to_keys_and_values",
    "xl": "test_positions:test_xl_scores_are_content_plus_relative_position_terms",
    "da": "test_positions:test_da_rescales_relu_scores_by_a_learned_sigmoid_of_distance",
    "t5": "test_positions:test_t5_buckets_by_hand",
    "learned_2d": "test_positions_2d:test_learned_2d_adds_the_table_at_the_training_grid",
    "sinusoidal_2d": "test_positions_2d:test_sinusoidal_2d_is_a_row_table_then_a_column_table",
    "rope_2d": "test_positions_2d:test_rope_2d_scores_depend_only_on_row_and_column_offsets",
}


def test_every_position_scheme_has_a_definition_test():
    """A new scheme registered without a test against its definition fails here."""
    import importlib

    assert sorted(DEFINITIONS) == POSITION.names()
    for kind, where in DEFINITIONS.items():
        module, name = where.split(":")
        assert callable(getattr(importlib.import_module(module), name, None)), f"{kind}: no {where}"
