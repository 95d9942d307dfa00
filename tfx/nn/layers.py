"""Norm, FeedForward, Attention (projections, heads, cache) and the pre-norm (or post-norm) Block."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from tfx.nn.dropout import Dropout
from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.positions import PositionScheme
from tfx.nn.state import KVCache


class RMSNorm(nn.Module):
    """Root-mean-square normalisation without centring (Zhang & Sennrich, 2019)."""

    def __init__(self, d: int, *, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: str, d: int, *, eps: float, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(d, eps=eps)
    return nn.LayerNorm(d, eps=eps, bias=bias)


def frozen(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) with gradients stopped into the module's parameters (not into x)."""
    return functional_call(module, {k: p.detach() for k, p in module.named_parameters()}, (x,))


def default_d_ff(d_model: int, ffn: str) -> int:
    """4·d; for SwiGLU two thirds of that (same parameter count), rounded up to a multiple of 16."""
    if ffn == "swiglu":
        return -(-int(8 * d_model / 3) // 16) * 16
    return 4 * d_model


class FeedForward(nn.Module):
    """Position-wise MLP: GELU (exact or tanh-approximated), ReLU (Vaswani et al., 2017), SiLU, or
    SwiGLU (Shazeer, 2020); or
    EfficientViT's (Cai et al., 2023) with a depthwise convolution between its two layers
    (`dwconv`: up, GELU, depthwise conv over the grid or the sequence, GELU, down; tfx/nn/dwconv.py)."""

    def __init__(self, *, d_model: int, d_ff: int, kind: str, bias: bool, dropout: float, two_d: bool = False,
                 chunks: int = 1):
        super().__init__()
        self.kind, self.chunks = kind, chunks
        width = 2 * d_ff if kind == "swiglu" else d_ff  # SwiGLU: gate and value in one matmul
        self.up = nn.Linear(d_model, width, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = Dropout(dropout)
        if kind == "dwconv":
            from tfx.nn.dwconv import DepthwiseMix

            self.mix = DepthwiseMix(d_ff, two_d=two_d)

    @property
    def local(self) -> bool:
        """Mixes neighbouring positions (dwconv): a KV cache alone cannot extend it."""
        return self.kind == "dwconv"

    def forward(self, x: Tensor, spec: AttnSpec | None = None) -> Tensor:
        if self.chunks > 1 and x.shape[1] > 1:  # the Reformer's chunks: one slice of the sequence at a time
            return torch.cat([self.apply_to(part, spec) for part in x.chunk(self.chunks, dim=1)], dim=1)
        return self.apply_to(x, spec)

    def apply_to(self, x: Tensor, spec: AttnSpec | None = None) -> Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.kind == "relu":
            h = F.relu(h)
        elif self.kind == "silu":
            h = F.silu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "dwconv":
            h = F.gelu(self.mix(F.gelu(h), spec))
        else:
            h = F.gelu(h)
        return self.drop(self.down(h))


class Attention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads (MHA, GQA, MQA) and a pluggable kernel.

    Projects q, k, v in one matmul, applies the position scheme's rotation and per-layer
    adjustment, and hands tensors and the cache to the kernel.
    """

    def __init__(self, *, d_model: int, n_heads: int, n_kv_heads: int, d_head: int, bias: bool,
                 dropout: float, kernel: AttentionKernel, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * d_head, bias=bias)
        self.out = nn.Linear(n_heads * d_head, d_model, bias=bias)
        self.kernel = kernel
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, *, pos: PositionScheme, spec: AttnSpec, q_pos: Tensor,
                cache=None, memory: Tensor | None = None, recall=None) -> Tensor:
        """`memory` (B, M, d_model): normalised hidden states of earlier segments (Transformer-XL),
        whose keys and values precede the segment's; spec.k_pos then covers both. `recall(q, k, v, y)`
        gets the segment's own heads before any position scheme and the kernel's output, and returns
        the output to use (a Memorizing Transformer's kNN memory)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.d_head
        q, k, v = self.qkv(x).split((H * D, Hkv * D, Hkv * D), dim=-1)
        if recall is not None:
            heads = (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2),
                     v.view(B, T, Hkv, D).transpose(1, 2))
        if memory is not None:
            mk, mv = self.keys_values(memory)
            k, v = torch.cat([mk, k], dim=1), torch.cat([mv, v], dim=1)  # (B, M + T, Hkv * D)
        S = k.shape[1]
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
        every_key = memory is not None
        if getattr(cache, "keeps_raw_keys", False):  # a sink cache: every kept key, positioned anew
            k, v = cache.update(k, v)
            cache, every_key = None, True
        if (far_pos := self.kernel.far_positions(spec.q_pos)) is not None:  # LM-Infinite's global keys
            spec = dataclasses.replace(spec, far=self.far_queries(q, pos, spec, far_pos))
        q, k = pos.rotate(q, k, q_pos, spec.k_pos if every_key else q_pos)
        q, spec = pos.adjust(q, spec, self.layer)
        y = self.kernel.attend(q, k, v, spec, cache)  # (B, H, T, D)
        if recall is not None:
            y = recall(*heads, y)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.drop(self.out(y))

    def far_queries(self, q: Tensor, pos: PositionScheme, spec: AttnSpec,
                    q_pos: Tensor) -> tuple[Tensor, Tensor | None]:
        """LM-Infinite's far branch (tfx/nn/attention/lm_infinite.py): the (B, H, Tq, D) queries, before
        any position scheme, placed at `q_pos` (the kernel's capped positions) against the first global
        keys, through the scheme's rotation, bias and adjustment; and their (1|B, H, Tq, G) bias or None."""
        G = min(self.kernel.global_tokens, spec.k_pos.shape[0])
        k_pos = spec.k_pos[:G]
        q, _ = pos.rotate(q, q[:, :, :0], q_pos, k_pos[:0])
        far = AttnSpec(q_pos=q_pos, k_pos=k_pos, causal=True, bias=pos.bias(q_pos, k_pos))
        q, far = pos.adjust(q, far, self.layer)
        return q, far.bias

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x's (B, T, d_model) keys and values, each (B, T, Hkv * D), without the queries' projection."""
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.d_head
        bias = self.qkv.bias[H * D:] if self.qkv.bias is not None else None
        return F.linear(x, self.qkv.weight[H * D:], bias).split((Hkv * D, Hkv * D), dim=-1)

    def fill_cache(self, x: Tensor, *, pos: PositionScheme, spec: AttnSpec, q_pos: Tensor, cache) -> None:
        """Extend `cache` with x's (B, T, d_model) keys and values and compute nothing else (a layer an
        early-exited token skips, tfx/nn/early_exit.py). A kernel with a state of its own, or its own
        way of extending the cache, runs its whole attention instead, and the output is dropped."""
        if type(cache) is not KVCache or type(self.kernel).attend is not AttentionKernel.attend:
            self(x, pos=pos, spec=spec, q_pos=q_pos, cache=cache)
            return
        B, T, _ = x.shape
        k, v = (t.view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2) for t in self.keys_values(x))
        _, k = pos.rotate(k, k, q_pos, q_pos)  # (B, Hkv, T, D), as forward rotates them
        cache.update(k, v)

    def content(self, x: Tensor, memory: Tensor, *, causal: bool = False) -> tuple[Tensor, Tensor]:
        """Position-free attention of x's queries (B, T, d) over memory's keys and values (B, M, d),
        with gradients stopped into the projections: per-head outputs (B, H, T, D) and weights
        (B, H, T, M). `causal`: x is the last T positions of memory and sees none after its own.
        For the Compressive Transformer's reconstruction loss and memory usage."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.d_head
        w = self.qkv.weight.detach()
        b = self.qkv.bias.detach() if self.qkv.bias is not None else None
        q = F.linear(x, w[:H * D], b[:H * D] if b is not None else None).view(B, T, H, D).transpose(1, 2)
        kv = F.linear(memory, w[H * D:], b[H * D:] if b is not None else None)
        k, v = (t.view(B, -1, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1) for t in kv.chunk(2, -1))
        scores = q @ k.transpose(-1, -2) / D ** 0.5  # (B, H, T, M)
        if causal:
            M = memory.shape[1]
            seen = torch.arange(M, device=x.device)[None] <= torch.arange(M - T, M, device=x.device)[:, None]
            scores = scores.masked_fill(~seen, float("-inf"))
        probs = scores.softmax(-1)
        return probs @ v, probs


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention (Vaswani et al., 2017): queries from the decoder, keys and
    values from the encoder output, computed once per source and reused at every decoding step."""

    def __init__(self, *, d_model: int, n_heads: int, n_kv_heads: int, d_head: int, bias: bool,
                 dropout: float, kernel: AttentionKernel):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.q = nn.Linear(d_model, n_heads * d_head, bias=bias)
        self.kv = nn.Linear(d_model, 2 * n_kv_heads * d_head, bias=bias)
        self.out = nn.Linear(n_heads * d_head, d_model, bias=bias)
        self.kernel = kernel
        self.drop = Dropout(dropout)

    def project_source(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, d_model) encoder output -> this layer's keys and values, each (B, Hkv, S, D)."""
        B, S, _ = source.shape
        k, v = self.kv(source).chunk(2, dim=-1)
        k = k.view(B, S, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(B, S, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, Hkv, S, D)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], spec: AttnSpec) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, D)
        y = self.kernel(q, kv[0], kv[1], spec)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, H*D)
        return self.drop(self.out(y))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), [x + cross(norm(x), source)], x + ffn(norm(x)).
    `post=True`: the original post-norm "Add & Norm" block (Vaswani et al., 2017): x = norm(x +
    attn(x)), [x = norm(x + cross(x, source))], x = norm(x + ffn(x))."""

    def __init__(self, *, attn: Attention, ffn: FeedForward, norm: str, d_model: int, eps: float, bias: bool,
                 cross: CrossAttention | None = None, post: bool = False):
        super().__init__()
        self.post = post
        self.norm1 = make_norm(norm, d_model, eps=eps, bias=bias)
        self.attn = attn
        self.cross = cross
        self.norm_cross = make_norm(norm, d_model, eps=eps, bias=bias) if cross is not None else None
        self.norm2 = make_norm(norm, d_model, eps=eps, bias=bias)
        self.ffn = ffn

    def forward(self, x: Tensor, *, pos: PositionScheme, spec: AttnSpec, q_pos: Tensor,
                cache=None, cross_kv: tuple[Tensor, Tensor] | None = None,
                cross_spec: AttnSpec | None = None, memory: Tensor | None = None, recall=None) -> Tensor:
        if self.post:  # a memory holds earlier inputs of this layer, which are what its attention reads
            x = self.norm1(x + self.attn(x, pos=pos, spec=spec, q_pos=q_pos, cache=cache, memory=memory,
                                         recall=recall))
            if self.cross is not None:
                x = self.norm_cross(x + self.cross(x, cross_kv, cross_spec))
            return self.norm2(x + self.ffn(x, spec))
        memory = self.norm1(memory) if memory is not None else None
        x = x + self.attn(self.norm1(x), pos=pos, spec=spec, q_pos=q_pos, cache=cache, memory=memory, recall=recall)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), cross_kv, cross_spec)
        return x + self.ffn(self.norm2(x), spec)

    def fill_cache(self, x: Tensor, *, pos: PositionScheme, spec: AttnSpec, q_pos: Tensor, cache, **_) -> None:
        """Write x's keys and values into this layer's cache as its attention would read x, and
        nothing else (the state an early-exited token copies into the layers it skips)."""
        self.attn.fill_cache(x if self.post else self.norm1(x), pos=pos, spec=spec, q_pos=q_pos, cache=cache)

    def attention_input(self, x: Tensor) -> Tensor:
        """What the attention sublayer reads of x, with the norm's weights frozen: norm1(x) pre-norm,
        x itself post-norm."""
        return x if self.post else frozen(self.norm1, x)

    def frozen_attention(self, queries: Tensor | int, states: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's attention with its weights frozen and no positions (Attention.content), the
        queries from `queries` (B, T, d) and the keys and values from `states` (B, M, d), both
        read as the layer's attention reads its inputs (attention_input): per-head outputs (B, H, T, D) and weights
        (B, H, T, M). An int T: the last T states are the queries, each seeing none after itself.
        For the Compressive Transformer's memory usage and reconstruction loss."""
        x = self.attention_input(states)
        if isinstance(queries, int):
            return self.attn.content(x[:, -queries:], x, causal=True)
        return self.attn.content(self.attention_input(queries), x)
