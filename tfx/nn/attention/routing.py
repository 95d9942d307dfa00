"""Routing attention (Roy, Saffar, Vaswani & Grangier, 2021): attention within online k-means clusters.

Each head keeps `n_clusters` unit centroids (a buffer, not a parameter). Queries and keys are
unit-normalised for routing; the balanced variant of the paper is used: every cluster takes the
`window` queries and the `window` keys nearest (by cosine) to its centroid (window = ceil(T /
n_clusters) unless set), and its queries attend to its keys, with causality (k_pos <= q_pos) and
padding applied to the gathered pairs. Padding keys and queries are picked last.

Score convention (q/k normalisation shared with the routing): q and k are scaled to norm sqrt(D),
i.e. unit RMS, as a layer norm without gain would, and the score is q̃·k̃ / sqrt(D) = sqrt(D)·cos(q, k).
The dense equivalent is reference_attention(sqrt(D)·q/|q|, sqrt(D)·k/|k|, v).

A query picked by several clusters gets the softmax over all the keys of those clusters (the
clusters' outputs combined by their log-sum-exp weights; a key in several of them counts once per
cluster). A query that no cluster picks gets a zero output (the residual path carries the token).

Centroids follow an exponential moving average in training: after each forward every non-padding
unit query and key is assigned to its nearest centroid, and mu <- decay·mu + (1 - decay)·mean of the
vectors assigned to it (the paper's update with means in place of sums; clusters that got nothing
are left alone), then renormalised to unit length. Eval mode never moves them, so evaluation is
deterministic. Under DDP, buffers are broadcast from rank 0, so rank 0's updates are the ones kept.

Causality caveat: no gradient flows from future tokens (their pairs are masked), but which tokens a
cluster picks depends on the whole sequence, so in training the output at t can change with later
tokens' routing; this is inherent to the balanced top-w routing. There is no cache.

Time O(T·(window + n_clusters)·D): the routing similarities are O(T·n_clusters·D), the attention
O(n_clusters·window^2·D) = O(T·window·D) when n_clusters·window ≈ T.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from tfx.nn.dropout import dropout as fast_dropout
from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.attention.lsh import gather_bias, gather_tokens, repeat_heads, weights
from tfx.registry import ATTENTION, KindConfig


class RoutingConfig(KindConfig):
    kind: str = "routing"
    n_clusters: int = Field(16, ge=1, description="k-means centroids per head")
    window: int = Field(0, ge=0, description="queries and keys each cluster takes; 0: ceil(T / n_clusters)")
    decay: float = Field(0.999, ge=0.0, lt=1.0, description="EMA decay of the centroids in training")


@ATTENTION.register("routing", config=RoutingConfig)
class RoutingAttention(AttentionKernel):
    """Balanced routing attention with online spherical k-means; see the module docstring."""

    exact = False
    supports_cache = False
    complexity = "O(T·(window + n_clusters))"

    def __init__(self, cfg: RoutingConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        init = F.normalize(torch.randn(self.n_heads, cfg.n_clusters, self.d_head), dim=-1)
        self.register_buffer("centroids", init)  # (H, C, D) unit vectors

    def checkpoint_problem(self) -> str | None:
        return ("'routing' attention moves its k-means centroids in every training forward, so the "
                "recomputed forward would route with other centroids (and move them twice)")

    def window(self, T: int) -> int:
        return min(T, self.cfg.window or math.ceil(T / self.cfg.n_clusters))

    def route(self, qn: Tensor, kn: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """Unit queries and keys (B, H, T, D) -> token indices (B, H, C, w) of each cluster's
        nearest `w` queries and nearest `w` keys; padding tokens (valid False) come last."""
        mu = self.centroids.to(qn.dtype)
        w = self.window(qn.shape[2])
        sim_q = torch.einsum("bhtd,hcd->bhct", qn, mu)  # (B, H, C, T)
        sim_k = torch.einsum("bhtd,hcd->bhct", kn, mu)
        if valid is not None:
            sim_q = sim_q.masked_fill(~valid[:, None, None, :], float("-inf"))
            sim_k = sim_k.masked_fill(~valid[:, None, None, :], float("-inf"))
        return sim_q.topk(w, dim=-1).indices, sim_k.topk(w, dim=-1).indices

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        B, H, T, D = q.shape
        assert k.shape[2] == T and spec.q_pos.shape[0] == spec.k_pos.shape[0] == T, \
            "routing has no cache: queries and keys are the same tokens"
        dt = torch.promote_types(q.dtype, torch.float32)
        qn = F.normalize(q.to(dt), dim=-1)
        kn = F.normalize(repeat_heads(k, H).to(dt), dim=-1)
        vf = repeat_heads(v, H).to(dt)
        valid = spec.key_padding_mask
        with torch.no_grad():
            qi, kj = self.route(qn.detach(), kn.detach(), valid)  # (B, H, C, w)

        sq, sk, sv = gather_tokens(qn, qi), gather_tokens(kn, kj), gather_tokens(vf, kj)
        scores = (sq @ sk.transpose(-1, -2)) * math.sqrt(D)  # (B, H, C, w, w) = sqrt(D)·cos
        if spec.bias is not None:
            scores = scores + gather_bias(spec.bias.to(dt), qi, kj, T)
        mask = None
        if spec.causal:
            mask = spec.k_pos[kj][..., None, :] <= spec.q_pos[qi][..., :, None]
        if valid is not None:
            kvalid = gather_tokens(valid[:, None], kj)[..., None, :]
            mask = kvalid if mask is None else mask & kvalid
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))

        # One stabiliser per query across its clusters; the clusters' unnormalised sums add up.
        with torch.no_grad():
            row_max = scores.amax(dim=-1).reshape(B, H, -1)  # (B, H, C·w)
            flat_qi = qi.reshape(B, H, -1)
            stab = row_max.new_full((B, H, T), float("-inf")).scatter_reduce(2, flat_qi, row_max, "amax")
            stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))
            stab = stab.gather(2, flat_qi).view(qi.shape)
        e = weights(scores, stab)
        z = e.sum(dim=-1)  # (B, H, C, w)
        if self.training and self.dropout:
            e = fast_dropout(e, self.dropout)
        num = e @ sv  # (B, H, C, w, D)
        num = num.new_zeros(B, H, T, D).scatter_add(2, flat_qi[..., None].expand(B, H, -1, D),
                                                    num.reshape(B, H, -1, D))
        z = z.new_zeros(B, H, T).scatter_add(2, flat_qi, z.reshape(B, H, -1))
        out = num / torch.where(z > 0, z, torch.ones_like(z))[..., None]

        if self.training:
            self.update_centroids(qn.detach(), kn.detach(), valid)
        return out.to(q.dtype)

    @torch.no_grad()
    def update_centroids(self, qn: Tensor, kn: Tensor, valid: Tensor | None) -> None:
        """One EMA step of spherical k-means from unit queries and keys (B, H, T, D)."""
        mu = self.centroids.float()
        x = torch.cat([qn, kn], dim=2).float()  # (B, H, 2T, D)
        nearest = torch.einsum("bhtd,hcd->bhtc", x, mu).argmax(dim=-1)  # (B, H, 2T)
        onehot = F.one_hot(nearest, mu.shape[1]).float()  # (B, H, 2T, C)
        if valid is not None:
            onehot = onehot * torch.cat([valid, valid], dim=1)[:, None, :, None].float()
        sums = torch.einsum("bhtc,bhtd->hcd", onehot, x)
        counts = onehot.sum(dim=(0, 2))[..., None]  # (H, C, 1)
        d = self.cfg.decay
        moved = d * mu + (1 - d) * sums / counts.clamp(min=1)
        self.centroids.copy_(F.normalize(torch.where(counts > 0, moved, mu), dim=-1).to(self.centroids.dtype))
