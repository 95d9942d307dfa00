"""kNN-LM (Khandelwal et al., 2020): an LM interpolated with a nearest-neighbour distribution over
a datastore of (context key, next token) pairs (tfx.knn.datastore).

The key of a position is the input of the last block's feed-forward sublayer (the paper's choice;
in tfx's pre-norm Block that is `norm2(x)` of `model.stack.blocks[-1]`). `KeyCapture` records it
with a forward pre-hook on that FeedForward module, so no model class changes. For a query key
with k retrieved neighbours (d_i squared L2 distance, v_i the stored next token):

    p_knn(w) = sum_{i: v_i = w} exp(-d_i / T) / sum_i exp(-d_i / T)
    p(w)     = lambda * p_knn(w) + (1 - lambda) * p_lm(w)

computed in log space (logsumexp, logaddexp) in float64. lambda = 0 returns the LM's log-probs
themselves (short-circuited, so exactly), and so does a query with no neighbour found.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from tfx.errors import UsageError
from tfx.knn.keys import KeyCapture, key_dim, key_module, scored_positions  # noqa: F401  (re-exported)

LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
KS = (8, 16, 32, 64, 128, 256, 512, 1024)  # up to the paper's k = 1024
# Temperatures, times the median nearest-neighbour distance: 1/16 ... 16 in steps of sqrt(2).
T_FACTORS = tuple(2 ** (i / 2) for i in range(-8, 9))


@dataclass(frozen=True)
class KNNSettings:
    """Interpolation weight, neighbours and temperature; for an IVF-PQ index, nprobe (None = the
    store's) and the candidates its codes retrieve for exact re-ranking (None = k)."""

    lam: float = 0.25
    k: int = 32
    temperature: float = 1.0
    nprobe: int | None = None
    candidates: int | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        return {"lambda": d.pop("lam"), **d}


# ----------------------------------------------------------------------------- the distribution

def knn_target_logprob(dists: Tensor, vals: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """log p_knn(target) per row: dists (N, k) (inf = no neighbour), vals (N, k), targets (N,)
    -> (N,) float64; -inf where no neighbour holds the target, nan where no neighbour was found."""
    k = dists.shape[1]
    return knn_target_logprob_grid(dists, vals, targets, [temperature], [k])[temperature, k]


def knn_target_logprob_grid(dists: Tensor, vals: Tensor, targets: Tensor, temperatures, ks,
                            rows: int = 8192) -> dict[tuple[float, int], Tensor]:
    """knn_target_logprob for every temperature T and every k (the first k neighbours of each row)
    at once, keyed (T, k) (tune's grid): per T, cumulative sums of the weights exp(-(d - d_min) / T)
    along the neighbours, whose k-th entries are the k-neighbour sums. Subtracting each row's
    nearest distance keeps every weight in (0, 1] without changing the ratio; neighbours come
    nearest first (as faiss gives them), so no prefix's weights all underflow. The distances'
    offsets and the target matches are computed once per block of `rows` rows."""
    out = {(t, k): torch.empty(dists.shape[0], dtype=torch.float64) for t in temperatures for k in ks}
    for start in range(0, dists.shape[0], rows):
        d = dists[start:start + rows].double()
        nearest = d.amin(-1, keepdim=True)
        offset = torch.where(torch.isfinite(nearest), nearest, torch.zeros_like(nearest)) - d  # <= 0; -inf: missing
        match = vals[start:start + rows] == targets[start:start + rows, None]
        for t in temperatures:
            w = torch.exp(offset / t)  # 0 for a missing neighbour
            norm = w.cumsum(-1)
            hit = w.mul_(match).cumsum_(-1)
            for k in ks:
                n = norm[:, k - 1]
                out[t, k][start:start + rows] = (hit[:, k - 1].log() - n.log()).masked_fill(n == 0, float("nan"))
    return out


def knn_logprobs(dists: Tensor, vals: Tensor, vocab: int, temperature: float) -> Tensor:
    """log p_knn over the vocabulary: (N, k), (N, k) -> (N, V) float64 (nan rows: no neighbour)."""
    scores = -dists.double() / temperature  # (N, k)
    norm = torch.logsumexp(scores, -1, keepdim=True)  # (N, 1)
    weights = (scores - norm).exp().nan_to_num(0.0)  # (N, k), softmax; 0 for a missing neighbour
    p = torch.zeros(dists.shape[0], vocab, dtype=torch.float64).scatter_add_(1, vals.clamp(min=0), weights)
    return p.log().masked_fill(torch.isneginf(norm), float("nan"))


def interpolate(lm: Tensor, knn: Tensor, lam: float) -> Tensor:
    """log(lam * p_knn + (1 - lam) * p_lm) from log-probs; lam = 0 and nan (no neighbour) rows give lm."""
    if lam == 0:
        return lm
    mixed = torch.logaddexp(knn + math.log(lam), lm.double() + (math.log1p(-lam) if lam < 1 else float("-inf")))
    return torch.where(torch.isnan(knn), lm.double(), mixed)


# ----------------------------------------------------------------------------- scoring a text

def _retrieved(model, store, ids, *, k: int, nprobe, candidates, context, stride, batch_size, device, max_tokens,
               queries: int = 8192, log=None):
    """Yield (target index, LM log-prob, dists, values, target) per group of about `queries` tokens
    (faiss searches a large batch of queries much faster than many small ones); with `log`, progress
    goes there (a bar on a terminal)."""
    from tfx.knn.datastore import Meter

    buffer: list[tuple] = []
    total = min(ids.numel() - 1, max_tokens if max_tokens is not None else ids.numel())
    meter = Meter(total, "knn retrieve", log or (lambda line: None))

    def flush():
        pos, key, lp, target = (torch.cat([b[i] for b in buffer]) for i in range(4))
        buffer.clear()
        dists, vals = store.search(key, k, nprobe=nprobe, candidates=candidates)
        meter.advance(len(pos))
        return pos, lp, dists, vals, target

    with meter if log else nullcontext():
        for part in scored_positions(model, ids, context=context, stride=stride, batch_size=batch_size,
                                     device=device, max_tokens=max_tokens):
            buffer.append(part)
            if sum(len(b[0]) for b in buffer) >= queries:
                yield flush()
        if buffer:
            yield flush()


def knn_token_logprobs(model, store, ids: Tensor, settings: KNNSettings, *, context: int, stride: int | None = None,
                       batch_size: int = 32, device="cpu", max_tokens: int | None = None,
                       log=None) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of ids[1:] (in text order, float64): (the LM's, the interpolated ones);
    progress of the retrieval to `log`."""
    n = min(ids.numel() - 1, max_tokens if max_tokens is not None else ids.numel())
    lm, mixed = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    if settings.lam == 0:  # no retrieval needed: the LM's log-probs are the answer
        for pos, _, lp, _ in scored_positions(model, ids, context=context, stride=stride, batch_size=batch_size,
                                              device=device, max_tokens=max_tokens):
            lm[pos - 1] = lp
        return lm, lm.clone()
    for pos, lp, dists, vals, target in _retrieved(model, store, ids, k=settings.k, nprobe=settings.nprobe,
                                                   candidates=settings.candidates, context=context, stride=stride,
                                                   batch_size=batch_size, device=device, max_tokens=max_tokens,
                                                   log=log):
        lm[pos - 1] = lp
        mixed[pos - 1] = interpolate(lp, knn_target_logprob(dists, vals, target, settings.temperature), settings.lam)
    return lm, mixed


def tune(model, store, ids: Tensor, *, context: int, stride: int | None = None, batch_size: int = 32, device="cpu",
         max_tokens: int | None = None, nprobe: int | None = None, candidates: int | None = None,
         log=print) -> dict:
    """Grid search of lambda x k x temperature on a text; retrieves once with the largest k (so with
    `candidates` re-ranked, every k reads the nearest of the same candidates).

    Returns {"base": lm loss/perplexity, "grid": rows sorted by perplexity, "temperatures": the grid}.
    """
    ks = [k for k in KS if k <= store.count] or [store.count]
    parts = list(_retrieved(model, store, ids, k=max(ks), nprobe=nprobe, candidates=candidates, context=context,
                            stride=stride, batch_size=batch_size, device=device, max_tokens=max_tokens, log=log))
    lm = torch.cat([p[1] for p in parts])
    dists, vals, target = (torch.cat([p[i] for p in parts]) for i in (2, 3, 4))
    n = lm.numel()
    nearest = dists[:, 0][torch.isfinite(dists[:, 0]) & (dists[:, 0] > 0)]
    scale = float(nearest.median()) if nearest.numel() else store.meta.get("typical_distance", 1.0)
    temps = sorted({float(f"{scale * f:.3g}") for f in T_FACTORS} | {1.0})
    log(f"knn tune: {n:,} tokens, {len(LAMBDAS)} lambdas x {len(ks)} k x {len(temps)} temperatures "
        f"(median nearest distance {scale:.4g})")
    base = -float(lm.sum()) / n
    rows = []
    for (temp, k), knn in knn_target_logprob_grid(dists, vals, target, temps, ks).items():
        for lam in LAMBDAS:
            loss = -float(interpolate(lm, knn, lam).sum()) / n
            rows.append({"lambda": lam, "k": k, "temperature": temp, "loss": loss,
                         "perplexity": math.exp(min(loss, 700.0))})
    rows.sort(key=lambda r: r["loss"])
    return {"base": {"loss": base, "perplexity": math.exp(min(base, 700.0))}, "tokens": n, "grid": rows,
            "temperatures": temps, "ks": ks, "lambdas": list(LAMBDAS)}


# ----------------------------------------------------------------------------- settings, generation

def resolve_settings(store, *, lam: float | None = None, k: int | None = None, temperature: float | None = None,
                     nprobe: int | None = None, candidates: int | None = None, log=print) -> KNNSettings:
    """Defaults < RUN/knn/settings.json (from tfx knn tune) < explicit values, validated."""
    saved = store.saved_settings()
    base = {"lam": 0.25, "k": 32, "temperature": store.meta.get("typical_distance", 1.0), "nprobe": None,
            "candidates": None}
    if saved:
        base.update(lam=saved["lambda"], k=saved["k"], temperature=saved["temperature"],
                    nprobe=saved.get("nprobe"), candidates=saved.get("candidates"))
        if saved.get("store") != store.meta.get("created"):
            log("note: RUN/knn/settings.json was tuned on an earlier datastore; run tfx knn tune again")
    elif lam is None or k is None or temperature is None:
        log("note: no tuned kNN settings (run tfx knn tune); using defaults for the rest")
    given = {"lam": lam, "k": k, "temperature": temperature, "nprobe": nprobe, "candidates": candidates}
    base.update({key: v for key, v in given.items() if v is not None})
    if not 0 <= base["lam"] <= 1:
        raise UsageError(f"--lambda {base['lam']}: expected a weight in [0, 1]")
    if base["k"] <= 0 or base["temperature"] <= 0 or any(base[key] is not None and base[key] <= 0
                                                          for key in ("nprobe", "candidates")):
        raise UsageError("--k, --temperature, --nprobe and --candidates must be positive")
    base["k"] = min(int(base["k"]), store.count)
    return KNNSettings(lam=float(base["lam"]), k=base["k"], temperature=float(base["temperature"]),
                       nprobe=base["nprobe"], candidates=base["candidates"])


class KNNAdjuster:
    """The generation hook: `generate_ids(..., adjust_logprobs=adjuster)` inside `with adjuster:`.

    Called with the (B, V) log-probs of the last position, it reads that position's key from the
    KeyCapture (with a KV cache the forward computes only the new token, whose FFN input is the
    key) and returns the interpolated log-probs.
    """

    def __init__(self, model, store, settings: KNNSettings):
        self.store, self.settings = store, settings
        self.capture = KeyCapture(model)

    def __enter__(self) -> "KNNAdjuster":
        self.capture.__enter__()
        return self

    def __exit__(self, *exc):
        self.capture.__exit__(*exc)

    def __call__(self, logprobs: Tensor) -> Tensor:
        s = self.settings
        if s.lam == 0:
            return logprobs
        key = self.capture.keys[:, -1]  # (B, d)
        dists, vals = self.store.search(key, s.k, nprobe=s.nprobe, candidates=s.candidates)
        knn = knn_logprobs(dists, vals, logprobs.shape[-1], s.temperature)  # (B, V)
        return interpolate(logprobs.double().cpu(), knn, s.lam).to(logprobs.device, logprobs.dtype)
