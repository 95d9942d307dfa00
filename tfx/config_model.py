"""Sub-tables of [model] with their own keys: [model.depth], [model.exit], [model.patches] (and the
strict base every recipe table uses: unknown keys are errors)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DepthConfig(Strict):
    """How the blocks are applied: once each in order ("layers"), or as one shared step repeated up to
    max_steps times with Adaptive Computation Time ("universal"; tfx/nn/depth.py)."""
    kind: Literal["layers", "universal"] = "layers"
    max_steps: int = Field(4, gt=0)       # universal: steps of the shared n_layers blocks
    act: bool = True                      # universal: halt per position (false: always max_steps)
    halt_epsilon: float = Field(0.01, gt=0.0, lt=1.0)  # halt when the halting probabilities reach 1 - this
    ponder_cost: float = Field(0.01, ge=0.0)           # weight of the ponder cost (steps + remainder) per token


class ExitConfig(Strict):
    """CALM's early exits (Schuster et al., 2022), their confidence measure and threshold: tfx/nn/early_exit.py."""
    kind: Literal["none", "calm"] = "none"
    measure: Literal["softmax", "saturation", "classifier"] = "softmax"  # top probability, cos(h_i, h_i-1), learned
    threshold: float = Field(1.0, ge=0.0, le=1.0)  # 1: never exit (`tfx calibrate-exit` finds one)


class PatchesConfig(Strict):
    """MEGABYTE (Yu et al., 2023; tfx/models/megabyte.py): a global model over patches of `size` tokens
    (bytes, with tokenizer.kind = "byte") and a local model predicting the tokens within each patch.
    The global model is [model]'s (d_model, n_layers, attention, position) over context / size patches."""
    size: int = Field(0, ge=0)  # tokens per patch; 0: off (a plain LM)
    local_layers: int = Field(2, gt=0)
    local_d_model: int | None = Field(None, gt=0)  # default: d_model
    local_heads: int | None = Field(None, gt=0)    # default: n_heads
