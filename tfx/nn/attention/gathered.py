"""Block-gathered attention: the engine of the exact sparse kernels (local, strided, fixed,
blockwise, longformer, bigbird). No kind is registered here.

A sparse pattern is computed as a union of disjoint *parts*. A part groups the queries into G
groups of b query indices and gives every group its own list of K key indices; the queries and
keys are gathered, the (G, b, K) scores are masked by the part's pair rule (on absolute
positions), causality, padding and the validity of each slot, and the bias is gathered at the
same pairs. Nothing of size Tq x Tk is ever allocated (unless a part asks for all keys): time and
memory are O(sum over parts of G·b·K). Parts are merged exactly, like blockwise softmax: each part
returns its row maxima, sums of exponentials and unnormalised outputs, and one softmax over the
union results. Dropout is applied to the unnormalised weights of the outputs only, which equals
dropout of the normalised attention weights.

Requirements the kernels meet by construction (the exact tests check the results):
- q_pos and k_pos are contiguous ascending runs (key index j has position k_pos[0] + j), as the
  stack makes them; index arithmetic uses the offset q_pos[0] - k_pos[0] as a tensor (no sync);
- in every part, each query index appears in at most one group, and a key index at most once in
  a group's list (padding slots point outside [0, Tq) / [0, Tk) and are masked);
- the parts' rules are disjoint and their union is the kernel's allowed() pattern, and every
  allowed pair of a query lies in the key list of its group in the part whose rule admits it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from tfx.nn.dropout import dropout as fast_dropout
from tfx.nn.attention.base import AttnSpec

Rule = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Part:
    """One disjoint piece of a sparse pattern.

    q_idx: (P, G, b) query indices, P = 1 (shared by all heads) or H (one layout per head);
    k_idx: (P, G, K) key indices of each group; indices out of range are empty slots;
    rule: (qp (P, G, b, 1), kp (P, G, 1, K)) absolute positions -> bool, broadcastable to
          (H, G, b, K); None admits every gathered pair.
    distance_bias: (P, G, b, K) distances qp - kp -> a score bias broadcastable to (H, G, b, K),
          computed at the gathered pairs only (the adaptive span's soft mask); None for none.
    inputs: this part's own (q, k, v, spec), the same number of queries as the kernel's (LM-Infinite's
          far branch scores other queries against a few keys); None: the kernel's.
    """

    q_idx: Tensor
    k_idx: Tensor
    rule: Rule | None = None
    distance_bias: Callable[[Tensor], Tensor] | None = None
    inputs: tuple[Tensor, Tensor, Tensor, AttnSpec] | None = None


def offset(spec: AttnSpec) -> Tensor:
    """Key index of the query with index 0: q_pos[0] - k_pos[0] (a 0-d tensor, no host sync)."""
    return spec.q_pos[0] - spec.k_pos[0]


def banded_index(Tq: int, off: Tensor, *, reach: int, dilation: int, block: int, causal: bool,
                 groups: int | None = None) -> tuple[Tensor, Tensor]:
    """Query groups and key lists of a (dilated) sliding window.

    Queries with the same index residue modulo `dilation` form a class; each class is cut into
    groups of `block` consecutive members, and a group gathers the keys at distances
    m·dilation, |m| < reach (m >= 0 when causal), from any member: block + reach - 1 keys
    (block + 2·reach - 2 when bidirectional). Returns (G, block), (G, K) with G padded to `groups`.
    """
    d, b = dilation, block
    per_class = -(-Tq // d)                      # members of a residue class
    n_g = -(-per_class // b)                     # groups per class
    G = groups if groups is not None else d * n_g
    back, ahead = reach - 1, 0 if causal else reach - 1
    K = b + back + ahead
    device = off.device
    r = torch.arange(d, device=device)[:, None, None]           # (d, 1, 1) class
    t0 = (torch.arange(n_g, device=device) * b)[None, :, None]  # (1, n_g, 1) first member of a group
    q_idx = r + d * (t0 + torch.arange(b, device=device))       # (d, n_g, b)
    q_idx = torch.where(q_idx < Tq, q_idx, Tq)  # class members past the end are empty slots
    k_idx = r + off + d * (t0 - back + torch.arange(K, device=device))  # (d, n_g, K)
    q_idx, k_idx = q_idx.reshape(-1, b), k_idx.reshape(-1, K)
    if G > q_idx.shape[0]:
        q_idx = torch.cat([q_idx, q_idx.new_full((G - q_idx.shape[0], b), Tq)])
        k_idx = torch.cat([k_idx, k_idx.new_full((G - k_idx.shape[0], K), -1)])
    return q_idx, k_idx


def aligned_blocks(Tq: int, q0: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Query groups that are the absolute position blocks [n·block, (n+1)·block) meeting the queries.

    Returns (G, block) query indices and the (G, block) absolute positions of the groups."""
    G = -(-(Tq + block - 1) // block)
    base = torch.div(q0, block, rounding_mode="floor") * block
    pos = base + torch.arange(G * block, device=q0.device).view(G, block)  # (G, block)
    q_idx = pos - q0
    return torch.where((q_idx >= 0) & (q_idx < Tq), q_idx, Tq), pos


def _part(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, part: Part, dropout: float, *, alone: bool):
    """One part, by group: the (B, H, G·b, D) outputs if `alone` (the only part), else row maxima,
    sums of exponentials and unnormalised outputs; and the (P, G·b) query slot of each row."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rep = H // Hkv
    P, G, b = part.q_idx.shape
    K = part.k_idx.shape[-1]
    q_ok = (part.q_idx >= 0) & (part.q_idx < Tq)
    k_ok = (part.k_idx >= 0) & (part.k_idx < Tk)
    qi, ki = part.q_idx.clamp(0, max(Tq - 1, 0)), part.k_idx.clamp(0, max(Tk - 1, 0))
    q = q * (1.0 / math.sqrt(D))
    if P == 1:
        qg = q[:, :, qi[0]]                              # (B, H, G, b, D)
        kg, vg = k[:, :, ki[0]], v[:, :, ki[0]]          # (B, Hkv, G, K, D)
        kg, vg = kg.unsqueeze(2), vg.unsqueeze(2)        # (B, Hkv, 1, G, K, D)
    else:
        heads = torch.arange(H, device=qi.device)[:, None, None]
        qg = q[:, heads, qi]                             # (B, H, G, b, D)
        kg, vg = k[:, heads // rep, ki], v[:, heads // rep, ki]  # (B, H, G, K, D)
        kg, vg = kg.view(B, Hkv, rep, G, K, D), vg.view(B, Hkv, rep, G, K, D)
    qg = qg.view(B, Hkv, rep, G, b, D)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (qg @ kg.transpose(-1, -2)).view(B, H, G, b, K).to(acc)  # (B, H, G, b, K)
    if spec.bias is not None:
        if P == 1:
            bias = spec.bias[:, :, qi[0, :, :, None], ki[0, :, None, :]]  # (1|B, H, G, b, K)
        else:
            hb = torch.arange(H, device=qi.device)[:, None, None, None]
            bias = spec.bias[:, hb, qi[..., None], ki[..., None, :]]     # (1|B, H, G, b, K)
        scores = scores + bias.to(acc)
    qp, kp = spec.q_pos[qi][..., None], spec.k_pos[ki][..., None, :]  # (P, G, b, 1), (P, G, 1, K)
    if part.distance_bias is not None:
        scores = scores + part.distance_bias(qp - kp).to(acc)
    mask = q_ok[..., None] & k_ok[..., None, :]                      # (P, G, b, K)
    if part.rule is not None:
        mask = mask & part.rule(qp, kp)
    if spec.causal:
        mask = mask & (kp <= qp)
    mask = mask[None]                                                # (1, P|H, G, b, K)
    if spec.key_padding_mask is not None:
        mask = mask & spec.key_padding_mask[:, ki][:, :, :, None, :]  # (B, P, G, 1, K)
    slots = torch.where(q_ok, part.q_idx, Tq).view(P, G * b)         # empty slots -> a spare row
    low = torch.finfo(acc).min
    if alone:  # the fused softmax; a finite fill keeps rows without keys finite, then zeroed
        weights = torch.softmax(scores.masked_fill(~mask, low), dim=-1)
        weights = weights.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        if dropout:
            weights = fast_dropout(weights, dropout)
        out = weights.to(v.dtype).view(B, Hkv, rep, G, b, K) @ vg    # (B, Hkv, rep, G, b, D)
        return out.view(B, H, G * b, D), slots
    scores = scores.masked_fill(~mask, float("-inf"))
    mx = scores.amax(-1, keepdim=True).detach().clamp_min(low)       # rows without keys: finite
    e = torch.exp(scores - mx)                                       # (B, H, G, b, K)
    total = e.sum(-1)                                                # (B, H, G, b)
    if dropout:
        e = fast_dropout(e, dropout)
    num = e.to(v.dtype).view(B, Hkv, rep, G, b, K) @ vg              # (B, Hkv, rep, G, b, D)
    num = num.view(B, H, G * b, D).to(acc)
    return (num, mx.view(B, H, G * b), total.view(B, H, G * b)), slots


def _to_queries(x: Tensor, slots: Tensor, Tq: int, fill: float) -> Tensor:
    """Scatter (B, H, N[, D]) values of query slots to (B, H, Tq[, D]) query order."""
    shape = list(x.shape)
    shape[2] = Tq + 1
    index = slots[None] if x.dim() == 3 else slots[None, :, :, None]
    index = index.expand(x.shape)
    return x.new_full(shape, fill).scatter(2, index, x)[:, :, :Tq]


def gathered_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, parts: list[Part], *,
                       dropout: float = 0.0) -> Tensor:
    """Softmax attention of q (B, H, Tq, D) over the union of the parts' pairs; k, v (B, Hkv, Tk, D).
    Queries with no admitted key give zeros."""
    Tq = q.shape[2]
    if len(parts) == 1:
        out, slots = _part(*(parts[0].inputs or (q, k, v, spec)), parts[0], dropout, alone=True)
        return _to_queries(out, slots, Tq, 0.0)
    stats = [_part(*(part.inputs or (q, k, v, spec)), part, dropout, alone=False) for part in parts]
    low = torch.finfo(stats[0][0][0].dtype).min
    nums = [_to_queries(num, slots, Tq, 0.0) for (num, _, _), slots in stats]
    mxs = [_to_queries(mx, slots, Tq, low) for (_, mx, _), slots in stats]
    totals = [_to_queries(total, slots, Tq, 0.0) for (_, _, total), slots in stats]
    top = torch.stack(mxs).amax(0)
    out, norm = 0.0, 0.0
    for num, mx, total in zip(nums, mxs, totals):
        scale = torch.exp(mx - top)                                  # (B, H, Tq)
        out = out + num * scale[..., None]
        norm = norm + total * scale
    return (out / norm.clamp_min(torch.finfo(top.dtype).tiny)[..., None]).to(q.dtype)
