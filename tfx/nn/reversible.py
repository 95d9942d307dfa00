"""Reversible residual layers (`model.reversible = true`; Gomez et al., 2017, RevNets; Kitaev et al.,
2020, the Reformer).

The stack carries two streams a and b, both starting as the embedded input. Its sublayers, in order
(each block's attention, cross-attention where there is one, feed-forward, each behind its pre-norm),
are additive couplings that alternate between the streams: sublayer j adds f_j(the other stream) to
stream j mod 2,

    a = a + attn(norm1(b)),   b = b + ffn(norm2(a)),   a = a + attn'(norm1'(b)),   ...

and the stack's output is (a + b) / 2, then the final norm. A coupling is undone from its output
(stream = stream - f_j(other)), so training keeps only the two final streams: the backward pass walks
the sublayers backwards, recomputes each one's input from its output, and runs that one sublayer
again with gradients (dropout replays its masks: the random state before each sublayer is kept).
The memory for activations is one sublayer's, whatever the depth. Generation and evaluation run the
same couplings forward with the usual caches.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

Sublayer = Callable[..., Tensor]  # f(x, *extras)


def sublayers(blocks, caches: list, cross_kvs: list, *, pos, spec, q_pos, cross_spec) -> list[tuple]:
    """Each block's sublayers as (f, its modules, extras), in the order they run: f(x, *extras) -> the
    update; extras are tensors it reads besides x (the encoder's keys and values for cross-attention)."""
    out: list[tuple] = []
    for block, cache, kv in zip(blocks, caches, cross_kvs):
        out.append((lambda x, b=block, c=cache: b.attn(b.norm1(x), pos=pos, spec=spec, q_pos=q_pos, cache=c),
                    [block.norm1, block.attn], []))
        if block.cross is not None:
            out.append((lambda x, k, v, b=block: b.cross(b.norm_cross(x), (k, v), cross_spec),
                        [block.norm_cross, block.cross], list(kv)))
        out.append((lambda x, b=block: b.ffn(b.norm2(x), spec), [block.norm2, block.ffn], []))
    return out


def streams(x: Tensor, fs: list[Sublayer], extras: list[list[Tensor]], before=None) -> tuple[Tensor, Tensor]:
    """The couplings run forward: sublayer j adds fs[j](the other stream, *extras[j]) to stream j mod 2;
    `before(j)` is called first at each (the autograd function keeps the random state there)."""
    a, b = x, x
    for j, f in enumerate(fs):
        if before is not None:
            before(j)
        if j % 2 == 0:
            a = a + f(b, *extras[j])
        else:
            b = b + f(a, *extras[j])
    return a, b


def couple(x: Tensor, layers: list[tuple]) -> Tensor:
    """The couplings run forward with autograd as usual: (B, T, d) -> (B, T, d)."""
    a, b = streams(x, [f for f, _, _ in layers], [e for _, _, e in layers])
    return (a + b) / 2


def reversible(x: Tensor, layers: list[tuple]) -> Tensor:
    """The couplings, keeping only the final streams for the backward pass (training). Every tensor a
    sublayer reads that needs a gradient (its weights, the encoder's keys and values) is an input of
    the autograd function, so its backward runs even when x needs none (frozen embeddings); the
    weights get their gradients in .grad, as a backward pass gives them, the other inputs through
    the function's return."""
    inputs: list[Tensor] = []
    index: dict[int, int] = {}

    def place(t: Tensor) -> int:
        if id(t) not in index:
            index[id(t)] = len(inputs)
            inputs.append(t)
        return index[id(t)]

    owned, extra = [], []
    for _, modules, extras in layers:
        owned.append(sorted({place(p) for m in modules for p in m.parameters() if p.requires_grad}))
        extra.append([place(t) for t in extras])
    a, b = Couplings.apply(x, [f for f, _, _ in layers], owned, extra, *inputs)
    return (a + b) / 2


def _rng(device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Couplings(torch.autograd.Function):
    """(x, sublayers, each one's weights and extras as indices into inputs, *inputs) -> the final
    streams (a, b)."""

    @staticmethod
    def forward(ctx, x, fs, owned, extra, *inputs):
        ctx.fs, ctx.owned, ctx.extra, ctx.n_inputs, ctx.rng = fs, owned, extra, len(inputs), []
        kind = x.device.type  # the backward pass recomputes under the same autocast as this forward
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        with torch.no_grad():
            a, b = streams(x, fs, [[inputs[i] for i in e] for e in extra],
                           before=lambda j: ctx.rng.append(_rng(x.device)))
        ctx.save_for_backward(a, b, *inputs)
        return a, b

    @staticmethod
    def backward(ctx, da, db):
        a, b, *inputs = ctx.saved_tensors
        a, b = a.detach(), b.detach()
        da = torch.zeros_like(a) if da is None else da
        db = torch.zeros_like(b) if db is None else db
        grads: list[Tensor | None] = [None] * ctx.n_inputs  # the extras' (the weights' go to .grad)
        now = _rng(a.device)
        kind, on, dtype = ctx.autocast
        for j in reversed(range(len(ctx.fs))):
            _set_rng(ctx.rng[j], a.device)
            other = (b if j % 2 == 0 else a).detach().requires_grad_(True)
            extras = [inputs[i].detach().requires_grad_(inputs[i].requires_grad) for i in ctx.extra[j]]
            weights = [inputs[i] for i in ctx.owned[j]]
            with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=on):
                out = ctx.fs[j](other, *extras)
            # backward (not autograd.grad, which module hooks such as FlopCounterMode's cannot run
            # under): the weights' .grad accumulates as in any backward pass; the input's and the
            # extras' gradients are read off their detached copies
            leaves = [other, *(e for e in extras if e.requires_grad), *weights]
            torch.autograd.backward(out, grad_tensors=(da if j % 2 == 0 else db).to(out.dtype), inputs=leaves)
            g_other = other.grad
            for i, e in zip(ctx.extra[j], extras):
                if e.requires_grad and e.grad is not None:
                    grads[i] = e.grad if grads[i] is None else grads[i] + e.grad
            with torch.no_grad():
                if j % 2 == 0:  # a = a_in + f(b): undo it; b's gradient gains f's
                    a = a - out
                    db = db + g_other if g_other is not None else db
                else:
                    b = b - out
                    da = da + g_other if g_other is not None else da
        _set_rng(now, a.device)
        return (da + db, None, None, None, *grads)


def reversible_problems(recipe, pos) -> list[str]:
    """Why a recipe cannot use `model.reversible = true` (empty when it can)."""
    m, t = recipe.model, recipe.train
    what = "model.reversible"
    out = []
    if m.memory.kind != "none":
        out.append(f"{what}: a segment memory ({m.memory.kind!r}) keeps each layer's input, which reversible "
                   "layers do not keep")
    if m.depth.kind != "layers" or m.block != "standard" or m.norm_position != "pre":
        out.append(f"{what} couples pre-norm residual sublayers; it does not combine with universal depth, the "
                   "simplified block or post-norm")
    if pos.learns_in_attention:
        out.append(f"{what}: {m.position.kind!r} has weights inside the attention scores, which the recomputing "
                   "backward pass does not reach; use rope, alibi, learned, sinusoidal or none")
    if t.activation_checkpointing:
        out.append(f"{what} already recomputes activations; set train.activation_checkpointing = false")
    if t.parallel == "fsdp":
        out.append(f"{what} runs its own backward pass over the blocks' weights, which FSDP shards; use "
                   "train.parallel = \"ddp\"")
    return out
