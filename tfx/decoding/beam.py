"""Greedy and batched beam search for encoder-decoder models.

The model provides `encode(src, src_mask)`, `new_state(source, source_mask, max_len)` and
`forward(tokens, state) -> (logits, state)`; the state's cross-attention keys/values are computed
once per source and reordered with the beams.

Scores are summed log-probabilities including the end-of-sentence token; a finished hypothesis is
ranked by score / length ** len_penalty, length counting the EOS (as fairseq does). A sentence
stops when `beam` hypotheses have finished; at the maximum length EOS is forced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float       # summed log-probability, EOS included
    normalized: float  # score / length ** len_penalty


def max_lengths(src_mask: Tensor, *, a: float, b: int, cap: int) -> list[int]:
    """Per sentence: a * source length + b target tokens at most (EOS included), capped."""
    return [max(1, min(cap, int(a * n + b))) for n in src_mask.sum(1).tolist()]


@torch.inference_mode()
def greedy(model, src: Tensor, src_mask: Tensor, *, bos: int, eos: int, max_len: list[int]) -> list[Hypothesis]:
    """Batched greedy decoding: the most likely token at every step."""
    B = src.shape[0]
    source = model.encode(src, src_mask)
    state = model.new_state(source, src_mask, max(max_len) + 1)
    last = torch.full((B, 1), bos, dtype=torch.long, device=src.device)
    tokens: list[list[int]] = [[] for _ in range(B)]
    scores = [0.0] * B
    alive = set(range(B))
    for step in range(max(max_len)):
        logp = model(last, state)[0][:, -1].double().log_softmax(-1)  # (B, V), as beam_search
        for b in range(B):
            if step + 1 >= max_len[b]:
                logp[b, :eos], logp[b, eos + 1:] = float("-inf"), float("-inf")
        best = logp.argmax(-1)  # (B,)
        for b in list(alive):
            t = int(best[b])
            scores[b] += float(logp[b, t])
            if t == eos:
                alive.discard(b)
            else:
                tokens[b].append(t)
        if not alive:
            break
        last = best[:, None]
    return [Hypothesis(t, s, s / (len(t) + 1)) for t, s in zip(tokens, scores)]


@torch.inference_mode()
def beam_search(model, src: Tensor, src_mask: Tensor, *, beam: int, bos: int, eos: int, max_len: list[int],
                len_penalty: float = 1.0, nbest: int = 1) -> list[list[Hypothesis]]:
    """The `nbest` best hypotheses per sentence, best first."""
    B, K = src.shape[0], beam
    source = model.encode(src, src_mask).repeat_interleave(K, 0)  # (B*K, S, d)
    state = model.new_state(source, src_mask.repeat_interleave(K, 0), max(max_len) + 1)
    device = src.device
    scores = torch.zeros(B, K, dtype=torch.float64, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    seqs = torch.full((B * K, 1), bos, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B

    def finish(b: int, tokens: list[int], score: float) -> None:
        length = len(tokens) + 1
        finished[b].append(Hypothesis(tokens, score, score / length ** len_penalty))

    for step in range(max(max_len)):
        logp = model(seqs[:, -1:], state)[0][:, -1].double().log_softmax(-1)  # (B*K, V)
        V = logp.shape[-1]
        for b in range(B):
            if step + 1 >= max_len[b]:  # the last allowed token must be EOS
                rows = slice(b * K, (b + 1) * K)
                logp[rows, :eos], logp[rows, eos + 1:] = float("-inf"), float("-inf")
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)  # (B, K*V)
        top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=-1)  # (B, 2K)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        next_scores = torch.full((B, K), float("-inf"), dtype=torch.float64, device=device)
        next_rows = torch.zeros(B, K, dtype=torch.long)
        next_tokens = torch.full((B, K), eos, dtype=torch.long)
        for b in range(B):
            if done[b]:
                next_rows[b] = b * K
                continue
            kept = 0
            for rank, (score, idx) in enumerate(zip(top_scores[b], top_idx[b])):
                if score == float("-inf") or kept == K:
                    break
                k, token = divmod(idx, V)
                if token == eos:
                    if rank < K:  # an EOS among the K best candidates ends a hypothesis
                        finish(b, seqs[b * K + k, 1:].tolist(), score)
                    continue
                next_scores[b, kept], next_rows[b, kept], next_tokens[b, kept] = score, b * K + k, token
                kept += 1
            for j in range(kept, K):  # pad with dead beams
                next_rows[b, j] = b * K
            done[b] = len(finished[b]) >= K or kept == 0
        if all(done):
            break
        flat = next_rows.view(-1).to(device)
        state.reorder(flat)
        seqs = torch.cat([seqs.index_select(0, flat), next_tokens.view(-1, 1).to(device)], dim=1)
        scores = next_scores
    return [sorted(f, key=lambda h: -h.normalized)[:nbest] for f in finished]
