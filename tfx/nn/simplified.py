"""The simplified Transformer block (`model.block = "simplified"`; He & Hofmann, 2023, "Simplifying
Transformer Blocks", their parallel SAS-P block with its norm kept).

One norm, then two branches side by side and no skip connection around them:

    h = norm(x)
    out = shaped_attention(h) + beta_ff * mlp(h)

Shaped attention has query and key matrices only: no value and no output projection. Head n mixes
its own slice h_n of the normalised input (d_head = d_model / n_heads) with the matrix

    A_n = alpha_n * I + beta_n * softmax(q_n k_n^T / sqrt(d_head)) - gamma_n * C

where C weighs evenly the keys a position may see (causal: the first t; a padded batch: the real
ones). C is what the kernel's softmax gives a query of zeros, so a kernel whose weights are a
softmax over the keys it lets a query see, and that takes grouped-query heads
(`softmax_over_keys`: dense for now), computes it in the same call as the real heads: the zero
queries ride along as extra query heads sharing their head's keys and values, and a KV cache is
extended once.

Initialisation as in the paper: W_Q = 0 (so softmax(q k^T) = C at the start), alpha = beta = gamma = 1
per head (so A = I at the start: each block begins as h + beta_ff * mlp(h)), beta_ff = 0.1; all four
gains are trained.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.layers import FeedForward, make_norm
from tfx.nn.positions import PositionScheme


class ShapedAttention(nn.Module):
    """Attention without value and output matrices, with the shaped matrix alpha I + beta softmax - gamma C."""

    def __init__(self, *, d_model: int, n_heads: int, bias: bool, kernel: AttentionKernel, layer: int = 0):
        super().__init__()
        self.layer, self.n_heads, self.d_head = layer, n_heads, d_model // n_heads
        self.qk = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.alpha = nn.Parameter(torch.ones(n_heads))
        self.beta = nn.Parameter(torch.ones(n_heads))
        self.gamma = nn.Parameter(torch.ones(n_heads))
        self.kernel = kernel

    def reset_parameters(self) -> None:
        """The paper's start: zero queries (so A = I), unit gains."""
        d = self.n_heads * self.d_head
        nn.init.zeros_(self.qk.weight[:d])
        for gain in (self.alpha, self.beta, self.gamma):
            nn.init.ones_(gain)

    def forward(self, h: Tensor, *, pos: PositionScheme, spec: AttnSpec, q_pos: Tensor, cache=None) -> Tensor:
        """(B, T, d_model) normalised input -> (B, T, d_model)."""
        B, T, d = h.shape
        H, D = self.n_heads, self.d_head
        q, k = self.qk(h).chunk(2, dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, D).transpose(1, 2)
        v = h.view(B, T, H, D).transpose(1, 2)  # the values are the input itself
        k_pos = q_pos
        if getattr(cache, "keeps_raw_keys", False):  # a sink cache: every kept key, positioned anew
            k, v_all = cache.update(k, v)
            cache, k_pos = None, spec.k_pos
        else:
            v_all = v
        q, k = pos.rotate(q, k, q_pos, k_pos)
        q, spec = pos.adjust(q, spec, self.layer)
        both = torch.stack([q, torch.zeros_like(q)], dim=2).flatten(1, 2)  # (B, 2H, T, D): head n at 2n, blind at 2n+1
        y = self.kernel.attend(both, k, v_all, spec, cache).view(B, H, 2, T, D)  # query head 2n+i reads kv head n
        soft, even = y[:, :, 0], y[:, :, 1]  # softmax(q k^T) v and C v, (B, H, T, D)
        g = lambda p: p.view(1, H, 1, 1).to(h.dtype)  # noqa: E731
        out = g(self.alpha) * v + g(self.beta) * soft - g(self.gamma) * even
        return out.transpose(1, 2).reshape(B, T, d)


class SimplifiedBlock(nn.Module):
    """norm -> shaped attention and the feed-forward side by side, summed, no skip connection."""

    cross = None  # no cross-attention sublayer: refused in a seq2seq decoder (tfx/kinds.py)
    post = False

    def __init__(self, *, attn: ShapedAttention, ffn: FeedForward, norm: str, d_model: int, eps: float,
                 bias: bool):
        super().__init__()
        self.norm1 = make_norm(norm, d_model, eps=eps, bias=bias)
        self.attn = attn
        self.ffn = ffn
        self.ffn_gain = nn.Parameter(torch.tensor(0.1))

    def forward(self, x: Tensor, *, pos: PositionScheme, spec: AttnSpec, q_pos: Tensor, cache=None,
                cross_kv=None, cross_spec=None, memory=None, recall=None) -> Tensor:
        h = self.norm1(x)
        return self.attn(h, pos=pos, spec=spec, q_pos=q_pos, cache=cache) + self.ffn_gain.to(h.dtype) * self.ffn(h, spec)


def simplified_problems(recipe, att, kernel, pos) -> list[str]:
    """Why a recipe cannot use `model.block = "simplified"` with attention table `att` (empty when it can)."""
    m = recipe.model
    out = []
    what = "model.block: 'simplified'"
    if not getattr(kernel, "softmax_over_keys", False) or getattr(att, "adaptive_span", False):
        out.append(f"{what} subtracts the even weighting of the keys a query sees, which the {att.kind!r} "
                   "kernel is not known to give a query of zeros (built and tested with dense attention only, "
                   "without adaptive_span)")
    if pos.uses_bias or pos.needs_score_mods:
        out.append(f"{what}: {m.position.kind!r} changes the attention scores, so a query of zeros would not weigh the "
                   "keys evenly; use rope, learned, sinusoidal or none")
    if m.n_kv_heads or m.d_head:
        out.append(f"{what} has no value matrix: each head reads its d_model / n_heads slice of the input, so "
                   "n_kv_heads and d_head cannot be set")
    if m.memory.kind != "none":
        out.append(f"{what} with a segment memory ({m.memory.kind!r}) is not built; use the standard block")
    if m.norm_position == "post":
        out.append(f"{what} has its own norm placement (one norm before both branches); leave norm_position = 'pre'")
    return out
