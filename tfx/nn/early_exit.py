"""Depth-adaptive decoding: CALM (Schuster et al., 2022, "Confident Adaptive Language Modeling";
Elbayad et al., 2020, "Depth-Adaptive Transformer"). `[model.exit] kind = "calm"`.

Training. Every layer i = 1..L of a decoder has an exit: the model's own output head behind a norm
of the exit's own (the last layer's is the stack's final norm, so the last exit is the model). The
loss is CALM's depth-weighted sum of the exits' losses,

    loss = sum_i w_i CE(head(norm_i(h_i)), y),    w_i = i / (1 + 2 + ... + L),

so deeper exits weigh more and the weights sum to 1 (the per-token scale of the plain loss). With
`measure = "classifier"` a unit c_i = sigmoid(a . norm_i(h_i) + b) per exit (a and b shared) learns
to say whether exit i's top token is the last exit's (CALM's consistency labels), by binary
cross-entropy on detached states: it does not change the model. Evaluation losses are the last
exit's alone (the model's perplexity).

Decoding. A token is decoded layer by layer; after layer i < L its confidence is

- softmax: the top probability of exit i's distribution;
- saturation: the cosine of the layer's output and input, h_i and h_{i-1} (h_0: the embeddings);
- classifier: c_i;

and it leaves at the first layer whose confidence reaches the threshold, with exit i's
distribution. Its state is copied up: each later layer j takes h_i as its input and output, and its
keys and values for that token are computed from h_i (`Block.fill_cache`: nothing else of layer j
runs), so every layer's cache stays complete and later tokens attend to it as to any other.
Within one call, positions leave independently; layers are skipped only once every position of the
call has left (a decode step of one token: as soon as it leaves). A threshold of 1 never exits: the
full model. `exit_layers` gives each position's exit layer instead (a parallel pass that equals a
token-by-token decode with those exits: the tests' reference, and calibration's).

`tfx calibrate-exit` (tfx/calibrate.py) picks the threshold on validation text.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfx.nn.layers import make_norm
from tfx.nn.tally import reset_tallies, tally_report

CHUNK = 4096  # rows per chunk when exits' top tokens are computed for the classifier's labels


def exit_weights(n_layers: int) -> list[float]:
    """CALM's loss weights: w_i = i / sum_j j, i = 1..n_layers."""
    total = n_layers * (n_layers + 1) / 2
    return [i / total for i in range(1, n_layers + 1)]


class Exits(nn.Module):
    """The exits' norms (layers 1..L-1), the classifier unit where the measure is "classifier", the
    decoding threshold (a plain attribute: `tfx calibrate-exit`'s, or the recipe's) and, in
    evaluation, a tally of the layers decoded tokens used."""

    def __init__(self, cfg, *, n_layers: int, d_model: int, norm: str, eps: float, bias: bool):
        super().__init__()
        self.measure, self.threshold, self.n_layers = cfg.measure, cfg.threshold, n_layers
        self.norms = nn.ModuleList(make_norm(norm, d_model, eps=eps, bias=bias) for _ in range(n_layers - 1))
        self.classifier = nn.Linear(d_model, 1) if cfg.measure == "classifier" else None
        self.register_buffer("tally", torch.zeros(n_layers + 1, dtype=torch.long), persistent=False)

    def active(self, tokens: Tensor, state, training: bool) -> bool:
        """Whether this call decodes with exits: a one-token step through a cache, not training,
        with a threshold below 1."""
        return (not training and state is not None and state.tokens is None and tokens.shape[1] == 1
                and self.threshold < 1)

    # ------------------------------------------------------------------------------------- training

    def loss(self, head: nn.Linear, outputs: list[Tensor], final: Tensor, target: Tensor, head_loss,
             ignore: int) -> tuple[Tensor, Tensor | None]:
        """(CALM's weighted sum of the exits' summed losses, the classifier's per-token loss or None).
        `outputs`: each layer's output (B, T, d); `final`: the last one through the final norm;
        `head_loss(head, h, target)` is the model's summed loss."""
        weights = exit_weights(len(outputs))
        exits = [norm(h) for norm, h in zip(self.norms, outputs[:-1])] + [final]
        total = sum(w * head_loss(head, h, target) for w, h in zip(weights, exits))
        if self.classifier is None:
            return total, None
        keep = target.reshape(-1) != ignore
        states = [h.detach().reshape(-1, h.shape[-1])[keep] for h in exits]
        last = top_tokens(head, states[-1])
        logits = torch.cat([self.classifier(h).squeeze(-1) for h in states[:-1]])
        labels = torch.cat([(top_tokens(head, h) == last).to(logits.dtype) for h in states[:-1]])
        return total, F.binary_cross_entropy_with_logits(logits, labels)

    # ------------------------------------------------------------------------------------- decoding

    def confidence(self, i: int, normed: Tensor, h: Tensor, before: Tensor, head: nn.Linear) -> Tensor:
        """(B, T) confidence of exit i (0-based layer index < L - 1): `normed` = norm_i(h), `before`
        the layer's input."""
        if self.measure == "softmax":
            return head(normed).float().softmax(-1).amax(-1)
        if self.measure == "saturation":
            return F.cosine_similarity(h.float(), before.float(), dim=-1)
        return torch.sigmoid(self.classifier(normed).float()).squeeze(-1)

    def run(self, stack, head: nn.Linear, tokens: Tensor, state, *, exit_layers: Tensor | None = None,
            **enter) -> tuple[Tensor, Tensor]:
        """(logits (B, T, V), exit layer of each position (B, T), 1..L) of one pass with exits (see
        the module's doc); `exit_layers` (B, T) forces them; `enter`: the stack's source inputs."""
        x, kw, caches, cross_kvs = stack.enter(tokens, state, **enter)
        B, T, _ = x.shape
        L = len(stack.blocks)
        if B * T == 1 and exit_layers is None:
            return self.run_one(stack, head, x, kw, caches, cross_kvs)
        done = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        layers = torch.full((B, T), L, dtype=torch.long, device=x.device)
        leaving = torch.zeros_like(x)  # the normalised state each exited position leaves with
        for i, (block, cache, kv) in enumerate(zip(stack.blocks, caches, cross_kvs)):
            if i and bool(done.all()):  # every position has left: only this layer's keys and values
                block.fill_cache(x, cache=cache, **kw)
                continue
            y = stack.run_block(block, x, **kw, cache=cache, cross_kv=kv, memory=None, recall=None)
            before, x = x, torch.where(done[..., None], x, y)
            if i == L - 1:
                break
            normed = self.norms[i](x)
            if exit_layers is not None:
                stop = ~done & (exit_layers == i + 1)
            else:
                stop = ~done & (self.confidence(i, normed, x, before, head) >= self.threshold) & (self.threshold < 1)
            leaving = torch.where(stop[..., None], normed, leaving)
            layers = torch.where(stop, i + 1, layers)
            done = done | stop
        out = torch.where(done[..., None], leaving, stack.norm(x))
        if not self.training:
            self.tally += torch.bincount(layers.flatten(), minlength=L + 1)
        return head(out), layers


    def run_one(self, stack, head: nn.Linear, x: Tensor, kw: dict, caches: list,
                cross_kvs: list) -> tuple[Tensor, Tensor]:
        """`run` for one position (a decode step of batch 1), in plain control flow: the same
        computation without the masks, so that an exit saves what the skipped layers cost."""
        L = len(stack.blocks)
        for i, (block, cache, kv) in enumerate(zip(stack.blocks, caches, cross_kvs)):
            before = x
            x = stack.run_block(block, x, **kw, cache=cache, cross_kv=kv, memory=None, recall=None)
            if i == L - 1:
                break
            normed = self.norms[i](x)
            logits = head(normed) if self.measure == "softmax" else None
            confidence = logits.float().softmax(-1).amax() if logits is not None else \
                self.confidence(i, normed, x, before, head)
            if self.threshold < 1 and float(confidence) >= self.threshold:
                for later, cache_later in zip(stack.blocks[i + 1:], caches[i + 1:]):
                    later.fill_cache(x, cache=cache_later, **kw)
                self.tally[i + 1] += 1
                return logits if logits is not None else head(normed), torch.full((1, 1), i + 1, device=x.device)
        self.tally[L] += 1
        return head(stack.norm(x)), torch.full((1, 1), L, device=x.device)


@torch.no_grad()
def top_tokens(head: nn.Linear, h: Tensor) -> Tensor:
    """(N,) the head's top token for each of N states (N, d), a chunk of rows at a time."""
    return torch.cat([head(h[s:s + CHUNK]).argmax(-1) for s in range(0, h.shape[0], CHUNK)]) if h.shape[0] \
        else torch.zeros(0, dtype=torch.long, device=h.device)


def exit_report(model: nn.Module) -> dict | None:
    """Layers used per decoded position since `reset_exit_tallies`, or None."""
    return tally_report(model, Exits, "layers")


def reset_exit_tallies(model: nn.Module) -> None:
    reset_tallies(model, Exits)


def exit_problems(recipe, family) -> list[str]:
    """Why `[model.exit] kind = "calm"` cannot run in this recipe (empty when it can)."""
    from tfx.registry import ATTENTION

    m = recipe.model
    if m.exit.kind == "none":
        return []
    why = "[model.exit] kind = 'calm'"
    if not any(s.causal for s in family.stacks):
        return [f"{why} exits a decoder early while generating; a {recipe.family} model does not generate text "
                "(use it with family = \"lm\" or \"seq2seq\")"]
    layers = (m.decoder_layers if any(s.cross for s in family.stacks) else None) or m.n_layers
    out = []
    if layers < 2:
        out.append(f"{why} needs at least 2 decoder layers (an exit before the last)")
    for setting, reason in ((m.memory.kind != "none", f"a segment memory ({m.memory.kind!r}) keeps per-layer "
                             "states that a skipped layer would not update"),
                            (m.depth.kind != "layers", "universal depth repeats one step; its exits are ACT's"),
                            (m.reversible, "reversible layers carry two streams, not one state to copy up"),
                            (m.block != "standard", "the simplified block has no cache-filling path built"),
                            (recipe.train.rdrop > 0, "train.rdrop's two-pass loss has no per-layer exits"),
                            (m.ffn == "dwconv", "a 'dwconv' feed-forward keeps no cache to copy states into (the "
                             "prefix is recomputed)")):
        if setting:
            out.append(f"{why}: {reason}")
    for att in m.attention_layers or [m.attention]:
        if not ATTENTION.get(att.kind).supports_cache and (msg := f"{why} copies exited states into the layers' "
                                                                    f"KV caches; {att.kind!r} attention keeps none "
                                                                    "(it recomputes the prefix)") not in out:
            out.append(msg)
    return out
