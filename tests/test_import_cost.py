"""What a training process pays before its first step: no torch._dynamo (~2 s on 2 CPU cores) through
the optimizer, and tfx's AdamW gives torch.optim.AdamW's numbers to the bit."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import REPO, TINY, run_tfx, sets
from tfx.train import optim
from tfx.train.optim import AdamW, AdamWConfig, adamw


def test_a_training_process_never_imports_dynamo(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)),
                    encoding="utf-8")
    proc = run_tfx("train", str(REPO / "recipes/lm/shakespeare-char.toml"),
                   *sets(*TINY, "train.steps=2", "train.eval_every=2", "train.save_every=2",
                         f"data.train={text}", "data.corpus=''", "data.holdout=0.1"),
                   "--out", str(tmp_path / "run"), env={"PYTHONPROFILEIMPORTTIME": "1"}, check=True)
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" in imported and "torch.optim" in imported  # the import log is there
    assert not [m for m in imported if m.startswith("torch._dynamo")]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 11))


def _train(model, optimizer, steps: int, *, scaler=None) -> list[float]:
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randint(0, 11, (4, 5), generator=gen)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        (scaler.scale(loss) if scaler else loss).backward()
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (step + 1)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture(params=["dynamo absent", "dynamo imported"])
def dynamo(request, monkeypatch):
    """Both paths of tfx's AdamW whatever this process imported: the functions beneath torch's
    wrappers (no torch._dynamo yet), and torch's wrappers (once torch._dynamo is imported)."""
    imported = request.param == "dynamo imported"
    if imported:
        import torch._dynamo  # noqa: F401
    monkeypatch.setattr(optim, "_dynamo_imported", lambda: imported)
    return imported


def test_adamw_skips_only_torchs_dynamo_wrappers():
    """torch 2.13 wraps these in the lazy importers; a torch that does not falls back to its methods."""
    assert optim._RAW_STEP is not None
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        assert optim._beneath(getattr(torch.optim.Optimizer, name), torch._disable_dynamo) is not None, name


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_is_torch_adamw_to_the_bit(fused, dynamo):
    cfg = AdamWConfig(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, fused=fused)
    ours_model, torch_model = _model(), _model()
    ours = adamw(cfg, model=ours_model)
    assert isinstance(ours, AdamW) and isinstance(ours, torch.optim.AdamW)
    reference = torch.optim.AdamW(_groups_like(ours, ours_model, torch_model), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.eps, fused=fused)
    assert _train(ours_model, ours, 5) == _train(torch_model, reference, 5)
    for a, b in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        assert torch.equal(a, b)
    _assert_state_equal(ours.state_dict(), reference.state_dict())

    # a checkpoint of either loads into the other, and the runs stay equal
    resumed_model, resumed_ref_model = copy.deepcopy(ours_model), copy.deepcopy(torch_model)
    resumed = adamw(cfg, model=resumed_model)
    resumed.load_state_dict(reference.state_dict())
    resumed_ref = torch.optim.AdamW(_groups_like(ours, ours_model, resumed_ref_model), lr=cfg.lr, betas=cfg.betas,
                                    eps=cfg.eps, fused=fused)
    resumed_ref.load_state_dict(ours.state_dict())
    assert _train(resumed_model, resumed, 3) == _train(resumed_ref_model, resumed_ref, 3)
    for a, b in zip(resumed_model.parameters(), resumed_ref_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adamw_under_a_grad_scaler_is_torch_adamw(dynamo):
    ours_model, torch_model = _model(1), _model(1)
    cfg = AdamWConfig(lr=1e-2, fused=True)
    ours = adamw(cfg, model=ours_model)
    reference = torch.optim.AdamW(_groups_like(ours, ours_model, torch_model), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.eps, fused=True)
    a = _train(ours_model, ours, 4, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    b = _train(torch_model, reference, 4, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    assert a == b
    for p, q in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        assert torch.equal(p, q)


def _groups_like(optimizer, model, other) -> list[dict]:
    """optimizer's parameter groups, with `other`'s parameters in place of `model`'s."""
    index = {id(p): q for p, q in zip(model.parameters(), other.parameters(), strict=True)}
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]), (key, name)
