"""BERT (Devlin et al., 2019; HF BertForMaskedLM, BertForSequenceClassification) <-> a tfx mlm or
classifier: post-norm layers with biases, a norm over the embeddings, learned positions, exact GELU
(or its tanh form in a classifier), BERT's masked-LM head (dense + GELU + norm, the tied output layer
with a bias: model.head_transform) or its pooler (tanh over [CLS]: model.pool = "pooler").

HF keeps q, k and v as three nn.Linear; tfx's qkv is one whose rows are [q; k; v], heads contiguous.
tfx has no token types: they are all 0 there, so token_type_embeddings[0] is folded into the position
table on import and exported as a zero table (type_vocab_size 2). The tfx encoder families have one
id past the tokenizer's, [MASK] = vocab_size: import appends a copy of BERT's own [MASK] row (the mask
token named by the tokenizer files, when `hf_dir` is given, or config.json's mask_token_id; else a
zero row) to the embeddings and the output bias, and export drops it. transformers 5.x saves neither
the tied decoder matrix nor its bias; older saves that hold them are accepted where they are the
embeddings and cls.predictions.bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tfx.convert import Imported
from tfx.convert.common import give_pairs, need, plain_problems, refuse_unless, take, take_pairs
from tfx.data.tokenizer_hf import named_token_id
from tfx.errors import UsageError

NAME = "bert"
MODEL_TYPES = ("bert",)
FAMILIES = {"mlm": "BertForMaskedLM", "classifier": "BertForSequenceClassification"}  # tfx family -> HF head
ARCHITECTURES = {arch: family for family, arch in FAMILIES.items()}
# HF hidden_act -> tfx ffn; the masked-LM head's transform is exact GELU in tfx, so an mlm takes "gelu" only
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
EXPORT_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # F.gelu(approximate="tanh"), as tfx's
TYPE_VOCAB = 2  # token_type_embeddings rows written on export (BERT's)
# (tfx name in a block, HF name in a layer) of the plain Linear and LayerNorm pairs; qkv is fused
BLOCK = [("attn.out", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
         ("ffn.up", "intermediate.dense"), ("ffn.down", "output.dense"), ("norm2", "output.LayerNorm")]
QKV = ("query", "key", "value")
MLM_HEAD = [("transform.dense", "cls.predictions.transform.dense"),
            ("transform.norm", "cls.predictions.transform.LayerNorm")]
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # older saves hold them
UNUSED_BY_MLM = ("bert.pooler.", "cls.seq_relationship.")


def choose_family(c: dict, family: str | None) -> str:
    """--family, else the one the config's architectures name."""
    named = [family] if family else [ARCHITECTURES[a] for a in c.get("architectures") or [] if a in ARCHITECTURES]
    if not named:
        raise UsageError(f"{NAME} config.json: architectures {c.get('architectures')!r} name no head tfx reads "
                         f"({', '.join(ARCHITECTURES)}): give --family mlm or --family classifier")
    return named[0]


def mask_token_id(config: dict, hf_dir: str | Path | None) -> int | None:
    """BERT's [MASK] id: the mask_token of the directory's tokenizer files, looked up in its
    tokenizer.json (tokenizer_hf.named_token_id); else config.json's mask_token_id."""
    if hf_dir is not None:  # named_token_id falls back on the directory's config.json itself
        return named_token_id(hf_dir, "mask_token")
    i = config.get("mask_token_id")
    return i if type(i) is int and i >= 0 else None


def with_mask_row(t: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    """`t` (V, ...) with one more row: a copy of row `mask_id`, or zeros."""
    extra = t[mask_id] if mask_id is not None else torch.zeros_like(t[0])
    return torch.cat([t, extra[None]], dim=0)


def hf_labels(c: dict, n: int) -> list[str]:
    """The classifier's label names in id order: config id2label, else LABEL_i."""
    id2label = c.get("id2label")
    if not id2label:
        return [f"LABEL_{i}" for i in range(n)]
    try:
        ids = {int(k): v for k, v in id2label.items()}
    except (AttributeError, TypeError, ValueError):
        ids = {}
    refuse_unless(sorted(ids) == list(range(n)) and all(isinstance(v, str) for v in ids.values()), NAME,
                  f"id2label {id2label!r} is not one name for each of the {n} ids of the classifier")
    labels = [ids[i] for i in range(n)]
    refuse_unless(len(set(labels)) == n, NAME, f"id2label repeats a name: {labels}")
    return labels


def to_tfx(config: dict, tensors: dict, family: str | None, hf_dir: str | Path | None = None) -> Imported:
    c = dict(config)
    family = choose_family(c, family)
    act = c.get("hidden_act", "gelu")
    refuse_unless(isinstance(act, str) and act in ACTIVATIONS, NAME, f"hidden_act {act!r}")
    kind = c.get("position_embedding_type", "absolute")
    refuse_unless(kind == "absolute", NAME, f"position_embedding_type {kind!r} (tfx's BERT has absolute positions)")
    refuse_unless(not c.get("is_decoder", False), NAME, "is_decoder (a causal BERT)")
    refuse_unless(not c.get("add_cross_attention", False), NAME, "add_cross_attention")
    refuse_unless(c.get("tie_word_embeddings", True), NAME, "tie_word_embeddings = false (an untied output layer)")
    d, n_layers = need(c, "hidden_size", arch=NAME), need(c, "num_hidden_layers", arch=NAME)
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        return take(tensors, used, prefix + name)

    marker = HEADS[family].marker
    refuse_unless(marker in tensors, NAME,
                  f"--family {family} with no {marker} in the weights (a model without the "
                  f"{FAMILIES[family]} head)")
    mask_id = mask_token_id(c, hf_dir)
    word = get("embeddings.word_embeddings.weight")
    vocab = word.shape[0]
    if mask_id is not None and mask_id >= vocab:
        mask_id = None
    types = get("embeddings.token_type_embeddings.weight")
    state = {"encoder.embed.weight": with_mask_row(word, mask_id),
             "encoder.pos.table.weight": get("embeddings.position_embeddings.weight") + types[0],  # type ids all 0
             **take_pairs(tensors, used, [("encoder.embed_norm", prefix + "embeddings.LayerNorm")])}
    for i in range(n_layers):
        layer = f"encoder.layer.{i}"
        for p in ("weight", "bias"):
            state[f"encoder.blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [get(f"{layer}.attention.self.{x}.{p}") for x in QKV], dim=0)
        state.update(take_pairs(tensors, used, [(f"encoder.blocks.{i}.{ours}", f"{prefix}{layer}.{theirs}")
                                                for ours, theirs in BLOCK]))
    model = {"d_model": d, "n_layers": n_layers, "n_heads": need(c, "num_attention_heads", arch=NAME),
             "d_ff": need(c, "intermediate_size", arch=NAME), "context": need(c, "max_position_embeddings", arch=NAME),
             "norm": "layernorm", "norm_eps": c.get("layer_norm_eps", 1e-12), "norm_position": "post",
             "embed_norm": True, "ffn": ACTIVATIONS[act], "bias": True,
             "dropout": c.get("hidden_dropout_prob", 0.1), "attn_dropout": c.get("attention_probs_dropout_prob", 0.1),
             "position": {"kind": "learned"}, "attention": {"kind": "dense"}}
    labels, unused = HEADS[family].read(c, tensors, used, state, model, word=word, mask_id=mask_id, act=act)
    ignored = {k for k in tensors if k.endswith(BUFFERS) or k.startswith(unused)}
    return Imported(family=family, model=model, state=state, used=used, vocab_size=vocab, ignored=ignored,
                    labels=labels)


def read_mlm_head(c: dict, tensors: dict, used: set, state: dict, model: dict, *, word, mask_id, act) -> tuple:
    """BERT's masked-LM head -> the transform and the tied output layer's bias; a pretraining checkpoint's
    pooler and next-sentence head are left (a masked LM has no use for them; transformers drops them too)."""
    refuse_unless(ACTIVATIONS[act] == "gelu", NAME,
                  f"hidden_act {act!r} in the masked-LM head (tfx's head transform is exact GELU)")
    state.update(take_pairs(tensors, used, MLM_HEAD))
    bias = take(tensors, used, "cls.predictions.bias")
    for name, ref in (("cls.predictions.decoder.weight", word), ("cls.predictions.decoder.bias", bias)):
        if name in tensors:  # an older save of the tied matrix and bias
            refuse_unless(torch.equal(take(tensors, used, name), ref), NAME,
                          f"tie_word_embeddings with a {name} unlike the one it is tied to")
    state["head.weight"] = state["encoder.embed.weight"]
    state["head.bias"] = with_mask_row(bias, mask_id)
    model.update(head_transform=True, tie_embeddings=True)
    return None, UNUSED_BY_MLM


def read_classifier_head(c: dict, tensors: dict, used: set, state: dict, model: dict, **_) -> tuple:
    """BERT's pooler and classification layer; the labels in id order."""
    problem = c.get("problem_type")
    refuse_unless(problem in (None, "single_label_classification"), NAME, f"problem_type {problem!r}")
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    state.update(take_pairs(tensors, used, [("pooler", prefix + "pooler.dense"), ("head", "classifier")]))
    n = state["head.weight"].shape[0]
    refuse_unless(n > 1, NAME, "one label (num_labels 1 is a regression head)")
    model.update(pool="pooler")
    return hf_labels(c, n), ()


def export_problems(recipe) -> list[str]:
    m = recipe.model
    head = HEADS.get(recipe.family)
    problems = [] if head else [f"family {recipe.family!r}, not mlm or classifier"]
    problems += plain_problems(m, position="learned", full_heads=True, norm="layernorm", norm_position="post",
                               bias=True, embed_norm=True)
    if m.ffn not in EXPORT_ACTIVATION:
        problems.append(f"model.ffn is {m.ffn!r} (BERT's is gelu or gelu_tanh)")
    return problems + (head.problems(m) if head else [])


def mlm_problems(m) -> list[str]:
    problems = [] if m.head_transform else ["model.head_transform is false (BERT's masked-LM head has the transform)"]
    if not m.tie_embeddings:
        problems.append("model.tie_embeddings is false")
    if m.ffn != "gelu":
        problems.append(f"model.ffn is {m.ffn!r} with head_transform (its GELU is exact: BERT's hidden_act is "
                        f"one for both)")
    return problems


def classifier_problems(m) -> list[str]:
    return [] if m.pool == "pooler" else [f"model.pool is {m.pool!r}, not 'pooler' (BERT's tanh layer over [CLS])"]


def export_labels(model, run_dir: str | Path | None) -> list[str]:
    """The classifier's label names in id order: the run's labels.json, else LABEL_i."""
    if run_dir is not None and (Path(run_dir) / "labels.json").is_file():
        from tfx.tasks.classifier import read_labels

        return read_labels(run_dir)
    return [f"LABEL_{i}" for i in range(model.n_labels)]


def from_tfx(recipe, model, tokenizer, run_dir: str | Path | None = None) -> tuple[dict, dict]:
    m = recipe.model
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    d = m.d_model
    embed = sd["encoder.embed.weight"][:-1]  # without tfx's [MASK] row
    p = "bert."
    tensors = {p + "embeddings.word_embeddings.weight": embed,
               p + "embeddings.position_embeddings.weight": sd["encoder.pos.table.weight"],
               p + "embeddings.token_type_embeddings.weight": torch.zeros(TYPE_VOCAB, d, dtype=embed.dtype),
               p + "embeddings.LayerNorm.weight": sd["encoder.embed_norm.weight"],
               p + "embeddings.LayerNorm.bias": sd["encoder.embed_norm.bias"]}
    for i in range(m.n_layers):
        layer = f"{p}encoder.layer.{i}"
        for part in ("weight", "bias"):
            for x, t in zip(QKV, sd[f"encoder.blocks.{i}.attn.qkv.{part}"].chunk(3, dim=0)):
                tensors[f"{layer}.attention.self.{x}.{part}"] = t
        tensors.update(give_pairs(sd, [(f"encoder.blocks.{i}.{ours}", f"{layer}.{theirs}") for ours, theirs in BLOCK]))
    head = HEADS[recipe.family]
    config = {"model_type": "bert", "architectures": [FAMILIES[recipe.family]],
              "vocab_size": embed.shape[0], "hidden_size": d, "num_hidden_layers": m.n_layers,
              "num_attention_heads": m.n_heads, "intermediate_size": model.encoder.blocks[0].ffn.down.in_features,
              "hidden_act": EXPORT_ACTIVATION[m.ffn], "max_position_embeddings": m.context,
              "type_vocab_size": TYPE_VOCAB, "layer_norm_eps": m.norm_eps, "position_embedding_type": "absolute",
              "hidden_dropout_prob": m.dropout, "attention_probs_dropout_prob": m.attn_dropout,
              "is_decoder": False, "add_cross_attention": False, "tie_word_embeddings": True,
              "pad_token_id": tokenizer.pad_id}
    head.write(sd, tensors, config, model, run_dir)
    return config, tensors


def write_mlm_head(sd: dict, tensors: dict, config: dict, model, run_dir) -> None:
    tensors.update(give_pairs(sd, MLM_HEAD))
    tensors["cls.predictions.bias"] = sd["head.bias"][:-1]  # without tfx's [MASK] entry


def write_classifier_head(sd: dict, tensors: dict, config: dict, model, run_dir) -> None:
    tensors.update(give_pairs(sd, [("pooler", "bert.pooler.dense"), ("head", "classifier")]))
    labels = export_labels(model, run_dir)
    config.update(id2label={str(i): name for i, name in enumerate(labels)},
                  label2id={name: i for i, name in enumerate(labels)},
                  problem_type="single_label_classification", classifier_dropout=0.0)  # tfx has none there


@dataclass(frozen=True)
class Head:
    """BERT's head for one tfx family: a tensor only it has, and how it is read, checked and written."""

    marker: str
    read: Callable
    problems: Callable
    write: Callable


HEADS = {"mlm": Head("cls.predictions.bias", read_mlm_head, mlm_problems, write_mlm_head),
         "classifier": Head("classifier.weight", read_classifier_head, classifier_problems, write_classifier_head)}
