"""The kNN-LM's keys (Khandelwal et al., 2020): the input of the last block's feed-forward sublayer,
captured with a forward pre-hook, and the (position, key, LM log-prob, target) of every scored token."""
from __future__ import annotations

import torch
from torch import Tensor

from tfx.errors import UsageError


def key_module(model) -> torch.nn.Module:
    """The module whose input is the kNN-LM key: the last block's feed-forward sublayer."""
    if not getattr(model, "knn_keys", True):
        raise UsageError(f"kNN-LM: a {type(model).__name__} run has no one state per token in one stack to key "
                         "a datastore with")
    try:
        return model.stack.blocks[-1].ffn
    except (AttributeError, IndexError):
        raise UsageError("kNN-LM needs a decoder-only LM run (a model with stack.blocks[-1].ffn)") from None


def key_dim(model) -> int:
    return key_module(model).up.in_features


class KeyCapture:
    """Context manager: while open, `.keys` is the last forward's (B, T, d) input to the final
    block's feed-forward sublayer (a forward pre-hook; removed on exit)."""

    def __init__(self, model):
        self.module, self.keys, self.handle = key_module(model), None, None

    def _hook(self, module, args):
        self.keys = args[0].detach()

    def __enter__(self) -> "KeyCapture":
        self.handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        self.keys = None


@torch.no_grad()
def scored_positions(model, ids: Tensor, *, context: int, stride: int | None = None, batch_size: int = 32,
                     device="cpu", max_tokens: int | None = None):
    """Yield (target index (n,), key (n, d) float32, LM log-prob of the target (n,) float64, target (n,))
    per batch of windows: every target ids[1:] once, with the left context score_stream gives it."""
    from tfx.evaluate import windows

    stride = min(stride or context, context)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    was_training = model.training
    model.eval()
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in windows(ids.numel(), context, stride):
        groups.setdefault(span[1] - span[0], []).append(span)
    try:
        with KeyCapture(model) as capture:
            for length, group in groups.items():
                for i in range(0, len(group), batch_size):
                    chunk = group[i:i + batch_size]
                    rows = torch.stack([ids[s:e + 1] for s, e, _ in chunk]).long().to(device)  # (b, L + 1)
                    logits, _ = model(rows[:, :-1])  # (b, L, V)
                    target = rows[:, 1:]  # (b, L)
                    lp = logits.float().log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)  # (b, L)
                    at = torch.arange(length, device=device)
                    scored = at[None, :] >= torch.tensor([f for _, _, f in chunk], device=device)[:, None]
                    pos = torch.tensor([s for s, _, _ in chunk], device=device)[:, None] + 1 + at  # (b, L)
                    yield (pos[scored].cpu(), capture.keys[scored].float(), lp[scored].double().cpu(),
                           target[scored].cpu())
    finally:
        model.train(was_training)
