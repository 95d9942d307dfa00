"""The output projection and a summed (label-smoothed) cross-entropy, fused and computed in chunks
of rows, so that no (tokens x vocabulary) tensor is ever materialised.

For logits x = h W^T of a row, target t and smoothing e, the row's loss is

    (1 - e) * (lse(x) - x_t) + e * mean_v (lse(x) - x_v) = lse(x) - (1 - e) * x_t - e * mean(x)

and its gradient in x is g = softmax(x) - (1 - e) * onehot(t) - e / V, so dL/dh = g W and
dL/dW = g^T h. As the loss ends the graph, the forward pass computes those gradients chunk by
chunk (for an upstream gradient of 1; backward scales them), each chunk's logits living only in a
buffer of a few MiB. Unfused, a translation batch (4k target tokens x 8k vocabulary) writes and
re-reads several 125 MiB tensors per step (logits, log-softmax, the scattered NLL gradient, the
smoothing gradient, their sum), each a fresh allocation that the CPU pays for in page faults.
Rows whose target is `ignore_index` take no loss and no gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MiB of float32, below glibc's largest mmap threshold


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, target: Tensor, smoothing: float, ignore_index: int,
                chunk: int) -> Tensor:
        N, V = h.shape[0], weight.shape[0]
        keep = target != ignore_index  # (N,)
        safe = target.masked_fill(~keep, 0)
        grads = any(ctx.needs_input_grad[:2])
        grad_h = torch.empty_like(h) if grads else None
        grad_w = torch.zeros_like(weight) if grads else None
        acc = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 for float64 inputs
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, N, chunk):
            hc, tc, kc = h[s:s + chunk], safe[s:s + chunk, None], keep[s:s + chunk].to(acc)
            x = (hc @ weight.T).to(acc)  # (c, V) logits
            x.sub_(x.amax(-1, keepdim=True))  # shifted; the shift cancels in the loss below
            rows = -(1 - smoothing) * x.gather(1, tc).squeeze(1)
            if smoothing:
                rows = rows - smoothing * x.mean(-1)
            z = x.exp_().sum(-1)  # (c,)
            total += ((rows + z.log()) * kc).sum()
            if grads:
                x.mul_((kc / z)[:, None])  # softmax, zero on ignored rows
                if smoothing:
                    x.sub_(kc[:, None] * (smoothing / V))
                x.scatter_add_(1, tc, (kc * (smoothing - 1))[:, None])
                x = x.to(h.dtype)
                grad_h[s:s + chunk] = x @ weight
                grad_w += x.T @ hc  # not addmm_: FlopCounterMode (tfx bench) misses in-place addmm
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, *, label_smoothing: float = 0.0,
                         ignore_index: int = -100, chunk: int | None = None) -> Tensor:
    """sum over rows of cross_entropy(h (N, d) @ weight (V, d)^T, target (N,), label_smoothing),
    ignored rows skipped: F.cross_entropy(F.linear(h, weight), ..., reduction="sum") in chunks of
    `chunk` rows (default: about 4M logits), the same value and gradients (tested)."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing {label_smoothing}: expected a value in [0, 1]")
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, target, float(label_smoothing), ignore_index, chunk)
