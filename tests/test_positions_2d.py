"""The 2-D position schemes for images against their definitions, written out independently.

sinusoidal_2d (MAE, He et al. 2022): patch (r, c) gets concat(PE_{d/2}(r), PE_{d/2}(c)) with the
    1-D table PE_n(p)[2i] = sin(p / base^(2i/n)), PE_n(p)[2i+1] = cos(same); prefix tokens get 0.
rope_2d (Heo et al. 2024, axial): in the first half of a head, z_k = x_k + j x_{k+D/4} turns by
    row * base^(-k/(D/4)); in the second half the same with the column; prefix tokens do not turn.
learned_2d (Dosovitskiy et al. 2021): table[r, c] (+ a vector per prefix token) added; another
    grid resizes the table by bicubic interpolation (DeiT / timm).
"""
from __future__ import annotations

import cmath
import math

import pytest
import torch
import torch.nn.functional as F

from tfx.config import ModelConfig, import_kinds
from tfx.errors import RunError
from tfx.nn.stack import TransformerStack
from tfx.registry import POSITION

import_kinds()

KINDS = ["learned_2d", "sinusoidal_2d", "rope_2d"]


def build(kind: str, grid=(3, 3, 1), *, d_model=8, d_head=8, n_heads=1, **params):
    torch.manual_seed(0)
    pos = POSITION.build(POSITION.config_model(kind)(**params), d_model=d_model, d_head=d_head, n_heads=n_heads,
                         max_len=32, causal=False, n_layers=1, **({"grid": grid} if grid else {})).double()
    pos.use_grid(grid)
    return pos


def randn(*shape, seed=1):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def cells(grid):
    """(position, row, col) of every patch of a (rows, cols, prefix) grid, in raster order."""
    rows, cols, prefix = grid
    return [(prefix + r * cols + c, r, c) for r in range(rows) for c in range(cols)]


# --- sinusoidal_2d ----------------------------------------------------------------------------

def pe_1d(p: int, n: int, base: float) -> list[float]:
    return [f(p / base ** (2 * (i // 2) / n)) for i, f in zip(range(n), [math.sin, math.cos] * n)]


@pytest.mark.parametrize("grid, base", [((3, 4, 1), 10000.0), ((2, 5, 0), 100.0)])
def test_sinusoidal_2d_is_a_row_table_then_a_column_table(grid, base):
    d = 16
    pos = build("sinusoidal_2d", grid, d_model=d, base=base)
    T = grid[2] + grid[0] * grid[1]
    x = randn(2, T, d)
    expected = torch.zeros(T, d, dtype=torch.float64)  # prefix rows stay zero
    for p, r, c in cells(grid):
        expected[p] = torch.tensor(pe_1d(r, d // 2, base) + pe_1d(c, d // 2, base), dtype=torch.float64)
    # x is added unscaled (the 1-D sinusoidal multiplies it by sqrt(d_model))
    torch.testing.assert_close(pos.embed(x, torch.arange(T)), x + expected, rtol=0, atol=1e-6)
    assert pos.state_dict() == {} and not pos.relative


def test_sinusoidal_2d_needs_d_model_divisible_by_4():
    with pytest.raises(RunError, match="divisible by 4"):
        build("sinusoidal_2d", d_model=6, d_head=6)


# --- rope_2d ----------------------------------------------------------------------------------

def rotated_scores(pos, positions):
    """q·k after rotation between every pair of positions, the same q and k vectors at each."""
    D = pos.d_head
    T = len(positions)
    q, k = randn(1, 1, 1, D, seed=2).expand(1, 1, T, D), randn(1, 1, 1, D, seed=3).expand(1, 1, T, D)
    rq, rk = pos.rotate(q, k, positions, positions)
    return (rq @ rk.transpose(-1, -2))[0, 0]  # (T, T)


def test_rope_2d_scores_depend_only_on_row_and_column_offsets():
    grid = (4, 5, 1)
    pos = build("rope_2d", grid, d_head=8)
    scores = rotated_scores(pos, torch.arange(21))
    by_offset: dict[tuple[int, int], list[float]] = {}
    for p1, r1, c1 in cells(grid):
        for p2, r2, c2 in cells(grid):
            by_offset.setdefault((r1 - r2, c1 - c2), []).append(scores[p1, p2].item())
    for values in by_offset.values():
        assert max(values) - min(values) < 1e-9
    # and the offset matters, along each axis
    assert abs(by_offset[(1, 0)][0] - by_offset[(0, 0)][0]) > 1e-3
    assert abs(by_offset[(0, 1)][0] - by_offset[(0, 0)][0]) > 1e-3


def test_rope_2d_with_one_column_is_a_1d_rope_on_the_first_half():
    D, base = 8, 500.0
    pos = build("rope_2d", (6, 1, 0), d_head=D, base=base)
    x = randn(1, 2, 6, D)
    out, _ = pos.rotate(x, x, torch.arange(6), torch.arange(6))
    expected = x.clone()
    q = D // 4
    for t in range(6):  # row = t; the column is 0, so the second half stays as it is
        for k in range(q):
            z = complex(x[0, 0, t, k], x[0, 0, t, k + q]) * cmath.exp(1j * t * base ** (-k / q))
            expected[0, 0, t, k], expected[0, 0, t, k + q] = z.real, z.imag
            z = complex(x[0, 1, t, k], x[0, 1, t, k + q]) * cmath.exp(1j * t * base ** (-k / q))
            expected[0, 1, t, k], expected[0, 1, t, k + q] = z.real, z.imag
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_rope_2d_leaves_prefix_tokens_and_norms_unchanged():
    pos = build("rope_2d", (3, 3, 1), d_head=8)
    q, k = randn(2, 2, 10, 8), randn(2, 1, 10, 8, seed=2)
    rq, rk = pos.rotate(q, k, torch.arange(10), torch.arange(10))
    assert torch.equal(rq[:, :, 0], q[:, :, 0]) and torch.equal(rk[:, :, 0], k[:, :, 0])
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rk.norm(dim=-1), k.norm(dim=-1))
    assert not torch.allclose(rq[:, :, 1:], q[:, :, 1:])
    assert not pos.relative and pos.extrapolates


def test_rope_2d_needs_d_head_divisible_by_4():
    with pytest.raises(RunError, match="divisible by 4"):
        build("rope_2d", d_model=12, d_head=6, n_heads=2)


# --- learned_2d -------------------------------------------------------------------------------

def test_learned_2d_adds_the_table_at_the_training_grid():
    pos = build("learned_2d", (2, 3, 1))
    assert pos.table.shape == (2, 3, 8) and pos.prefix.shape == (1, 8)
    assert 0.01 < pos.table.std().item() < 0.04  # N(0, 0.02)
    x = randn(2, 7, 8)
    expected = x.clone()
    expected[:, 0] += pos.prefix[0]
    for p, r, c in cells((2, 3, 1)):
        expected[:, p] += pos.table[r, c]
    torch.testing.assert_close(pos.embed(x, torch.arange(7)), expected, rtol=0, atol=0)
    # bicubic interpolation at the same size is the identity, so the two agree there
    same = F.interpolate(pos.table.permute(2, 0, 1)[None], size=(2, 3), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same[0].permute(1, 2, 0), pos.table, rtol=0, atol=1e-12)


def test_learned_2d_interpolates_the_table_on_another_grid():
    pos = build("learned_2d", (2, 3, 1))
    pos.use_grid((4, 5, 1))
    x = randn(1, 21, 8)
    out = pos.embed(x, torch.arange(21))
    resized = F.interpolate(pos.table.permute(2, 0, 1)[None], size=(4, 5), mode="bicubic", align_corners=False)
    expected = torch.cat([pos.prefix, resized[0].permute(1, 2, 0).reshape(20, 8)])
    torch.testing.assert_close(out, x + expected, rtol=0, atol=1e-12)
    # gradients reach every entry of the table and the prefix vector
    out.sum().backward()
    assert (pos.table.grad != 0).all() and (pos.prefix.grad != 0).all()
    # the saved parameters keep the training grid's shape, so the state_dict loads in a fresh one
    assert pos.state_dict()["table"].shape == (2, 3, 8)
    build("learned_2d", (2, 3, 1)).load_state_dict(pos.state_dict())


def test_learned_2d_needs_a_training_grid_and_has_no_prefix_vector_without_a_prefix():
    with pytest.raises(RunError, match=r"learned_2d is a position scheme for images \(family vit\)"):
        build("learned_2d", None)
    pos = build("learned_2d", (2, 2, 0))
    assert pos.prefix is None and set(pos.state_dict()) == {"table"}


# --- through a TransformerStack ---------------------------------------------------------------

def stack_for(kind: str, grid=(3, 3, 1), **model):
    cfg = ModelConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 4, "context": 17, "position": {"kind": kind},
                         **model})
    torch.manual_seed(0)
    return TransformerStack(cfg, vocab_size=0, causal=False, grid=grid).double().eval()


@pytest.mark.parametrize("kind", KINDS)
def test_a_stack_runs_on_the_training_grid_and_on_a_larger_one(kind):
    stack = stack_for(kind)
    h, _ = stack(None, embeds=randn(2, 10, 32), grid=(3, 3, 1))
    assert h.shape == (2, 10, 32) and torch.isfinite(h).all()
    h, _ = stack(None, embeds=randn(2, 17, 32), grid=(4, 4, 1))
    assert h.shape == (2, 17, 32) and torch.isfinite(h).all()
    with pytest.raises(RunError, match="past the 3x3 grid"):
        stack(None, embeds=randn(1, 11, 32), grid=(3, 3, 1))


def test_a_sinusoidal_2d_stack_is_a_none_stack_fed_embeddings_plus_the_table():
    grid = (4, 4, 1)
    two_d, none = stack_for("sinusoidal_2d"), stack_for("none")
    none.load_state_dict(two_d.state_dict())
    x = randn(2, 17, 32)
    table = torch.zeros(17, 32, dtype=torch.float64)
    for p, r, c in cells(grid):
        table[p] = torch.tensor(pe_1d(r, 16, 10000.0) + pe_1d(c, 16, 10000.0), dtype=torch.float64)
    torch.testing.assert_close(two_d(None, embeds=x, grid=grid)[0], none(None, embeds=x + table, grid=grid)[0],
                               rtol=0, atol=1e-6)


def test_a_rope_2d_stack_is_translation_invariant():
    """A 2x2 image at the top left of a 4x4 grid, the rest masked out, gives the same outputs as the
    same image moved to the bottom right: only row and column offsets reach the scores."""
    stack = stack_for("rope_2d", grid=(4, 4, 0))
    image = randn(1, 4, 32)
    outs = []
    for r0, c0 in ((0, 0), (2, 2), (1, 2)):
        at = [(r0 + r) * 4 + c0 + c for r in range(2) for c in range(2)]
        x = randn(1, 16, 32, seed=9)
        x[:, at] = image
        mask = torch.zeros(1, 16, dtype=torch.bool)
        mask[:, at] = True  # True = attend
        outs.append(stack(None, embeds=x, grid=(4, 4, 0), key_padding_mask=mask)[0][:, at])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=1e-10)
    # an absolute scheme is not: the check can fail
    stack = stack_for("sinusoidal_2d", grid=(4, 4, 0))
    x = torch.zeros(1, 16, 32, dtype=torch.float64)
    x[:, [0, 1, 4, 5]] = x[:, [10, 11, 14, 15]] = image
    h = stack(None, embeds=x, grid=(4, 4, 0))[0]
    assert not torch.allclose(h[:, [0, 1, 4, 5]], h[:, [10, 11, 14, 15]])


@pytest.mark.parametrize("kind", KINDS)
def test_a_text_pass_raises(kind):
    if kind == "learned_2d":  # it cannot even be built without a grid
        with pytest.raises(RunError, match="family vit"):
            stack_for(kind, grid=None)
        return
    stack = stack_for(kind, grid=None)
    with pytest.raises(RunError, match="needs images"):
        stack(None, embeds=randn(1, 5, 32))
    pos, x, positions = build(kind, None), randn(1, 1, 3, 8), torch.arange(3)
    with pytest.raises(RunError, match="needs images"):  # the hooks themselves, outside a stack
        pos.embed(x[0], positions) if kind == "sinusoidal_2d" else pos.rotate(x, x, positions, positions)
