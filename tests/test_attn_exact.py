"""Every exact kernel against the float64 oracle restricted to the kernel's own allowed() pattern:
causal and bidirectional, with padding, GQA, a cache offset and a bias where the kernel takes them.
A kernel registered as exact without an entry in EXACT fails the meta-test."""
from __future__ import annotations

import pytest
import torch

from tfx.config import import_kinds
from tfx.nn.attention.base import AttnSpec, reference_attention
from tfx.registry import ATTENTION

import_kinds()

# kind -> recipe parameters small enough that a 37-token sequence exercises every part of the pattern
EXACT: dict[str, dict] = {
    "dense": {},
    "local": {"window": 5},
    "strided": {"stride": 4},
    "fixed": {"block": 6, "summary": 2},
    "blockwise": {"n_blocks": 3, "block_size": 5, "shifts": [0, 1, 2]},
    "longformer": {"window": 3, "dilation": [1, 2], "global_tokens": [0, 17], "global_every": 0},
    "bigbird": {"block": 4, "window_blocks": 3, "global_blocks": 1, "random_blocks": 2, "seed": 0},
    "lm_infinite": {"global_tokens": 3, "window": 5},  # far queries (the capped distances): test_lm_infinite.py
}

CASES = {
    "bidirectional": dict(causal=False),
    "causal": dict(causal=True),
    "padding": dict(causal=False, pad=True),
    "causal-padding": dict(causal=True, pad=True),
    "gqa-causal": dict(causal=True, Hkv=2),
    "mqa-bidirectional": dict(causal=False, Hkv=1),
    "cache": dict(causal=True, Tq=5),     # the last 5 queries against all 37 keys
    "one-query": dict(causal=True, Tq=1),
    "bias": dict(causal=False, bias=True),
    "causal-bias": dict(causal=True, bias=True),
}


def make_kernel(kind: str, H: int = 4, D: int = 8):
    cfg = ATTENTION.config_model(kind)(**EXACT[kind])
    return ATTENTION.build(cfg, n_heads=H, d_head=D, max_len=64).double().eval()


def case_applies(kind: str, case: dict) -> bool:
    cls = ATTENTION.get(kind)
    if case["causal"] and not cls.supports_causal or not case["causal"] and not cls.supports_bidirectional:
        return False
    if case.get("bias") and not cls.supports_bias or case.get("pad") and not cls.supports_padding:
        return False
    return not (case.get("Tq") and not cls.supports_cache)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", EXACT)
def test_exact_kernel_matches_reference(kind, case):
    c = CASES[case]
    if not case_applies(kind, c):
        pytest.skip(f"{kind} does not take this case")
    B, H, Hkv, T, D = 2, 4, c.get("Hkv", 4), 37, 8
    Tq = c.get("Tq", T)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    spec = AttnSpec(
        q_pos=torch.arange(T - Tq, T), k_pos=torch.arange(T), causal=c["causal"],
        key_padding_mask=(torch.arange(T)[None, :] < torch.tensor([[T], [T - 6]])) if c.get("pad") else None,
        bias=torch.randn(1, H, Tq, T, generator=g, dtype=torch.float64) if c.get("bias") else None,
    )
    kernel = make_kernel(kind, H, D)
    expected = reference_attention(q, k, v, spec, pattern=kernel.allowed(spec.q_pos, spec.k_pos))
    torch.testing.assert_close(kernel(q, k, v, spec), expected, rtol=1e-9, atol=1e-9)


def test_every_exact_kernel_has_a_reference_case():
    exact = {name for name in ATTENTION.names() if ATTENTION.get(name).exact}
    assert exact <= set(EXACT), f"exact kernels without a reference case: {sorted(exact - set(EXACT))}"
