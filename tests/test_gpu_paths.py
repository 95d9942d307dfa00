"""The GPU paths, checked where a CPU can check them: which device and backend are picked, the
refusals, the arguments that let SDPA's fused (flash / memory-efficient) kernels run, fused AdamW.
What ran on a GPU and what did not is listed in the README (Scaling out)."""
from __future__ import annotations

import pytest
import torch

from tfx.errors import RunError
from tfx.train import distributed as dist
from tfx.train.loop import select_device
from tfx.train.precision import autocast_for


@pytest.fixture
def cuda(monkeypatch):
    """A machine with two CUDA devices, as far as device selection can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return monkeypatch


def test_auto_is_cuda_where_present_and_each_process_takes_its_local_rank(cuda):
    assert select_device("auto") == torch.device("cuda")
    cuda.setenv("WORLD_SIZE", "4")
    cuda.setenv("LOCAL_RANK", "1")
    assert select_device("auto") == torch.device("cuda", 1)
    cuda.setenv("LOCAL_RANK", "2")
    with pytest.raises(RunError, match=r"LOCAL_RANK 2 but this node has 2 CUDA device\(s\): start at most 2"):
        select_device("cuda")


def test_cpu_without_cuda_and_the_refusals(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(RunError, match="train.device = 'cuda' but no CUDA device is available"):
        select_device("cuda")
    with pytest.raises(RunError, match="fp16' needs a GPU; use 'bf16' on the CPU"):
        autocast_for(torch.device("cpu"), "fp16")


def test_nccl_between_gpus_gloo_between_cpus():
    assert dist.backend_for("cuda") == "nccl" and dist.backend_for("cpu") == "gloo"


def _sdpa_calls(monkeypatch, batch: dict, family: str = "lm") -> list[dict]:
    from tfx.config import validate
    from tfx.families import build_model
    from tfx.nn.attention import dense

    calls = []
    real = dense.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if k in ("attn_mask", "is_causal")})
        return real(*args, **kwargs)

    monkeypatch.setattr(dense.F, "scaled_dot_product_attention", spy)
    recipe = validate({"family": family, "data": {"train": "x"},
                       "model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "context": 16}})
    build_model(recipe, vocab_size=20).loss(batch)
    return calls


def test_dense_training_calls_sdpa_without_a_mask_tensor(monkeypatch):
    """A causal batch without padding reaches SDPA as is_causal=True and no mask tensor: the call
    that SDPA's flash and memory-efficient kernels take on a GPU."""
    tokens = torch.randint(0, 20, (2, 17))
    calls = _sdpa_calls(monkeypatch, {"input": tokens[:, :-1], "target": tokens[:, 1:]})
    assert calls == [{"is_causal": True}]


def test_fused_adamw_on_cpu_and_cuda_parameters():
    from tfx.registry import OPTIMIZER
    from tfx.train.optim import AdamWConfig

    model = torch.nn.Linear(4, 4)
    assert OPTIMIZER.build(AdamWConfig(), model=model).defaults["fused"] is True
