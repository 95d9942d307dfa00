"""Kernelised attention with running sums: linear attention and the Performer's FAVOR+.

Both replace softmax(q·k) by a product of feature maps φ(q)ᵀφ(k), so attention becomes

    out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps),   S_i = Σ_{j allowed} φ(k_j) v_jᵀ,   z_i = Σ_{j allowed} φ(k_j)

- `linear`: Katharopoulos, Vyas, Pappas & Fleuret, "Transformers are RNNs: Fast Autoregressive
  Transformers with Linear Attention" (ICML 2020), with φ(x) = elu(x) + 1 (or relu(x)).
- `performer`: Choromanski et al., "Rethinking Attention with Performers" (ICLR 2021), FAVOR+:
  positive orthogonal random features whose inner products estimate the softmax kernel
  exp(q·k/√D) without bias.

Bidirectional attention sums every allowed key once. Causal attention takes prefix sums chunk by
chunk: inside a chunk of C tokens the (C, C) scores are masked explicitly, between chunks the state
(S, z) is carried, so memory is O(T·m + (T/C)·m·D) rather than the O(T·m·D) of a cumulative sum
(m = feature dimension). Generation keeps only (S, z) per layer (`RecurrentState`): each new token
costs O(m·D), whatever the length. No bias, no score modification; attention dropout does not apply
(there is no weight matrix to drop from). Keys/values are shared by query groups (GQA/MQA): the
running sums are per key/value head.

Causal calls assume the layout the stack produces: the last Tq keys are the queries' own tokens in
order and every earlier key precedes every query (cache or memory).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.registry import ATTENTION, KindConfig


class LinearConfig(KindConfig):
    kind: str = "linear"
    feature: Literal["elu", "relu"] = "elu"   # φ(x) = elu(x) + 1 (the paper's) or relu(x)
    eps: float = Field(1e-6, ge=0.0)         # added to the normaliser φ(q)ᵀz
    chunk: int = Field(64, gt=0)             # causal prefix sums: tokens per chunk


class PerformerConfig(KindConfig):
    kind: str = "performer"
    features: int = Field(128, gt=0)         # m random features
    redraw: int = Field(0, ge=0)             # draw new features every N training forwards (0 = never)
    seed: int = 0                            # the draws are seeded from (seed, layer, draw number)
    chunk: int = Field(64, gt=0)             # causal prefix sums: tokens per chunk


class RecurrentState:
    """Generation state of a kernelised-attention layer: the running sums instead of keys/values.

    S = Σ φ(k) vᵀ (B, Hkv, m, Dv) and z = Σ φ(k) (B, Hkv, m), both stored times exp(-M), where M
    (B, Hkv) is the running maximum of the keys' log-scales (Performer's stabiliser; None for
    feature maps that need none). `length` counts the tokens folded in. The state has no length
    limit; `max_len` is the value it was made with, for the interface.
    """

    def __init__(self, S: Tensor, z: Tensor, M: Tensor | None, max_len: int):
        self.S, self.z, self.M = S, z, M
        self.length = 0
        self._max_len = max_len

    @property
    def max_len(self) -> int:
        return self._max_len

    def update(self, k: Tensor, v: Tensor):
        raise TypeError("a RecurrentState keeps running sums, not keys and values: "
                        "pass it to the kernel's attend()")

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): row i becomes old row index[i]."""
        self.S = self.S.index_select(0, index)
        self.z = self.z.index_select(0, index)
        if self.M is not None:
            self.M = self.M.index_select(0, index)

    def crop(self, length: int) -> None:
        """Only a no-op crop is possible: sums cannot forget their last tokens."""
        if length < self.length:
            raise ValueError(f"cannot crop a recurrent (running-sum) attention state from {self.length} "
                             f"to {length} tokens; rerun the prefix with a fresh state instead")


# ------------------------------------------------------------------ running-sum machinery

def _bring_in(psi: Tensor, s: Tensor | None, S: Tensor, z: Tensor, M: Tensor | None):
    """Express new key features in the state's scale, raising it to the new keys' maximum.

    A key's feature is φ = psi·exp(s) with psi (B, G, T, m) and the detached log-scale s (B, G, T)
    (-inf for a padded key). The state moves to M' = max(M, max s); S and z are multiplied by
    exp(M - M'), the new features become psi·exp(s - M') <= psi. Rows that have seen no real key
    keep M = -inf and a zero state."""
    if s is None:
        return psi, S, z, M
    M_new = torch.maximum(M, s.amax(-1))  # (B, G)
    ref = torch.where(torch.isfinite(M_new), M_new, torch.zeros_like(M_new))
    keep = torch.exp(M - ref)  # 0 where the state was empty
    S = S * keep[..., None, None]
    z = z * keep[..., None]
    psi = psi * torch.exp(s - ref[..., None])[..., None]
    return psi, S, z, M_new


def _fold(psi, s, v, S, z, M):
    """Add keys (B, G, T, m) and values (B, G, T, Dv) into the state."""
    psi, S, z, M = _bring_in(psi, s, S, z, M)
    return S + psi.transpose(-1, -2) @ v, z + psi.sum(-2), M


def running_sum_attention(phi_q: Tensor, psi_k: Tensor, s_k: Tensor | None, v: Tensor, state, *,
                          causal: bool, chunk: int) -> tuple[Tensor, Tensor, tuple]:
    """Numerator (B, G, R, Tq, Dv) and denominator (B, G, R, Tq) of kernelised attention.

    phi_q (B, G, R, Tq, m): query features, G key/value heads with R query heads each; psi_k
    (B, G, Tk, m), s_k (B, G, Tk) or None: key features as above, zero for padded keys; v (B, G, Tk, Dv);
    state (S, z, M) of the keys already seen. Causal: the last Tq keys are the queries' own tokens,
    the Tk - Tq before them are visible to every query. Returns the state after every key."""
    S, z, M = state
    Tq, Tk = phi_q.shape[-2], psi_k.shape[-2]
    if not causal:
        S, z, M = _fold(psi_k, s_k, v, S, z, M)
        num = phi_q @ S.unsqueeze(2)  # (B, G, R, Tq, Dv)
        den = (phi_q @ z[:, :, None, :, None]).squeeze(-1)  # (B, G, R, Tq)
        return num, den, (S, z, M)
    if Tq > Tk:
        raise ValueError(f"causal attention with more queries ({Tq}) than keys ({Tk})")
    P = Tk - Tq
    if P:  # keys before every query (a cache or memory): straight into the state
        S, z, M = _fold(psi_k[:, :, :P], None if s_k is None else s_k[:, :, :P], v[:, :, :P], S, z, M)
    if s_k is None:  # no running scale: every chunk at once, the states before each by a cumsum
        return _chunked_prefix_sums(phi_q, psi_k[:, :, P:], v[:, :, P:], S, z, M, chunk)
    nums, dens = [], []
    # split once: slicing inside the loop would cost a full-size gradient buffer per chunk (O(T²/C))
    pieces = zip(phi_q.split(chunk, -2), psi_k[:, :, P:].split(chunk, -2), s_k[:, :, P:].split(chunk, -1),
                 v[:, :, P:].split(chunk, -2))
    for pq, pk, sk, vc in pieces:  # pq (B, G, R, C, m), pk (B, G, C, m), sk (B, G, C), vc (B, G, C, Dv)
        pk, S, z, M = _bring_in(pk, sk, S, z, M)  # pk (B, G, C, m) in the state's scale
        scores = (pq @ pk.unsqueeze(2).transpose(-1, -2)).tril()  # (B, G, R, C, C) own and earlier tokens
        nums.append(scores @ vc.unsqueeze(2) + pq @ S.unsqueeze(2))  # (B, G, R, C, Dv)
        dens.append(scores.sum(-1) + (pq @ z[:, :, None, :, None]).squeeze(-1))  # (B, G, R, C)
        S, z = S + pk.transpose(-1, -2) @ vc, z + pk.sum(-2)
    return torch.cat(nums, -2), torch.cat(dens, -1), (S, z, M)


def _chunked_prefix_sums(phi_q, psi_k, v, S, z, M, chunk: int):
    """The causal loop of running_sum_attention without a loop: pad T to n chunks of C, sum each
    chunk's keys (B, G, n, m, Dv), take exclusive prefix sums over the chunks, and add the masked
    (C, C) scores inside each chunk. Memory O(T·m + n·m·Dv)."""
    B, G, R, T, m = phi_q.shape
    Dv = v.shape[-1]
    C = min(chunk, T)
    n = -(-T // C)
    pad = n * C - T  # zero features on padded tokens: they add nothing
    pq = F.pad(phi_q, (0, 0, 0, pad)).view(B, G, R, n, C, m)
    pk = F.pad(psi_k, (0, 0, 0, pad)).view(B, G, n, C, m)
    vc = F.pad(v, (0, 0, 0, pad)).view(B, G, n, C, Dv)
    kv = pk.transpose(-1, -2) @ vc  # (B, G, n, m, Dv): each chunk's keys and values
    kz = pk.sum(-2)  # (B, G, n, m)
    S_before = S[:, :, None] + kv.cumsum(2) - kv  # the state each chunk starts from
    z_before = z[:, :, None] + kz.cumsum(2) - kz
    scores = (pq @ pk.unsqueeze(2).transpose(-1, -2)).tril()  # (B, G, R, n, C, C) own and earlier tokens
    num = scores @ vc.unsqueeze(2) + pq @ S_before.unsqueeze(2)  # (B, G, R, n, C, Dv)
    den = scores.sum(-1) + (pq @ z_before.unsqueeze(2).unsqueeze(-1)).squeeze(-1)  # (B, G, R, n, C)
    num = num.reshape(B, G, R, n * C, Dv)[..., :T, :]
    den = den.reshape(B, G, R, n * C)[..., :T]
    return num, den, (S + kv.sum(2), z + kz.sum(2), M)


class KernelizedAttention(AttentionKernel):
    """Base of the running-sum kernels: a subclass gives the feature map, this class the sums.

    `features(x, query=)` returns (psi, s) with φ(x) = psi·exp(s); s (detached, per token) is None
    when the map needs no stabiliser. Query features may come up to a positive per-query factor,
    which cancels in the ratio when eps == 0."""

    exact = False
    supports_bias = False
    supports_cache = True
    complexity = "O(T·D^2)"
    eps: float = 0.0

    def n_features(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def features(self, x: Tensor, *, query: bool) -> tuple[Tensor, Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    @property
    def stabilised(self) -> bool:
        return False

    def new_cache(self, batch: int, n_kv_heads: int, max_len: int, *, device, dtype) -> RecurrentState:
        dt = torch.promote_types(dtype, torch.float32)
        m = self.n_features()
        S = torch.zeros(batch, n_kv_heads, m, self.d_head, device=device, dtype=dt)
        z = torch.zeros(batch, n_kv_heads, m, device=device, dtype=dt)
        M = torch.full((batch, n_kv_heads), float("-inf"), device=device, dtype=dt) if self.stabilised else None
        return RecurrentState(S, z, M, max_len)

    def _check(self, spec: AttnSpec) -> None:
        if spec.bias is not None or spec.explicit_only:
            raise ValueError(f"{type(self).__name__} takes no score bias, relative values or score scaling "
                             "(choose a position scheme that rotates or embeds)")

    def _run(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, state) -> tuple[Tensor, tuple]:
        B, H, Tq, _ = q.shape
        G = k.shape[1]
        dt = torch.promote_types(q.dtype, torch.float32)  # exp and sums in fp32 at least
        phi_q, _ = self.features(q.to(dt).view(B, G, H // G, Tq, -1), query=True)  # (B, G, R, Tq, m)
        psi_k, s_k = self.features(k.to(dt), query=False)  # (B, G, Tk, m), (B, G, Tk)
        if mask is not None:
            psi_k = psi_k * mask[:, None, :, None].to(dt)
            if s_k is not None:
                s_k = s_k.masked_fill(~mask[:, None, :], float("-inf"))
        num, den, state = running_sum_attention(phi_q, psi_k, s_k, v.to(dt), state, causal=causal,
                                                chunk=self.cfg.chunk)
        den = (den + self.eps).clamp_min(torch.finfo(dt).tiny)  # 0 only where no key is allowed (num is 0 too)
        out = (num / den[..., None]).reshape(B, H, Tq, -1)
        return out.to(q.dtype), state

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        self._check(spec)
        cache = self.new_cache(q.shape[0], k.shape[1], 0, device=q.device, dtype=q.dtype)
        out, _ = self._run(q, k, v, spec.key_padding_mask, spec.causal, (cache.S, cache.z, cache.M))
        return out

    def attend(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, cache=None) -> Tensor:
        """With a RecurrentState: fold the new keys into the running sums (O(m·D) per token)."""
        if not isinstance(cache, RecurrentState):
            return super().attend(q, k, v, spec, cache)  # no cache, or a plain KV cache
        self._check(spec)
        T = k.shape[2]
        mask = spec.key_padding_mask
        if mask is not None:
            mask = mask[:, -T:]  # the cached keys' padding was applied when they were folded in
        out, (cache.S, cache.z, cache.M) = self._run(q, k, v, mask, spec.causal, (cache.S, cache.z, cache.M))
        cache.length += T
        return out


@ATTENTION.register("linear", config=LinearConfig)
class LinearAttention(KernelizedAttention):
    """Linear attention (Katharopoulos et al., 2020), φ(x) = elu(x) + 1 or relu(x).

    O(T·D²) time; causal (chunked prefix sums) and bidirectional; a recurrent cache with O(D²)
    per generated token; padding and GQA; no bias."""

    complexity = "O(T·D^2)"

    def __init__(self, cfg: LinearConfig, **kw):
        super().__init__(cfg, **kw)
        self.eps = cfg.eps

    def n_features(self) -> int:
        return self.d_head

    def features(self, x: Tensor, *, query: bool) -> tuple[Tensor, None]:
        return (F.elu(x) + 1 if self.cfg.feature == "elu" else F.relu(x)), None


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> Tensor:
    """(m, d) random features: blocks of d rows orthonormal to each other (Haar-distributed),
    each row rescaled to the norm of an independent d-dim Gaussian vector (chi(d) distributed),
    so that every row is marginally N(0, I_d) as FAVOR+ prescribes."""
    g = torch.randn(-(-m // d), d, d, generator=generator, dtype=torch.float64)  # one Gaussian per block
    qm, r = torch.linalg.qr(g)
    qm = qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # sign fix: Haar distributed
    rows = qm.transpose(-1, -2).reshape(-1, d)[:m]  # each block's rows orthonormal
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return (rows * norms[:, None]).float()


@ATTENTION.register("performer", config=PerformerConfig)
class PerformerAttention(KernelizedAttention):
    """FAVOR+ (Choromanski et al., 2021): positive orthogonal random features for softmax attention.

    φ(x) = exp(W x - |x|²/2) / √m with x = q·D^(-1/4) (resp. k), so that E[φ(q)ᵀφ(k)] = exp(q·k/√D);
    W (m, D) is one orthogonal-block draw per layer, shared by the heads, kept as a buffer (saved
    with the model) and drawn again every `redraw` training forwards from a seed of (seed, layer,
    draw number). Stabilised as in the paper: each query's features are divided by their maximum
    (cancels in the ratio, so eps = 0), each key's too, the keys' maxima being carried as a running
    log-scale through the chunks and the recurrent state. O(T·m·D) time; causal and bidirectional;
    recurrent cache (O(m·D) per generated token); padding and GQA; no bias."""

    complexity = "O(T·m·D)"

    def __init__(self, cfg: PerformerConfig, **kw):
        super().__init__(cfg, **kw)
        self.register_buffer("weight", self._draw(0))  # (m, D)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # training forwards seen
        self._seen: int | None = 0  # python mirror of `draws` (None after loading: read once)

    def _draw(self, n: int) -> Tensor:
        g = torch.Generator().manual_seed((self.cfg.seed * 10007 + self.layer) * 1000003 + n)
        return orthogonal_gaussian(self.cfg.features, self.d_head, g)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._seen = None

    @property
    def stabilised(self) -> bool:
        return True

    def n_features(self) -> int:
        return self.cfg.features

    def features(self, x: Tensor, *, query: bool) -> tuple[Tensor, Tensor | None]:
        x = x * self.d_head ** -0.25
        logits = x @ self.weight.to(x.dtype).T - (x * x).sum(-1, keepdim=True) / 2 \
            - 0.5 * math.log(self.cfg.features)  # (..., m) = log φ
        top = logits.amax(-1).detach()  # (...,)
        psi = torch.exp(logits - top[..., None])
        return psi, (None if query else top)

    def checkpoint_problem(self) -> str | None:
        if not self.cfg.redraw:
            return None
        return ("'performer' with redraw > 0 counts its training forwards to draw new random features, "
                "so the recomputed forward would count twice and may use other features; set "
                "model.attention.redraw = 0")

    def _maybe_redraw(self) -> None:
        if not (self.training and self.cfg.redraw and torch.is_grad_enabled()):
            return
        if self._seen is None:
            self._seen = int(self.draws.item())
        self._seen += 1
        self.draws.fill_(self._seen)
        if self._seen % self.cfg.redraw == 0:
            self.weight.copy_(self._draw(self._seen // self.cfg.redraw))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        self._maybe_redraw()
        return super().forward(q, k, v, spec)
