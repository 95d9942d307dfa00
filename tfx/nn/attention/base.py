"""The kernel contract every attention kind implements, and the dense oracle tests compare to.

Kernels see tensors and a small spec, never the Attention module: q (B, H, Tq, D) and k, v
(B, Hkv, Tk, D) with H a multiple of Hkv (GQA/MQA), positions for masks, an optional padding mask
and what the position scheme adds to the scores (an additive bias; Shaw's relative values and
DA's distance scaling, which only kernels that materialise scores can take).

A kernel declares what it supports in class variables; `tfx recipe check` refuses combinations
it cannot run and `tfx recipe kinds` prints them. A kernel that needs state other than a KV cache
for generation (linear attention's running sums) returns it from `new_cache` and overrides
`attend`; one that adds a training penalty (adaptive span) returns it from `aux_loss`; one that
changes its own state in a training forward says so in `checkpoint_problem`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class AttnSpec:
    q_pos: Tensor                     # (Tq,) absolute positions of the queries
    k_pos: Tensor                     # (Tk,) absolute positions of the keys (memory < cache < current)
    causal: bool
    key_padding_mask: Tensor | None = None  # (B, Tk) True = attend
    bias: Tensor | None = None        # (1|B, H, Tq, Tk) additive
    rel_values: tuple[Tensor, Tensor] | None = None  # Shaw: (R, D) table, (Tq, Tk) index into it
    score_scale: Tensor | None = None  # DA: scores = relu(scores) * scale, (1|B, H, Tq, Tk)
    # images (the vit family): (rows, cols, prefix) = `prefix` tokens ([CLS]) then a rows x cols grid
    # of patches in raster order; None for text
    grid: tuple[int, int, int] | None = None
    # LM-Infinite's far branch (lm_infinite.py): the queries placed at their capped positions, after the
    # position scheme's rotation and adjustment, and the bias they have on the global keys (1|B, H, Tq, G)
    far: tuple[Tensor, Tensor | None] | None = None

    @property
    def plain(self) -> bool:
        """No padding, bias or score modification: the fastest fused paths apply."""
        return self.key_padding_mask is None and self.bias is None and not self.explicit_only

    @property
    def explicit_only(self) -> bool:
        """Needs the score matrix itself (Shaw values, DA scaling): only supports_score_mods kernels."""
        return self.rel_values is not None or self.score_scale is not None


class AttentionKernel(nn.Module):
    """Base of every attention kind. `exact` kernels equal reference_attention under allowed()."""

    exact: ClassVar[bool] = True
    supports_causal: ClassVar[bool] = True
    supports_bidirectional: ClassVar[bool] = True
    supports_cache: ClassVar[bool] = True        # prefill + steps == one full forward
    supports_bias: ClassVar[bool] = True         # takes spec.bias (ALiBi, T5, XL, Shaw keys)
    supports_score_mods: ClassVar[bool] = False  # takes spec.rel_values and spec.score_scale
    supports_padding: ClassVar[bool] = True      # takes spec.key_padding_mask
    complexity: ClassVar[str] = "O(T^2)"        # time per sequence, for `tfx recipe kinds`
    needs_grid: ClassVar[bool] = False           # works on a patch grid (spec.grid) only: images
    # its weights are a softmax over the keys a query may see, one pattern for every head, and it takes
    # grouped-query heads: a query of zeros weighs those keys evenly (the simplified block's C)
    softmax_over_keys: ClassVar[bool] = False

    def __init__(self, cfg, *, n_heads: int, d_head: int, dropout: float = 0.0, max_len: int = 0,
                 layer: int = 0, shared: dict | None = None):
        """`max_len` is the training context; `layer` the block index; `shared` one dict per stack,
        for parameters shared across layers (Linformer's layerwise projections)."""
        super().__init__()
        self.cfg = cfg
        self.n_heads = n_heads
        self.d_head = d_head
        self.dropout = dropout
        self.max_len = max_len
        self.layer = layer
        self.shared = shared if shared is not None else {}

    def new_cache(self, batch: int, n_kv_heads: int, max_len: int, *, device, dtype):
        """The generation state of one layer: a KV cache unless the kernel keeps something else."""
        from tfx.nn.state import KVCache
        return KVCache(batch, n_kv_heads, max_len, self.d_head, device=device, dtype=dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, cache=None) -> Tensor:
        """Attention of the new queries to the cached and the new keys; the cache is extended."""
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, L + T, D)
        return self(q, k, v, spec)

    def far_positions(self, q_pos: Tensor) -> Tensor | None:
        """Positions to place the queries at for a branch scored at capped distances (LM-Infinite's
        global keys: `AttnSpec.far`, made by the attention module), or None: no such branch."""
        return None

    def aux_loss(self) -> Tensor | None:
        """A penalty this kernel adds to the training loss (per token), or None."""
        return None

    def checkpoint_problem(self) -> str | None:
        """Why a second run of this kernel's training forward (activation checkpointing recomputes it
        in the backward pass, with the same RNG state) would not repeat the first exactly, or None:
        state the kernel changes as it runs."""
        return None

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        """(Tq, Tk) bool pattern of the kernel itself (beyond causality), or None for all keys;
        (H, Tq, Tk) when the pattern differs between heads (blockwise, bigbird, dilated heads)."""
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def aux_losses(model: nn.Module) -> Tensor | None:
    """The sum of the per-token training penalties of `model`'s modules that have one (`aux_loss`:
    a kernel's adaptive span, the Universal Transformer's ponder cost), or None."""
    losses = [loss for m in model.modules() if callable(getattr(m, "aux_loss", None))
              and (loss := m.aux_loss()) is not None]
    return sum(losses) if losses else None


def full_mask(spec: AttnSpec, pattern: Tensor | None, batch: int) -> Tensor | None:
    """The boolean (B|1, 1|H, Tq, Tk) mask of allowed pairs: pattern & causality & padding.

    `pattern` is (Tq, Tk), or (H, Tq, Tk) for a pattern that differs between heads."""
    mask = pattern
    if spec.causal:
        causal = spec.k_pos[None, :] <= spec.q_pos[:, None]  # (Tq, Tk)
        mask = causal if mask is None else mask & causal
    if mask is not None:
        mask = mask[None] if mask.dim() == 3 else mask[None, None]  # (1, 1|H, Tq, Tk)
    if spec.key_padding_mask is not None:
        pad = spec.key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
        mask = pad if mask is None else mask & pad
    return mask


def reference_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec,
                        pattern: Tensor | None = None) -> Tensor:
    """Dense attention written out step by step: the oracle every kernel is tested against.

    Rows with no allowed key give zeros. Shaw's relative values are added pair by pair,
    out_i = sum_j w_ij (v_j + table[index_ij]), a different route from dense's bucket sums.
    """
    B, H, Tq, D = q.shape
    rep = H // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(rep, dim=1)  # (B, H, Tk, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, Tq, Tk)
    if spec.score_scale is not None:
        scores = torch.relu(scores) * spec.score_scale
    if spec.bias is not None:
        scores = scores + spec.bias
    mask = full_mask(spec, pattern, B)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = weights @ v  # (B, H, Tq, D)
    if spec.rel_values is not None:
        table, index = spec.rel_values
        out = out + torch.einsum("bhqk,qkd->bhqd", weights, table[index].to(weights.dtype))
    return out


def reference_attention_backward(q: Tensor, k: Tensor, v: Tensor, d_out: Tensor,
                                 mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward pass of softmax attention derived by hand (course notes), in float64.

    With S = Q·Kᵀ/√d (masked pairs -inf), A = softmax(S) row-wise and O = A·V, for dO = ∂L/∂O:
    dV = Aᵀ·dO, dA = dO·Vᵀ, dS = A ∘ (dA − rowsum(dA ∘ A)), dQ = dS·K/√d, dK = dSᵀ·Q/√d.
    `mask` is a boolean (B|1, H|1, Tq, Tk), True = attend; rows with no allowed key give zeros.
    q (B, H, Tq, D), k and v (B, H, Tk, D). Returns (dQ, dK, dV) in float64.
    """
    q, k, v, d_out = (t.double() for t in (q, k, v, d_out))
    scale = 1 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    a = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, H, Tq, Tk)
    dv = a.transpose(-1, -2) @ d_out  # (B, H, Tk, D)
    da = d_out @ v.transpose(-1, -2)  # (B, H, Tq, Tk)
    ds = a * (da - (da * a).sum(-1, keepdim=True))  # (B, H, Tq, Tk)
    dq = ds @ k * scale  # (B, H, Tq, D)
    dk = ds.transpose(-1, -2) @ q * scale  # (B, H, Tk, D)
    return dq, dk, dv
