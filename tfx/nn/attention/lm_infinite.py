"""LM-Infinite (Han et al., 2023): a Λ-shaped attention pattern with a ceiling on distances, so that a
model trained on windows of L tokens reads (and generates) text of any length without new weights.

Pattern, on absolute positions, causal: query i sees key j iff 0 <= i - j < window (the local branch,
the window keys up to i) or j < global_tokens (the global branch: the text's first tokens). Distances:
a pair of the local branch keeps its distance i - j; a global key outside the window (i - j >= window)
is scored as if the query stood at position min(i, ceiling), so its distance min(i, ceiling) - j never
exceeds the ceiling (the paper's distance limit; with the default ceiling = window = the training
context, no distance is ever larger than any seen in training). The attention module computes those
far queries through the run's own position scheme (rotation, bias, per-layer adjustment;
tfx/nn/layers.py, `Attention.far_queries`) and hands them over in `AttnSpec.far`; the kernel merges
the local band and the far branch in one softmax (tfx.nn.attention.gathered), so time and memory are
O(T·(window + global_tokens)). Relative position schemes only: with absolute ones there is no distance
to cap.

Where no far queries are given (a recipe scheme without distances, or a caller outside an attention
module), every global key is scored at its true distance.
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from tfx.nn.attention.base import AttentionKernel, AttnSpec
from tfx.nn.attention.gathered import Part, banded_index, gathered_attention, offset
from tfx.registry import ATTENTION, KindConfig


class LMInfiniteConfig(KindConfig):
    kind: str = "lm_infinite"
    global_tokens: int = Field(4, ge=0, description="the first tokens of the text, seen by every query")
    window: int | None = Field(None, ge=1, description="the local branch: keys with 0 <= i - j < window "
                               "(default: the training context)")
    ceiling: int | None = Field(None, ge=1, description="the largest distance a global key is scored at "
                                "(default: the window)")

    @model_validator(mode="after")
    def _ceiling_covers_window(self):
        if self.window is not None and self.ceiling is not None and self.ceiling < self.window:
            raise ValueError(f"ceiling ({self.ceiling}) must be at least the window ({self.window}): the local "
                             f"branch keeps distances up to window - 1")
        return self


@ATTENTION.register("lm_infinite", config=LMInfiniteConfig)
class LMInfiniteAttention(AttentionKernel):
    """A local window plus the first global_tokens keys, the global keys at capped distances."""

    supports_bidirectional = False
    needs_relative = True  # `tfx recipe kinds` lists the relative schemes only (check_recipe says why)
    complexity = "O(T·(w + g))"

    def __init__(self, cfg, **kwargs):
        super().__init__(cfg, **kwargs)
        self.window = cfg.window or self.max_len
        self.global_tokens = cfg.global_tokens
        self.ceiling = cfg.ceiling or self.window
        if self.ceiling < self.window:
            raise ValueError(f"lm_infinite: ceiling ({self.ceiling}) must be at least the window ({self.window})")

    @staticmethod
    def check_recipe(att, model) -> list[str]:
        from tfx.registry import POSITION

        out = []
        pos = model.position.kind
        if not POSITION.get(pos).relative:
            out.append(f"'lm_infinite' caps the distances of a relative position scheme (rope, alibi, t5, xl, "
                       f"none); {pos!r} places tokens at absolute positions, which have no distance to cap")
        if model.memory.kind != "none":
            out.append(f"'lm_infinite' keeps the text's first tokens as its global keys; a segment memory "
                       f"({model.memory.kind!r}) starts each segment past them")
        return out

    def allowed(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        qp, kp = q_pos[:, None], k_pos[None, :]
        return ((qp - kp) < self.window) | (kp < self.global_tokens)

    def far_positions(self, q_pos: Tensor) -> Tensor | None:
        """Where each query stands for the global keys outside its window: min(i, ceiling)."""
        return q_pos.clamp(max=self.ceiling) if self.global_tokens else None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec) -> Tensor:
        Tq, Tk = q.shape[2], k.shape[2]
        w = self.window
        block = max(1, min(w, Tq))
        q_idx, k_idx = banded_index(Tq, offset(spec), reach=w, dilation=1, block=block, causal=True)
        parts = [Part(q_idx[None], k_idx[None], lambda qp, kp: (qp - kp) < w)]
        G = min(self.global_tokens, Tk)
        if G:
            far_q, far_bias = spec.far if spec.far is not None else (q, None)
            if spec.far is None and spec.bias is not None:
                far_bias = spec.bias[..., :G]
            mask = spec.key_padding_mask[:, :G] if spec.key_padding_mask is not None else None
            far_spec = AttnSpec(q_pos=spec.q_pos, k_pos=spec.k_pos[:G], causal=True, key_padding_mask=mask,
                                bias=far_bias)
            device = q.device
            parts.append(Part(torch.arange(Tq, device=device).view(1, 1, Tq), torch.arange(G, device=device).view(1, 1, G),
                              lambda qp, kp: ((qp - kp) >= w) & (kp < self.global_tokens),
                              inputs=(far_q, k[:, :, :G], v[:, :, :G], far_spec)))
        return gathered_attention(q, k, v, spec, parts, dropout=self.dropout if self.training else 0.0)


def swap_overrides(recipe, global_tokens: int) -> list[str]:
    """The recipe overrides that read a dense-attention LM run with LM-Infinite (`--lm-infinite` of eval
    and generate: the paper applies it to a trained model without new weights; the window and the ceiling
    are the run's training context). UsageError where the run cannot take it."""
    from tfx.errors import UsageError

    m = recipe.model
    if m.attention_layers or m.attention.kind != "dense" or getattr(m.attention, "adaptive_span", False):
        kind = "per-layer attention" if m.attention_layers else f"attention kind {m.attention.kind!r}"
        raise UsageError(f"--lm-infinite replaces a dense attention that has no weights of its own; this run has {kind}"
                         + (" with an adaptive span" if getattr(m.attention, "adaptive_span", False) else ""))
    return [f'model.attention={{kind = "lm_infinite", global_tokens = {global_tokens}}}']


def reads_any_length(model) -> bool:
    """Whether every self-attention of `model` is LM-Infinite's: its KV cache may grow past the context."""
    from tfx.nn.layers import Attention

    kernels = [m.kernel for m in model.modules() if isinstance(m, Attention)]
    return bool(kernels) and all(isinstance(k, LMInfiniteAttention) for k in kernels)
