"""SPALM (Yogatama, de Masson d'Autume & Kong, 2021), `model.memory.kind = "spalm"`: a
Transformer-XL short-term memory plus a long-term memory of nearest-neighbour tokens, mixed at the
output through a learned, context-dependent gate.

The long-term memory is a kNN-LM datastore (`tfx knn build BASE --split train`): the keys of a
trained base LM over the training text, each with the token that followed it. For every position
t of a segment, the base model (frozen, as the datastore's keys are) computes the query key over
the segment so far (in pieces of its own context, as the datastore was built), and the `top_k`
nearest keys give their next tokens y_1..y_K. With h_t the model's last hidden state (after the
final norm) and e(y) the model's token embedding:

    m_t = sum_k softmax_k(e(y_k) . h_t) e(y_k)        (what the neighbours say)
    g_t = sigmoid(w . h_t + b)                          (one gate per position)
    z_t = (1 - g_t) h_t + g_t m_t,   p(x_(t+1)) = softmax(head(z_t))

w starts at 0 and b at `gate_bias` (sigmoid(-2) = 0.12), so a model started from a base
(`init_from`) begins close to it. The retrieval is not differentiable (the paper's neither); the
gate, the embeddings (through m_t) and the whole stack learn.

In training the datastore holds the training text itself, so a query would find its own position
(whose value is the target): every neighbour whose row lies within `exclude` tokens of the query's
own position in the stream is dropped (the training batches carry each row's stream position),
so that training sees what evaluation on unseen text sees. Evaluation and generation read by
segments, as for the memorizing kind (tfx/decoding/segments.py); the datastore is never written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor, nn

from tfx.errors import RunError
from tfx.nn.memory.xl import XLMemory, XLState
from tfx.registry import MEMORY, KindConfig


# How a run directory is loaded, set by tfx.rundir when it is imported: the memory kinds sit below the
# run layer (which builds models through them), so this one is handed the loader instead of importing it.
load_run = None


class SpalmConfig(KindConfig):
    kind: str = "spalm"
    datastore: str  # a run directory with a kNN datastore (tfx knn build RUN --split train): its model and store
    mem_len: int = Field(128, ge=0)  # the XL short-term memory of every layer (0: none)
    top_k: int = Field(8, gt=0)  # neighbours retrieved per position
    exclude: int | None = Field(None, ge=1)  # training: drop neighbours this close to the query (default: the store's context)
    gate_bias: float = -2.0  # the gate's initial bias b


@dataclass
class SpalmState(XLState):
    """The XL memory, and in training (B,) the stream position of the next segment's first token."""

    position: Tensor | None = None


class Retriever:
    """The base run's frozen model and its datastore: (B, T) tokens -> (B, T, K) neighbour tokens."""

    def __init__(self, run_dir: str, vocab_size: int, device):
        from tfx.knn.datastore import Datastore
        from tfx.knn.keys import KeyCapture

        if load_run is None:  # pragma: no cover - tfx.rundir is imported wherever a run is trained or loaded
            raise RunError("SPALM needs tfx.rundir to load its datastore's run: import tfx.rundir first")
        if not (Path(run_dir) / "recipe.toml").is_file():
            raise RunError(f"model.memory.datastore = {run_dir!r}: not a tfx run directory (SPALM retrieves from a "
                           f"trained LM's datastore: tfx train ..., then tfx knn build RUN --split train)")
        _, _, self.model = load_run(run_dir)
        self.store = Datastore(run_dir)
        vocab = self.model.head.weight.shape[0]
        if vocab != vocab_size:
            raise RunError(f"model.memory.datastore = {run_dir!r}: its vocabulary has {vocab} entries, this model's "
                           f"{vocab_size}; SPALM needs the same tokenizer (init_from the datastore's run)")
        self.model.to(device).eval().requires_grad_(False)
        self.context = int(self.store.meta["context"])
        self.capture = KeyCapture

    @torch.no_grad()
    def queries(self, tokens: Tensor) -> Tensor:
        """(B, T) -> (B, T, d) base-model keys, the segment read in pieces of the base's context."""
        out = []
        with self.capture(self.model) as capture:
            for i in range(0, tokens.shape[1], self.context):
                self.model(tokens[:, i:i + self.context])
                out.append(capture.keys.float())
        return torch.cat(out, 1)

    def rows(self, tokens: Tensor, k: int, position: Tensor | None, exclude: int) -> Tensor:
        """(B*T, k) store rows of the nearest keys, nearest first (-1: none); with `position` (B,),
        rows within `exclude` of a query's own stream position are skipped."""
        B, T = tokens.shape
        q = self.queries(tokens).reshape(B * T, -1)
        if position is None:
            return self.store.nearest(q, k)[1]
        _, rows = self.store.nearest(q, k + 2 * exclude)  # enough that k survive the exclusion
        own = (position.cpu()[:, None] + torch.arange(T)).reshape(-1, 1)  # (B*T, 1)
        rows = torch.where(((rows - own).abs() < exclude) | (rows < 0), -1, rows)
        order = torch.sort((rows < 0).to(torch.int8), dim=1, stable=True).indices[:, :k]  # kept first, in rank order
        return rows.gather(1, order)

    def neighbours(self, tokens: Tensor, k: int, position: Tensor | None, exclude: int) -> Tensor:
        """(B, T, k) next tokens of the nearest keys (-1: none), see `rows`."""
        rows = self.rows(tokens, k, position, exclude)
        return self.store.values_of(rows).view(*tokens.shape, -1).to(tokens.device)


def mix(h: Tensor, neighbours: Tensor, embed: nn.Embedding, gate: Tensor) -> Tensor:
    """z = (1 - g) h + g m, m the softmax(e(y) . h)-weighted mean of the neighbours' embeddings
    (B, T, K; -1 = none: left out; a position with none gets m = 0). `gate` (B, T, 1)."""
    found = neighbours >= 0
    y = embed(neighbours.clamp(min=0)).to(h.dtype)  # (B, T, K, d)
    scores = (y @ h[..., None]).squeeze(-1).masked_fill(~found, float("-inf"))  # (B, T, K)
    weights = torch.nan_to_num(scores.softmax(-1)) * found
    m = (weights[..., None, :] @ y).squeeze(-2)  # (B, T, d)
    return (1 - gate) * h + gate * m


@MEMORY.register("spalm", config=SpalmConfig)
class SpalmMemory(XLMemory):
    """SPALM: XL memory in every layer, kNN neighbour tokens mixed in at the output by a gate."""

    needs = "a datastore run (tfx knn build); with mem_len > 0: relative positions, a kernel with a KV cache"
    State = SpalmState
    decodes_by_segments = True  # generation: tfx/decoding/segments.py

    @staticmethod
    def recipe_problems(cfg) -> list[str]:
        if not (Path(cfg.datastore) / "knn" / "meta.json").is_file():
            return [f"model.memory.datastore = {cfg.datastore!r} has no kNN datastore: train that base LM, then "
                    f"tfx knn build {cfg.datastore} --split train"]
        return []

    def __init__(self, cfg, *, d_model: int, **_):
        super().__init__(cfg)
        self.datastore, self.top_k, self.exclude = cfg.datastore, cfg.top_k, cfg.exclude
        # w and b as plain parameters: the stack's N(0, 0.02) re-initialisation of Linear layers passes them by
        self.gate_weight = nn.Parameter(torch.zeros(d_model))
        self.gate_bias = nn.Parameter(torch.tensor(float(cfg.gate_bias)))
        self.forced_gate: float | None = None  # tests: g fixed to this value
        self._retriever: Retriever | None = None  # loaded at first use; never part of the state_dict

    def memories(self, state: SpalmState) -> list[Tensor] | None:
        return state.hidden if self.mem_len else None

    def carry(self, state: SpalmState, inputs: list[Tensor], blocks) -> None:
        if self.mem_len:  # (mem_len = 0: no XL memory to move on)
            super().carry(state, inputs, blocks)

    def see_batch(self, state: SpalmState, batch: dict) -> None:
        """Training: the rows' stream positions (StreamBlocks' `position`), for the exclusion."""
        state.position = batch.get("position")

    def retriever(self, vocab_size: int, device) -> Retriever:
        if self._retriever is None:
            self._retriever = Retriever(self.datastore, vocab_size, device)
        return self._retriever

    def output(self, state: SpalmState, h: Tensor, tokens: Tensor, embed: nn.Embedding) -> Tensor:
        """The gated mix of the last hidden states h (B, T, d) with the segment's neighbours."""
        retriever = self.retriever(embed.num_embeddings, h.device)
        exclude = self.exclude or retriever.context
        neighbours = retriever.neighbours(tokens, self.top_k, state.position, exclude)
        if state.position is not None:
            state.position = state.position + tokens.shape[1]  # replaced, never written into
        if self.forced_gate is None:
            gate = torch.sigmoid(h @ self.gate_weight.to(h.dtype) + self.gate_bias)[..., None]  # (B, T, 1)
        else:
            gate = torch.full_like(h[..., :1], self.forced_gate)
        return mix(h, neighbours, embed, gate)
