"""Attention kernels behind one contract (see base.py); importing this registers every kind.

Each module of this package registers its kinds with ATTENTION when imported; all are imported
here, so a new kernel is one new file.
"""
import importlib
import pkgutil

from tfx.nn.attention.base import AttentionKernel, AttnSpec, reference_attention

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["AttentionKernel", "AttnSpec", "reference_attention"]
