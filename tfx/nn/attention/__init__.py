"""Attention kernels behind one contract (see base.py); importing this registers every kind."""
from tfx.nn.attention.base import AttentionKernel, AttnSpec, reference_attention
from tfx.nn.attention import dense  # noqa: F401  (registers "dense")

__all__ = ["AttentionKernel", "AttnSpec", "reference_attention"]
