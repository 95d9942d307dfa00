"""Scoring a token stream with a causal LM, with a sliding window for texts past the context."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) of each window over n tokens: every token 1..n-1 scored once.

    A window feeds ids[start:end] and predicts ids[start+1:end+1]; it scores only the targets
    not scored by an earlier window, so each keeps up to context - stride tokens of left context.
    """
    out, scored = [], 1  # target index of the next unscored token
    start = 0
    while scored < n:
        end = min(start + context, n - 1)
        out.append((start, end, scored - 1 - start))
        scored = end + 1
        start += stride  # stride <= context, so the next window reaches the next unscored token
    return out


@torch.no_grad()
def score_stream(model, ids: torch.Tensor, *, context: int, stride: int | None = None, batch_size: int = 32,
                 device: str | torch.device = "cpu", max_tokens: int | None = None, autocast=None) -> tuple[float, int]:
    """Summed next-token NLL (nats) and the number of tokens scored, over ids[1:]."""
    stride = min(stride or context, context)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    spans = windows(ids.numel(), context, stride)
    # Windows of equal length run as one batch; only the last one can be shorter.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            rows = torch.stack([ids[s:e + 1] for s, e, _ in chunk]).long().to(device)  # (b, length + 1)
            target = rows[:, 1:].clone()
            for r, (_, _, first) in enumerate(chunk):
                target[r, :first] = -100
            with autocast() if autocast else torch.autocast("cpu", enabled=False):
                logits, _ = model(rows[:, :-1])
            nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
            total += nll.double()
            count += int((target != -100).sum())
    model.train(was_training)
    return float(total), count


@torch.no_grad()
def score_stream_recurrent(model, ids: torch.Tensor, *, segment: int, lanes: int = 32,
                           device: str | torch.device = "cpu", max_tokens: int | None = None,
                           autocast=None, new_state=None) -> tuple[float, int]:
    """score_stream for a model that carries a state along the text (an XL memory, or a sink
    cache from `new_state(lanes)`): the text as `lanes` contiguous lanes read segment by segment
    with the state carried, every token 1..n-1 scored once."""
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    was_training = model.training
    model.eval()
    ids = ids.long().to(device)
    n = ids.numel()
    lanes = max(1, min(lanes, (n - 1) // segment))
    lane_len = (n - 1) // lanes
    starts = torch.arange(lanes, device=device)[:, None] * lane_len
    inputs = ids[starts + torch.arange(lane_len, device=device)]  # (lanes, lane_len)
    targets = ids[starts + 1 + torch.arange(lane_len, device=device)]
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    state = new_state(lanes) if new_state is not None else model.stack.new_memory()

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        nonlocal state, total, count
        for s in range(0, x.shape[1], segment):
            with autocast() if autocast else torch.autocast("cpu", enabled=False):
                logits, state = model(x[:, s:s + segment], state)
            total += F.cross_entropy(logits.float().flatten(0, 1), y[:, s:s + segment].flatten(),
                                     reduction="sum").double()
            count += y[:, s:s + segment].numel()

    run(inputs, targets)
    rest = lanes * lane_len  # tokens past the last lane continue it
    if rest < n - 1:
        state.reorder(torch.tensor([lanes - 1], device=device))
        run(ids[rest:n - 1][None], ids[rest + 1:n][None])
    model.train(was_training)
    return float(total), count
