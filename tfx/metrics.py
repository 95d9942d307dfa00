"""Metrics as pure functions of summed statistics."""
from __future__ import annotations

import math


def lm_metrics(nll_sum: float, tokens: int, n_bytes: int | None = None) -> dict:
    """Mean loss (nats/token), perplexity and bits per byte (comparable across tokenizers)."""
    loss = nll_sum / max(tokens, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    if n_bytes:
        out["bits_per_byte"] = nll_sum / math.log(2) / n_bytes
    return out


def classification_metrics(predicted: list[int], gold: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows = gold, columns = predicted)."""
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for p, g in zip(predicted, gold):
        confusion[g][p] += 1
    per_class = {}
    for i, name in enumerate(labels):
        tp = confusion[i][i]
        pred_i = sum(confusion[r][i] for r in range(n))
        gold_i = sum(confusion[i])
        precision = tp / pred_i if pred_i else 0.0
        recall = tp / gold_i if gold_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": gold_i}
    total = len(gold)
    return {
        "accuracy": sum(confusion[i][i] for i in range(n)) / total if total else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / n if n else 0.0,
        "examples": total,
        "per_class": per_class,
        "labels": labels,
        "confusion": confusion,
    }
