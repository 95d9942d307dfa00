"""Subword sampling, seeded by tfx: BPE-dropout and unigram sampling as sentencepiece computes them.

sentencepiece samples segmentations itself (``encode(enable_sampling=True)``), but
``set_random_generator_seed`` repeats a sample within one process only (measured with sentencepiece
0.2.3: two processes with the same seed sample different ids; its wheel links absl, whose seed
sequences are salted per process), so a resumed run or another torchrun rank would see other
segmentations. Here sentencepiece still normalises the text,
holds the vocabulary and scores and, for ``nbest_size`` > 1, lists the n best segmentations; only the
random choices are tfx's, from Python's ``random.Random(seed)`` (whose ``random()`` sequence Python
keeps stable across versions), drawn text after text in order.

- bpe: BPE-dropout (Provilkov et al., 2020), sentencepiece's algorithm: repeatedly take the pair of
  adjacent symbols whose concatenation is the highest-scored piece (the leftmost on a tie) and skip
  that merge with probability alpha. alpha 0 gives ``encode``'s ids exactly; tests check it.
- unigram, nbest_size -1: forward-filtering backward-sampling over the lattice of all segmentations,
  P(segmentation) proportional to exp(alpha * sum of piece scores) (Kudo, 2018), with sentencepiece's
  nodes (every piece, and an unknown-character node scored min_score - 10 where no piece of one
  character fits). The lattice is cut at each word start ("▁" after another character) where no piece
  crosses one, and a word's forward table is kept, so a word seen again costs a few draws.
- unigram, nbest_size n: one of sentencepiece's n best segmentations, P proportional to
  exp(alpha * score), as sentencepiece does.
"""
from __future__ import annotations

import math
import random
from heapq import heappop, heappush

UNK_PENALTY = 10.0  # sentencepiece's kUnkPenalty: an unknown character's node scores min_score - 10
SPACE = "\u2581"


class SubwordSampler:
    """``sampler(lines, seed) -> ids of each line``: a sampled segmentation of every line, a function of
    (lines, seed) and the model alone."""

    def __init__(self, sp, *, model_type: str, alpha: float, nbest_size: int = -1):
        self.sp, self.model_type, self.alpha, self.nbest_size = sp, model_type, float(alpha), nbest_size
        self.unk = sp.unk_id()
        normal = [i for i in range(sp.get_piece_size())
                  if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
        self.ids = {sp.id_to_piece(i): i for i in normal}
        self.scores = {p: sp.get_score(i) for p, i in self.ids.items()}
        self.bytes = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        self.byte_fallback = self.bytes[65] != self.unk
        self.longest = max(map(len, self.ids), default=1)
        self.unk_score = min(self.scores.values(), default=0.0) - UNK_PENALTY
        self.words_apart = not any(c != SPACE and n == SPACE for p in self.ids for c, n in zip(p, p[1:]))
        self.tables: dict[str, tuple] = {}  # word -> what sampling it again needs (bpe: its best pieces)

    def __call__(self, lines: list[str], seed: int) -> list[list[int]]:
        rng = random.Random(seed).random
        if self.model_type == "bpe":
            return [self.ids_of(self.bpe_dropout(self.sp.normalize(line), rng)) for line in lines]
        if self.nbest_size > 1:
            return [self.nbest_choice(line, rng) for line in lines]
        return [self.ids_of(self.unigram_sample(self.sp.normalize(line), rng)) for line in lines]

    def ids_of(self, pieces: list[str]) -> list[int]:
        """sentencepiece's ids of final pieces: an unknown character is its UTF-8 bytes (byte fallback),
        or unk, a run of them one unk."""
        out: list[int] = []
        prev_unk = False
        for piece in pieces:
            i = self.ids.get(piece)
            if i is not None:
                out.append(i)
            elif self.byte_fallback:
                out.extend(self.bytes[b] for b in piece.encode("utf-8"))
            elif not prev_unk:
                out.append(self.unk)
            prev_unk = i is None
        return out

    def bpe_dropout(self, text: str, rng) -> list[str]:
        """sentencepiece's bpe_model SampleEncode on a normalised text, word by word (no piece crosses a
        word start), with tfx's draws: one per merge taken or skipped, as sentencepiece draws."""
        if not self.words_apart:
            return self.merge(text, self.first_pairs(text), [], rng)
        out: list[str] = []
        for word in self.words(text):
            known = self.tables.get(word)
            if known is None:
                pairs = self.first_pairs(word)
                best = self.merge(word, pairs, [], lambda: 1.0)
                known = self.tables[word] = (pairs, best, len(word) - len(best))
            pairs, best, merges = known
            draws = [rng() for _ in range(merges)]  # no merge dropped: the best pieces, after as many draws
            out.extend(best if all(d >= self.alpha for d in draws) else self.merge(word, pairs, draws, rng))
        return out

    def first_pairs(self, word: str) -> list[tuple]:
        """The heap of the merges of adjacent characters: (-score, left, size, right), sorted."""
        scores = self.scores
        return sorted((-scores[word[i:i + 2]], i, 2, i + 1)
                      for i in range(len(word) - 1) if word[i:i + 2] in scores)

    def merge(self, word: str, pairs: list[tuple], draws: list[float], rng) -> list[str]:
        """Merge the best pair first, each skipped when its draw (`draws` first, then rng()) is below alpha."""
        sym, n, scores, p = list(word), len(word), self.scores, self.alpha
        if n < 2:
            return sym
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        nxt[-1] = -1
        heap, taken = list(pairs), 0  # a sorted list is a heap
        while heap:
            _, left, size, right = heappop(heap)
            a, b = sym[left], sym[right]
            if not a or not b or len(a) + len(b) != size:  # stale
                continue
            draw = draws[taken] if taken < len(draws) else rng()
            taken += 1
            if draw < p:
                continue
            sym[left], sym[right] = a + b, ""
            after = nxt[left] = nxt[right]
            if after >= 0:
                prv[after] = left
            for lo, hi in ((prv[left], left), (left, after)):
                if lo >= 0 and hi >= 0:
                    merged = sym[lo] + sym[hi]
                    score = scores.get(merged)
                    if score is not None:
                        heappush(heap, (-score, lo, len(merged), hi))
        return [s for s in sym if s]

    def nbest_choice(self, line: str, rng) -> list[int]:
        """One of sentencepiece's n best segmentations of a line, P proportional to exp(alpha * score),
        a segmentation's score being the sum of its nodes' (an unknown character's: min_score - 10)."""
        nbests = self.sp.nbest_encode_as_pieces(line, nbest_size=self.nbest_size)
        if not nbests:
            return []
        ids = [[self.sp.piece_to_id(piece) for piece in pieces] for pieces in nbests]
        logits = [self.alpha * sum(self.node_score(piece, i) for piece, i in zip(pieces, row))
                  for pieces, row in zip(nbests, ids)]
        top = max(logits)
        return ids[_pick(_cumulative([math.exp(x - top) for x in logits]), rng())]

    def node_score(self, piece: str, i: int) -> float:
        """The lattice score of an n-best segmentation's piece (id `i`)."""
        if i == self.unk:  # a run of unknown characters, one node each
            return len(piece) * self.unk_score
        if self.sp.is_byte(i):  # byte fallback: an unknown character is one node, its first byte scores it
            return self.unk_score if int(piece[3:5], 16) & 0xC0 != 0x80 else 0.0
        return self.scores.get(piece, 0.0)

    def unigram_sample(self, text: str, rng) -> list[str]:
        """Forward-filtering backward-sampling over the unigram lattice of a normalised text."""
        out: list[str] = []
        for word in self.words(text):
            table = self.tables.get(word)
            if table is None:
                table = self.tables[word] = self.backward_choices(word)
            pos, pieces = len(word), []
            while pos > 0:
                cumulative, starts = table[pos]
                start = starts[_pick(cumulative, rng())]
                pieces.append(word[start:pos])
                pos = start
            out.extend(reversed(pieces))
        return out

    def words(self, text: str) -> list[str]:
        """The text cut before each word start ("▁" after another character), where no piece crosses one."""
        if not self.words_apart:
            return [text] if text else []
        cuts = [0] + [i for i in range(1, len(text)) if text[i] == SPACE and text[i - 1] != SPACE] + [len(text)]
        return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]

    def backward_choices(self, word: str) -> list:
        """For each end position: the cumulative probabilities of the nodes ending there and their starts,
        from the forward log-sums A[pos] = logsumexp over nodes ending at pos of A[start] + alpha * score."""
        n, theta = len(word), self.alpha
        ends: list[list[tuple[int, float]]] = [[] for _ in range(n + 1)]
        for b in range(n):
            single = False
            for length in range(1, min(self.longest, n - b) + 1):
                score = self.scores.get(word[b:b + length])
                if score is not None:
                    ends[b + length].append((b, score))
                    single = single or length == 1
            if not single:
                ends[b + 1].append((b, self.unk_score))
        forward, table = [0.0] * (n + 1), [None] * (n + 1)
        for pos in range(1, n + 1):
            terms = [forward[b] + theta * s for b, s in ends[pos]]
            top = max(terms)
            weights = [math.exp(t - top) for t in terms]
            forward[pos] = top + math.log(sum(weights))
            table[pos] = (_cumulative(weights), [b for b, _ in ends[pos]])
        return table


def _pick(cumulative: list[float], r: float) -> int:
    """The index that a uniform draw `r` picks from cumulative probabilities."""
    for i, c in enumerate(cumulative):
        if r < c:
            return i
    return len(cumulative) - 1  # rounding: the cumulative sum may end a hair below 1


def _cumulative(weights: list[float]) -> list[float]:
    total, acc, out = sum(weights), 0.0, []
    for w in weights:
        acc += w / total
        out.append(acc)
    return out
