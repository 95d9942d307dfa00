"""Swin's (shifted) window attention against the float64 oracle, with the patterns written out in
this file from patch coordinates (the paper's windows and cyclic-shift mask), not taken from the
kernel's own window_pattern(); the relative bias written out pair by pair; information crossing
window borders only through the shifted layers (by gradient); the refusals."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds, validate
from tfx.errors import RunError, UsageError
from tfx.nn.attention.base import AttnSpec, reference_attention
from tfx.nn.attention.window import window_pattern
from tfx.registry import ATTENTION

import_kinds()


def make(layer: int = 0, H: int = 2, D: int = 4, dropout: float = 0.0, **params):
    cfg = ATTENTION.config_model("window")(**params)
    return ATTENTION.build(cfg, n_heads=H, d_head=D, dropout=dropout, layer=layer).double().eval()


def spec_for(rows: int, cols: int, prefix: int = 0, grid: bool = True) -> AttnSpec:
    pos = torch.arange(prefix + rows * cols)
    return AttnSpec(q_pos=pos, k_pos=pos, causal=False, grid=(rows, cols, prefix) if grid else None)


def qkv(N: int, B: int = 2, H: int = 2, Hkv: int = 2, D: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    return q, k, v


def block_diagonal(rows: int, cols: int, w: int) -> torch.Tensor:
    """Unshifted windows: patches (r, c) and (r', c') attend iff r//w == r'//w and c//w == c'//w."""
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    return torch.tensor([[r // w == r2 // w and c // w == c2 // w for r2, c2 in cells] for r, c in cells])


def swin_shifted(rows: int, cols: int, wr: int, wc: int, sr: int, sc: int) -> torch.Tensor:
    """The paper's masked shifted-window attention, written out: pad the grid to multiples of the
    window, roll it by (-sr, -sc), label the regions h_slices x w_slices = (0, -w), (-w, -s),
    (-s, end) of the rolled grid (a zero shift: one region), and let two patches attend iff they
    land in one window of the rolled grid with one label."""
    pr, pc = -(-rows // wr) * wr, -(-cols // wc) * wc

    def slices(size, w, s):
        return [range(size)] if s == 0 else [range(0, size - w), range(size - w, size - s), range(size - s, size)]

    label, count = {}, 0
    for ys in slices(pr, wr, sr):
        for xs in slices(pc, wc, sc):
            for y in ys:
                for x in xs:
                    label[y, x] = count
            count += 1
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    rolled = [((r - sr) % pr, (c - sc) % pc) for r, c in cells]
    return torch.tensor([[y // wr == y2 // wr and x // wc == x2 // wc and label[y, x] == label[y2, x2]
                          for y2, x2 in rolled] for y, x in rolled])


def check(kernel, rows, cols, pattern, Hkv=2, bias=None):
    q, k, v = qkv(rows * cols, Hkv=Hkv)
    spec = spec_for(rows, cols)
    expected = reference_attention(q, k, v, AttnSpec(q_pos=spec.q_pos, k_pos=spec.k_pos, causal=False, bias=bias),
                                   pattern=pattern)
    torch.testing.assert_close(kernel(q, k, v, spec), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("rows, cols, window", [(4, 4, 4), (3, 5, 5), (4, 4, 7)])
def test_one_window_over_the_whole_grid_is_dense(rows, cols, window, layer):
    check(make(layer, window=window), rows, cols, None)


@pytest.mark.parametrize("rows, cols, window", [(4, 4, 2), (5, 6, 2), (5, 6, 4), (6, 6, 3)])
def test_unshifted_layer_is_block_diagonal(rows, cols, window):
    check(make(0, window=window), rows, cols, block_diagonal(rows, cols, window))


@pytest.mark.parametrize("rows, cols, window", [(4, 4, 2), (6, 6, 3), (5, 6, 2), (5, 6, 4), (8, 8, 4)])
def test_shifted_layer_is_the_papers_masked_shifted_windows(rows, cols, window):
    s = window // 2
    pattern = swin_shifted(rows, cols, window, window, s, s)
    assert not torch.equal(pattern, block_diagonal(rows, cols, window))
    check(make(1, window=window), rows, cols, pattern)
    check(make(3, window=window), rows, cols, pattern)


def test_a_window_larger_than_one_side_is_clipped_and_that_side_not_shifted():
    # 2 x 7 grid, window 3: rows are one window of 2 (no shift), columns windows of 3 padded to 9, shift 1
    check(make(0, window=3), 2, 7, swin_shifted(2, 7, 2, 3, 0, 0))
    check(make(1, window=3), 2, 7, swin_shifted(2, 7, 2, 3, 0, 1))


def test_window_pattern_helper_is_the_written_out_mask():
    for rows, cols, w in [(4, 4, 2), (6, 6, 3), (5, 6, 4), (2, 7, 3), (7, 5, 3)]:
        wr, wc = min(w, rows), min(w, cols)
        sr, sc = (w // 2 if rows > w else 0), (w // 2 if cols > w else 0)
        assert torch.equal(window_pattern(rows, cols, w, False), swin_shifted(rows, cols, wr, wc, 0, 0))
        assert torch.equal(window_pattern(rows, cols, w, True), swin_shifted(rows, cols, wr, wc, sr, sc))
    grid = (6, 6, 0)
    pos = torch.arange(36)
    assert torch.equal(make(1, window=3).allowed(pos, pos, grid), window_pattern(6, 6, 3, True))
    with pytest.raises(RunError):
        make(1, window=3).allowed(pos, pos)


def test_shift_false_leaves_odd_layers_unshifted():
    check(make(1, window=2, shift=False), 4, 4, block_diagonal(4, 4, 2))


def test_information_crosses_windows_only_through_the_shifted_layer():
    """4 x 4 grid, window 2: output patch (1, 1) and input patch (0, 3) lie in different windows
    of layer 0; layer 1's shifted window {(1,1), (1,2), (2,1), (2,2)} joins (1, 1) to (1, 2),
    which saw (0, 3) in layer 0."""
    first, second = make(0, H=1, window=2), make(1, H=1, window=2)
    spec = spec_for(4, 4)
    x = torch.randn(1, 1, 16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out0 = first(x, x, x, spec)
    out1 = second(out0, out0, out0, spec)
    target, source = 1 * 4 + 1, 0 * 4 + 3
    (g0,) = torch.autograd.grad(out0[0, 0, target].sum(), x, retain_graph=True)
    (g1,) = torch.autograd.grad(out1[0, 0, target].sum(), x)
    assert g0[0, 0, source].abs().max() == 0
    assert g0[0, 0, target].abs().max() > 0
    assert g1[0, 0, source].abs().max() > 0


def relative_bias(rows: int, cols: int, table: torch.Tensor, w: int) -> torch.Tensor:
    """(1, H, N, N) bias of every pair from its (dy, dx) offset in the grid (pairs farther apart
    than a window are masked anyway: 0)."""
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    H, N = table.shape[0], rows * cols
    bias = torch.zeros(1, H, N, N, dtype=torch.float64)
    for i, (r, c) in enumerate(cells):
        for j, (r2, c2) in enumerate(cells):
            dy, dx = r - r2, c - c2
            if abs(dy) < w and abs(dx) < w:
                bias[0, :, i, j] = table[:, (dy + w - 1) * (2 * w - 1) + dx + w - 1]
    return bias


def test_relative_bias_starts_at_zero_and_is_added_by_offset():
    rows, cols, w = 5, 6, 3
    plain, biased = make(1, window=w), make(1, window=w, relative_bias=True)
    assert biased.table.shape == (2, 25) and biased.table.abs().sum() == 0
    q, k, v = qkv(rows * cols)
    spec = spec_for(rows, cols)
    torch.testing.assert_close(biased(q, k, v, spec), plain(q, k, v, spec), rtol=0, atol=0)
    with torch.no_grad():
        biased.table.copy_(torch.randn(2, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    pattern = swin_shifted(rows, cols, w, w, 1, 1)
    check(biased, rows, cols, pattern, bias=relative_bias(rows, cols, biased.table.detach(), w))
    q.requires_grad_(True)
    biased(q, k, v, spec).sum().backward()  # padded queries are dropped: no NaN from empty rows
    assert torch.isfinite(q.grad).all() and torch.isfinite(biased.table.grad).all()
    assert biased.table.grad.abs().sum() > 0


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa(Hkv):
    kernel = make(1, H=4, window=2)
    q, k, v = qkv(16, H=4, Hkv=Hkv)
    spec = spec_for(4, 4)
    expected = reference_attention(q, k, v, spec, pattern=swin_shifted(4, 4, 2, 2, 1, 1))
    torch.testing.assert_close(kernel(q, k, v, spec), expected, rtol=1e-10, atol=1e-10)


def test_dropout_only_while_training():
    kernel = make(0, window=2, dropout=0.5)
    q, k, v = qkv(16)
    spec = spec_for(4, 4)
    evaluated = kernel(q, k, v, spec)
    torch.testing.assert_close(evaluated, reference_attention(q, k, v, spec, pattern=block_diagonal(4, 4, 2)))
    torch.manual_seed(0)
    assert not torch.allclose(kernel.train()(q, k, v, spec), evaluated)


def test_refuses_a_cls_token_and_inputs_without_a_grid():
    kernel = make(0, window=2)
    q, k, v = qkv(17)
    with pytest.raises(RunError, match='model.pool = "mean"'):
        kernel(q, k, v, spec_for(4, 4, prefix=1))
    q, k, v = qkv(16)
    with pytest.raises(RunError, match="needs images"):
        kernel(q, k, v, spec_for(4, 4, grid=False))
    with pytest.raises(RunError, match="patches"):
        kernel(q, k, v, spec_for(4, 5))


def test_capabilities_and_the_recipe_check():
    cls = ATTENTION.get("window")
    assert not (cls.supports_causal or cls.supports_cache or cls.supports_padding or cls.supports_bias)
    assert cls.complexity == "O(N·w²)"
    cfg = ATTENTION.config_model("window")()
    assert (cfg.window, cfg.shift, cfg.relative_bias) == (7, True, False)
    with pytest.raises(Exception):
        ATTENTION.config_model("window")(window=0)
    with pytest.raises(UsageError) as exc:
        validate({"family": "classifier", "data": {"train": "x.txt"},
                  "model": {"d_model": 16, "n_heads": 2, "attention": {"kind": "window"}}})
    assert "cannot mask padding" in str(exc.value) and 'model.pool = "mean"' in str(exc.value)
