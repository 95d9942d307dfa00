"""Optimizers and learning-rate schedules, registered by short name."""
from __future__ import annotations

import math
import sys

import torch
from pydantic import Field
from torch import nn

from tfx.registry import OPTIMIZER, SCHEDULE, KindConfig


class AdamWConfig(KindConfig):
    kind: str = "adamw"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    fused: bool | None = None  # None: the fused kernel on the CPU and CUDA (7% faster steps at nanoGPT's size)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no weight decay on norms, biases or embeddings (GPT-2 practice)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_matrix = isinstance(module, nn.Linear) and name == "weight"
            (decay if is_matrix and not _is_tied_embedding(model, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _is_tied_embedding(model: nn.Module, p: torch.Tensor) -> bool:
    return any(isinstance(m, nn.Embedding) and m.weight is p for m in model.modules())


@OPTIMIZER.register("adamw", config=AdamWConfig)
def adamw(cfg: AdamWConfig, *, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, 2019); one fused kernel for every parameter where torch has it."""
    fused = cfg.fused
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def _beneath(method, decorator):
    """The function that torch's `decorator` wraps in `method`, or None when `method` is not that
    decorator's wrapper (another torch version): compared by the wrapper's code object."""
    probe = decorator(lambda *args, **kwargs: None)
    wrapped = getattr(method, "__wrapped__", None)
    return wrapped if wrapped is not None and getattr(method, "__code__", None) is probe.__code__ else None


def _dynamo_imported() -> bool:
    return "torch._dynamo" in sys.modules


def _without_dynamo(name: str):
    """torch.optim.Optimizer.`name`, with its lazy `import torch._dynamo` skipped while nothing has
    imported torch._dynamo (it turns dynamo off for the call, which only matters while dynamo traces)."""
    torch_method = getattr(torch.optim.AdamW, name)
    raw = _beneath(torch_method, torch._disable_dynamo)

    def method(self, *args, **kwargs):
        if raw is None or _dynamo_imported():
            return torch_method(self, *args, **kwargs)
        return raw(self, *args, **kwargs)

    method.__name__, method.__qualname__ = name, f"AdamW.{name}"
    method.__doc__ = torch_method.__doc__
    return method


def _torch_step():
    """(torch.optim.AdamW.step below the profiling hook that Optimizer.__init__ patches onto its
    class, the step function below its `_use_grad_for_differentiable` wrapper, or None)."""
    step = torch.optim.AdamW.step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    try:
        from torch.optim.optimizer import _use_grad_for_differentiable
    except ImportError:
        return step, None
    return step, _beneath(step, _use_grad_for_differentiable)


_TORCH_STEP, _RAW_STEP = _torch_step()


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW, the same arithmetic, kernels and state_dict, without importing torch._dynamo
    (~2 s wall, ~1 s CPU, of every training process on 2 EPYC cores). torch wraps `step` in
    `_use_grad_for_differentiable`, and `add_param_group`, `zero_grad`, `state_dict` and
    `load_state_dict` in `torch._disable_dynamo`; both import torch._dynamo on their first call, to mark
    graph breaks or turn dynamo off while it traces. Nothing traces before torch._dynamo is imported
    (torch.compile imports it), so until then these methods call the functions beneath the wrappers;
    from then on, torch's own wrappers."""

    add_param_group = _without_dynamo("add_param_group")
    zero_grad = _without_dynamo("zero_grad")
    state_dict = _without_dynamo("state_dict")
    load_state_dict = _without_dynamo("load_state_dict")

    def step(self, closure=None):
        if _RAW_STEP is None or _dynamo_imported():
            return _TORCH_STEP(self, closure)
        enabled = torch.is_grad_enabled()  # what _use_grad_for_differentiable does, less the graph breaks
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return _RAW_STEP(self, closure)
        finally:
            torch.set_grad_enabled(enabled)

    step.__doc__ = torch.optim.AdamW.step.__doc__


class CosineConfig(KindConfig):
    kind: str = "cosine"
    warmup: int = Field(100, ge=0)
    min_lr: float = Field(1e-4, ge=0)   # the floor, absolute
    decay_steps: int | None = Field(None, gt=0)  # None: train.steps


class ConstantConfig(KindConfig):
    kind: str = "constant"
    warmup: int = Field(0, ge=0)


class InverseSqrtConfig(KindConfig):
    kind: str = "inverse_sqrt"
    warmup: int = Field(4000, gt=0)


def _warm(step: int, warmup: int) -> float:
    return (step + 1) / (warmup + 1) if step < warmup else 1.0


@SCHEDULE.register("cosine", config=CosineConfig)
def cosine(cfg: CosineConfig, *, lr: float, steps: int):
    """Linear warmup, then cosine decay from lr to min_lr over decay_steps, then min_lr."""
    total = cfg.decay_steps or steps

    def at(step: int) -> float:
        if step < cfg.warmup:
            return lr * _warm(step, cfg.warmup)
        frac = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (lr - cfg.min_lr)

    return at


@SCHEDULE.register("constant", config=ConstantConfig)
def constant(cfg: ConstantConfig, *, lr: float, steps: int):
    return lambda step: lr * _warm(step, cfg.warmup)


@SCHEDULE.register("inverse_sqrt", config=InverseSqrtConfig)
def inverse_sqrt(cfg: InverseSqrtConfig, *, lr: float, steps: int):
    """Warmup then lr * sqrt(warmup / step) (Vaswani et al., 2017; fairseq's inverse_sqrt)."""
    return lambda step: lr * _warm(step, cfg.warmup) if step < cfg.warmup else lr * math.sqrt(cfg.warmup / (step + 1))
