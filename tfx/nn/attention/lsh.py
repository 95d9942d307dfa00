"""Reformer LSH attention (Kitaev, Kaiser & Levskaya, 2020): shared-QK attention within hash buckets.

Shared QK: the keys are the unit-normalised queries of the same head, k_j = q_j / |q_j|, and the
scores q_i·k_j / sqrt(D). **The k projection handed to the kernel is ignored** (its weights get
no gradient: under DDP the stack needs find_unused_parameters, and weight decay still shrinks them).

Each of `n_hashes` rounds hashes every key with angular LSH, h(x) = argmax([xR; -xR]) for a random
rotation R (D, n_buckets/2) per head and round; tokens are sorted by (bucket, position), the sorted
sequence is cut into chunks of `chunk` tokens, and each chunk attends to itself and to the chunk
before it (the first chunk has none before it: no wrap-around). Within that window a query attends
only to keys of its own bucket, so round r lets query i see
    P_i^r = {j : h_r(j) = h_r(i), chunk_r(i) - 1 <= chunk_r(j) <= chunk_r(i)}.
Causality (k_pos <= q_pos) and padding are applied to the gathered pairs.

A token does not attend to itself unless it has no other key: the self score is replaced by a
very low finite value (-1e5), so its weight underflows to exactly zero as soon as any other key of
any round is allowed, and is the whole weight otherwise (the first token of a causal sequence).

Rounds are combined as the paper does: softmax over the union of the rounds' key sets, each key
counted once. Every pair's score is lowered by log n_ij, n_ij the number of rounds whose window
holds j for i; summing the rounds' unnormalised weights exp(s - M) (M one stabiliser per query
across rounds, equivalent to the log-sum-exp weighting of the per-round outputs) then gives exactly
sum_{j in U_i} e^{s_ij} v_j / sum_{j in U_i} e^{s_ij}, U_i the union of the P_i^r. With one bucket
and chunk >= T that is dense shared-QK attention, whatever n_hashes.

Rotations are drawn afresh from torch's RNG at every training forward (the training loop's seed
makes them reproducible) and are fixed in eval, from a generator seeded by `seed` and the layer
index, so evaluation is deterministic.

Causality caveat: gradients never flow from future tokens (their pairs are masked), but which past
keys share a query's chunk depends on where later tokens sort, so in training the output at t can
change with the buckets of later tokens; this is inherent to sort-and-chunk. There is no cache
(supports_cache = False): generation reruns the whole prefix, which also keeps the hashing exact.

Time O(T·n_hashes·(chunk + log T)) (the sort is O(T log T)), memory O(T·n_hashes·chunk).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from tfx.nn.dropout import dropout as fast_dropout
from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.registry import ATTENTION, KindConfig

SELF_SCORE = -1e5  # a token's score for itself: only wins when nothing else is allowed


class LSHConfig(KindConfig):
    kind: str = "lsh"
    n_buckets: int = Field(0, ge=0, description="hash buckets per round: 1, an even number, or 0 for "
                           "2·ceil(T/chunk) (the paper's chunk = 2T/n_buckets)")
    n_hashes: int = Field(2, ge=1, description="hashing rounds; more rounds, fewer missed neighbours")
    chunk: int = Field(64, ge=1, description="chunk length of the sorted sequence")
    seed: int = Field(0, description="seeds the fixed rotations used in eval mode")

    @field_validator("n_buckets")
    @classmethod
    def _even(cls, n: int) -> int:
        if n > 1 and n % 2:
            raise ValueError("n_buckets must be 1, even, or 0 (auto): the hash is argmax([xR; -xR])")
        return n


# Helpers shared with routing.py.

def repeat_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, H, T, D) for GQA/MQA."""
    rep = n_heads // x.shape[1]
    return x.repeat_interleave(rep, dim=1) if rep > 1 else x


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x (B|1, H|1, T, *F) at token indices idx (B, H, *S) -> (B, H, *S, *F)."""
    B, H = idx.shape[:2]
    feat = x.shape[3:]
    x = x.expand(B, H, *x.shape[2:])
    flat = idx.reshape(B, H, -1)
    if feat:
        flat = flat.reshape(B, H, -1, *(1,) * len(feat)).expand(B, H, -1, *feat)
    return x.gather(2, flat).reshape(*idx.shape, *feat)


def gather_bias(bias: Tensor, qi: Tensor, kj: Tensor, T: int) -> Tensor:
    """bias (B|1, H, T, T) at pairs (qi[..., :, None], kj[..., None, :]); qi (B, H, *S, n),
    kj (B, H, *S, m) token indices (those >= T are dummies, clamped) -> (B, H, *S, n, m)."""
    B, H = qi.shape[:2]
    flat = bias.expand(B, H, T, T).reshape(B, H, T * T)
    pair = qi.clamp(max=T - 1)[..., :, None] * T + kj.clamp(max=T - 1)[..., None, :]
    return flat.gather(2, pair.reshape(B, H, -1)).reshape(pair.shape)


def weights(scores: Tensor, stab: Tensor) -> Tensor:
    """exp(scores - stab) with -inf scores giving 0; stab a detached finite per-row stabiliser."""
    return torch.exp(scores - stab[..., None])


@ATTENTION.register("lsh", config=LSHConfig)
class LSHAttention(AttentionKernel):
    """Reformer LSH attention with shared QK (the k input is ignored); see the module docstring."""

    exact = False
    supports_cache = False
    complexity = "O(T·chunk·n_hashes)"

    def __init__(self, cfg: LSHConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self._eval_rotations: dict[tuple, Tensor] = {}

    def n_buckets(self, T: int) -> int:
        if self.cfg.n_buckets:
            return self.cfg.n_buckets
        return 2 * math.ceil(T / min(self.cfg.chunk, T))

    def rotations(self, H: int, D: int, n_buckets: int, device, dtype) -> Tensor:
        """(H, D, n_hashes, n_buckets/2) random rotations: fresh in training, fixed in eval."""
        shape = (H, D, self.cfg.n_hashes, n_buckets // 2)
        if self.training:
            return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
        key = (shape, str(device), dtype)
        if key not in self._eval_rotations:
            g = torch.Generator().manual_seed(self.cfg.seed * 10007 + self.layer)
            self._eval_rotations[key] = torch.randn(shape, generator=g, dtype=torch.float32).to(device, dtype)
        return self._eval_rotations[key]

    def buckets(self, keys: Tensor, n_buckets: int) -> Tensor:
        """Angular LSH of the unit keys (B, H, T, D) -> (B, H, n_hashes, T) bucket ids."""
        B, H, T, D = keys.shape
        if n_buckets == 1:
            return torch.zeros(B, H, self.cfg.n_hashes, T, dtype=torch.long, device=keys.device)
        rot = self.rotations(H, D, n_buckets, keys.device, keys.dtype)
        x = torch.einsum("bhtd,hdrn->bhrtn", keys, rot)  # (B, H, R, T, n_buckets/2)
        return torch.cat([x, -x], dim=-1).argmax(dim=-1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        B, H, T, D = q.shape
        assert k.shape[2] == T and spec.q_pos.shape[0] == spec.k_pos.shape[0] == T, \
            "lsh has no cache: queries and keys are the same tokens"
        R = self.cfg.n_hashes
        c = min(self.cfg.chunk, T)
        N = math.ceil(T / c)
        Tp = N * c  # padded with dummy tokens (never keys, outputs dropped)
        nb = self.n_buckets(T)
        dt = torch.promote_types(q.dtype, torch.float32)

        qf = q.to(dt)
        keys = F.normalize(qf, dim=-1)  # shared QK: unit-normalised queries
        vf = repeat_heads(v, H).to(dt)
        with torch.no_grad():
            bucket = self.buckets(keys.detach(), nb)  # (B, H, R, T)
        pad = Tp - T
        if pad:
            qf, keys, vf = (F.pad(x, (0, 0, 0, pad)) for x in (qf, keys, vf))
            bucket = F.pad(bucket, (0, pad), value=nb)  # dummies sort last
        t = torch.arange(Tp, device=q.device)
        perm = (bucket * Tp + t).argsort(dim=-1)  # (B, H, R, Tp): sorted slot -> token
        undo = torch.empty_like(perm).scatter_(-1, perm, t.expand_as(perm))  # token -> sorted slot

        def look_back(x: Tensor) -> Tensor:  # (B, H, R, N, c, ...) -> (B, H, R, N, 2c, ...)
            return x if N == 1 else torch.cat([x.roll(1, dims=3), x], dim=4)

        # Token attributes in sorted order, chunked: queries (.., N, c), keys (.., N, 2c).
        qi = perm.view(B, H, R, N, c)
        kj = look_back(qi)
        sb = bucket.gather(-1, perm).view(B, H, R, N, c)
        pos = F.pad(spec.q_pos, (0, pad))
        valid = t < T
        valid = valid[None] if spec.key_padding_mask is None else valid & F.pad(spec.key_padding_mask, (0, pad))
        mask = sb[..., :, None] == look_back(sb)[..., None, :]  # same bucket
        mask = mask & gather_tokens(valid[:, None], kj)[..., None, :]
        if N > 1:  # the first chunk has no previous chunk
            first = torch.zeros(N, 2 * c, dtype=torch.bool, device=q.device)
            first[0, :c] = True
            mask = mask & ~first[:, None, :]
        if spec.causal:
            mask = mask & (pos[kj][..., None, :] <= pos[qi][..., :, None])

        sq = gather_tokens(qf, qi)  # (B, H, R, N, c, D)
        sk = look_back(gather_tokens(keys, qi))  # (B, H, R, N, 2c, D)
        sv = look_back(gather_tokens(vf, qi))
        scores = sq @ sk.transpose(-1, -2) / math.sqrt(D)  # (B, H, R, N, c, 2c)
        if spec.bias is not None:
            scores = scores + gather_bias(spec.bias.to(dt), qi, kj, T)
        scores = scores.masked_fill(qi[..., :, None] == kj[..., None, :], SELF_SCORE)
        if R > 1:
            scores = scores - self._round_counts(bucket, undo // c, qi, kj, N).to(dt).log()
        scores = scores.masked_fill(~mask, float("-inf"))

        # One stabiliser per query across rounds: rounds combine by their unnormalised sums.
        with torch.no_grad():
            row_max = scores.amax(dim=-1).view(B, H, R, Tp).gather(-1, undo).amax(dim=2)  # (B, H, Tp)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            stab = row_max[:, :, None].expand(B, H, R, Tp).gather(-1, perm).view(B, H, R, N, c)
        e = weights(scores, stab)
        z = e.sum(dim=-1)  # (B, H, R, N, c)
        if self.training and self.dropout:
            e = fast_dropout(e, self.dropout)
        num = e @ sv  # (B, H, R, N, c, D)

        num = num.reshape(B, H, R, Tp, D).gather(3, undo[..., None].expand(B, H, R, Tp, D)).sum(dim=2)
        z = z.reshape(B, H, R, Tp).gather(-1, undo).sum(dim=2)
        out = num / torch.where(z > 0, z, torch.ones_like(z))[..., None]
        return out[:, :, :T].to(q.dtype)

    @staticmethod
    def _round_counts(bucket: Tensor, chunk_of: Tensor, qi: Tensor, kj: Tensor, N: int) -> Tensor:
        """n_ij: in how many rounds key j lies in query i's window (same bucket, own or previous
        chunk); bucket, chunk_of (B, H, R, Tp) per token; qi (.., N, c), kj (.., N, 2c) -> (.., c, 2c)."""
        count = None
        for r in range(bucket.shape[2]):
            b, ch = bucket[:, :, r], chunk_of[:, :, r]  # (B, H, Tp)
            same = gather_tokens(b, qi)[..., :, None] == gather_tokens(b, kj)[..., None, :]
            diff = gather_tokens(ch, qi)[..., :, None] - gather_tokens(ch, kj)[..., None, :]
            hit = same & ((diff == 0) | (diff == 1)) if N > 1 else same
            count = hit.to(torch.int32) if count is None else count + hit
        return count.clamp(min=1)
