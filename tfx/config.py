"""The typed recipe: TOML -> overrides -> pydantic models, with errors a user can act on.

`Recipe` is a static class, so every consumer knows its fields. Tables with a ``kind`` key
(attention, position, memory, tokenizer, optimizer, schedule) are tagged unions built from the
registries when this module is imported, so every kind validates exactly its own parameters;
`family` is checked against the family registry (tfx/families/).
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tfx.config_model import DepthConfig, ExitConfig, PatchesConfig, Strict
from tfx.errors import UsageError
from tfx.families import FAMILY, family_of
from tfx.registry import ATTENTION, MEMORY, OPTIMIZER, POSITION, SCHEDULE, TOKENIZER, Registry, closest

DATA_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _tagged(reg: Registry, default: str) -> Any:
    """A field type dispatching on `kind` through the registry, with `default` when absent."""
    models = [reg.config_model(n) for n in reg.names()]
    typ = models[0] if len(models) == 1 else Annotated[Union[tuple(models)], Field(discriminator="kind")]
    return typ


def _default(reg: Registry, default: str) -> Any:
    return Field(default_factory=reg.config_model(default))


def import_kinds() -> None:
    """Import every module that registers a kind, so the registries are complete."""
    import tfx.data.tokenizers  # noqa: F401
    import tfx.data.image_codec  # noqa: F401
    import tfx.data.tokenizer_hf  # noqa: F401
    import tfx.nn.attention  # noqa: F401
    import tfx.nn.memory  # noqa: F401
    import tfx.nn.positions  # noqa: F401
    import tfx.nn.positions_2d  # noqa: F401
    import tfx.nn.relative  # noqa: F401
    import tfx.train.optim  # noqa: F401


import_kinds()
AttentionKind = _tagged(ATTENTION, "dense")
PositionKind = _tagged(POSITION, "learned")
MemoryKind = _tagged(MEMORY, "none")
TokenizerKind = _tagged(TOKENIZER, "char")
OptimizerKind = _tagged(OPTIMIZER, "adamw")
ScheduleKind = _tagged(SCHEDULE, "cosine")


class DataConfig(Strict):
    """Where the text comes from: a corpus fetched by `tfx data get`, or files / `hf:NAME`."""

    corpus: str | None = None
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    holdout: float = Field(0.0, ge=0.0, lt=1.0)  # last fraction of train used as valid if no valid
    text_field: str = "text"
    label_field: str = "label"         # classifier
    src_lang: str = "src"              # seq2seq: PREFIX.src_lang / PREFIX.tgt_lang, or JSONL translation keys
    tgt_lang: str = "tgt"
    max_len: int | None = Field(None, gt=0)  # seq2seq/classifier: drop training examples longer (in tokens)
    # lm training blocks: random (packed windows at random offsets), lanes (each batch row reads the
    # text on in order, as a segment memory needs), or auto (lanes with a memory, random otherwise)
    blocks: Literal["auto", "random", "lanes"] = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if not self.corpus and not self.train:
            raise ValueError("set data.corpus (a name from `tfx data list`) or data.train (a file)")
        return self


class ModelConfig(Strict):
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)  # < n_heads: GQA; 1: MQA
    d_head: int | None = Field(None, gt=0)
    d_ff: int | None = Field(None, gt=0)
    context: int = Field(256, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)       # residual and embedding dropout
    attn_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on attention weights (forces SDPA's slower path)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0)
    # gelu_tanh: GELU's tanh approximation (GPT-2); silu: x·sigmoid(x) (Marian); dwconv: EfficientViT's (tfx/nn/dwconv.py)
    ffn: Literal["gelu", "gelu_tanh", "relu", "silu", "swiglu", "dwconv"] = "gelu"
    norm_position: Literal["pre", "post"] = "pre"  # post: the original x = norm(x + sublayer(x)), no final norm
    block: Literal["standard", "simplified"] = "standard"  # simplified: He & Hofmann 2023 (tfx/nn/simplified.py)
    depth: DepthConfig = Field(default_factory=DepthConfig)
    reversible: bool = False  # RevNet couplings: activations recomputed in backward (tfx/nn/reversible.py)
    ffn_chunks: int = Field(1, gt=0)  # the Reformer's chunked feed-forward: this many slices of the sequence
    exit: ExitConfig = Field(default_factory=ExitConfig)  # [model.exit]: CALM's early exits (lm, seq2seq)
    patches: PatchesConfig = Field(default_factory=PatchesConfig)  # [model.patches]: MEGABYTE (lm)
    bias: bool = True
    tie_embeddings: bool = True
    encoder_layers: int | None = Field(None, gt=0)  # seq2seq (default n_layers)
    decoder_layers: int | None = Field(None, gt=0)  # seq2seq (default n_layers)
    # classifier: the [CLS] (first) token, the mean, or BERT's pooler (a tanh layer over [CLS])
    pool: Literal["cls", "mean", "pooler"] = "cls"
    embed_norm: bool = False  # a norm over the embeddings (positions added) before the first block (BERT)
    head_bias: bool = False  # seq2seq: a bias in the output layer (Marian's final_logits_bias)
    head_transform: bool = False  # mlm: BERT's dense + GELU + norm before the tied output layer, which gets a bias
    patch: int = Field(4, gt=0)                     # vit: patches of patch x patch pixels
    stem: int = Field(0, ge=0)                      # vit: channels of a 3x3 conv + GELU before the patches; 0: none
    attention: AttentionKind = _default(ATTENTION, "dense")
    attention_layers: list[AttentionKind] | None = None  # one per layer ([model.attention.per_layer])
    position: PositionKind = _default(POSITION, "learned")
    memory: MemoryKind = _default(MEMORY, "none")

    @model_validator(mode="before")
    @classmethod
    def _per_layer(cls, data: Any) -> Any:
        from tfx.config_layers import split_per_layer

        return split_per_layer(data)

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class TrainConfig(Strict):
    steps: int = Field(1000, gt=0)
    max_minutes: float | None = Field(None, gt=0)  # also stop (validate, save) after this much training time
    batch_size: int = Field(16, gt=0)
    max_tokens: int | None = Field(None, gt=0)  # seq2seq/classifier: batches by token budget instead
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    word_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # drop an input token (training; tfx/nn/regularisers.py)
    rdrop: float = Field(0.0, ge=0.0)  # R-Drop: weight of the symmetric KL between two dropout passes (0: off)
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)  # mlm: fraction of tokens to predict (80/10/10)
    eval_bleu: bool = False  # seq2seq: greedy BLEU on the validation split at each evaluation
    grad_accum: int = Field(1, gt=0)
    clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    # auto: bf16 where the device computes it natively (CUDA with bf16, a CPU with AMX or AVX512-BF16), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: int = 1337
    eval_every: int = Field(250, ge=0)  # 0: only at the end
    eval_tokens: int | None = Field(None, gt=0)  # cap on validation tokens during training
    log_every: int = Field(10, gt=0)
    save_every: int = Field(250, ge=0)  # 0: only at the end
    # the validation metric that picks best.safetensors: loss (lower is better) or, where the family
    # reports them, accuracy / macro_f1 (classifier) or bleu / chrf (seq2seq with eval_bleu; higher is better)
    best_metric: Literal["loss", "accuracy", "macro_f1", "bleu", "chrf"] = "loss"
    patience: int | None = Field(None, gt=0)  # stop after this many validations without a better best_metric
    # validate (and keep as best.safetensors) an exponential moving average of the weights with this decay
    # (0: off; e.g. 0.999); model.safetensors keeps the trained weights (tfx/train/ema.py)
    ema: float = Field(0.0, ge=0.0, lt=1.0)
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars in RUN/tensorboard/ (needs tensorboard)
    freeze: list[str] = Field(default_factory=list)  # parameters kept fixed: names, prefixes, "embeddings", "blocks:N"
    keep_checkpoints: int = Field(1, gt=0)  # newest checkpoints kept in state/ (for `tfx average`)
    threads: int | None = Field(None, gt=0)
    compile: bool = False  # torch.compile the loss (forward and backward); the default is eager and fast
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: per-block sharding, sharded checkpoints (tfx/train/sharded.py)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    optimizer: OptimizerKind = _default(OPTIMIZER, "adamw")
    schedule: ScheduleKind = _default(SCHEDULE, "cosine")


class GenerateConfig(Strict):
    max_new_tokens: int = Field(200, gt=0)
    beam: int = Field(1, gt=0)              # seq2seq
    len_penalty: float = 1.0                # seq2seq: score / length**len_penalty (fairseq)
    max_len_a: float = Field(1.2, ge=0.0)   # seq2seq: max target length = a * source length + b
    max_len_b: int = Field(10, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    compile: bool = False  # lm: torch.compile the one-token decode step (about 30 s once; then ~1.8x on a CPU)


class Recipe(Strict):
    name: str = "run"
    family: str = "lm"  # a name of the family registry (tfx/families/)
    init_from: str | None = None  # a run to start from: all its tensors (same family) or its encoder (mlm/mim), and its tokenizer
    data: DataConfig
    tokenizer: TokenizerKind = _default(TOKENIZER, "char")
    src_tokenizer: Optional[TokenizerKind] = None  # seq2seq: a separate source-side tokenizer (default: joint)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)

    @field_validator("family")
    @classmethod
    def _family(cls, value: str) -> str:
        if value not in FAMILY:
            raise ValueError(FAMILY.unknown_message(value).replace("family kind", "family"))
        return value

    @model_validator(mode="before")
    @classmethod
    def _image_tokenizer(cls, raw: Any) -> Any:
        """A family that reads images takes the image "tokenizer" (tfx/data/image_codec.py) by default."""
        if isinstance(raw, dict) and raw.get("family") in FAMILY and family_of(raw["family"]).images \
                and "tokenizer" not in raw:
            return {**raw, "tokenizer": {"kind": "image"}}
        return raw

    @model_validator(mode="after")
    def _inputs(self) -> "Recipe":
        images = family_of(self).images
        if images != (self.tokenizer.kind == "image"):
            raise ValueError(f"tokenizer.kind = {self.tokenizer.kind!r}: family {self.family!r} reads "
                             + ("images; its [tokenizer] is kind = \"image\" (or leave the table out)" if images
                                else "text; kind \"image\" is for the vit family"))
        return self

    @model_validator(mode="after")
    def _best_metric(self) -> "Recipe":
        family = family_of(self)
        metric, reported = self.train.best_metric, family.metrics(self)
        if metric not in reported:
            raise ValueError(f"train.best_metric = {metric!r}: validation of family {self.family!r} reports "
                             + ", ".join(sorted(reported))
                             + (f" ({family.metrics_hint})" if family.metrics_hint else ""))
        return self


HIGHER_IS_BETTER = frozenset({"accuracy", "macro_f1", "bleu", "chrf"})


def recipe_model() -> type[Recipe]:
    """The recipe class (kept for callers that ask for it by function)."""
    return Recipe


def generate_settings(base: GenerateConfig, overrides: dict) -> GenerateConfig:
    """`base` (a recipe's [generate] table) with the given overrides (None = keep), validated as a
    recipe's values are; a bad value is a UsageError naming its command-line option."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return GenerateConfig.model_validate({**base.model_dump(), **given})
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            key = str(e["loc"][0]) if e["loc"] else "(generate)"
            lines.append(f"--{key.replace('_', '-')} {given.get(key)!r}: {e['msg'].removeprefix('Value error, ')}")
        raise UsageError("; ".join(lines)) from None


# ----------------------------------------------------------------------------- overrides

def parse_value(text: str) -> Any:
    """A `--set` value parsed as TOML so types survive; a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=200")
        node = raw
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise UsageError(f"--set {item!r}: {where} is a value, not a table")
            node = child
        node[parts[-1]] = parse_value(value.strip())
    return raw


# ----------------------------------------------------------------------------- errors

def validate(raw: dict, source: str = "recipe") -> Recipe:
    from tfx.config_errors import explain
    from tfx.kinds import problems

    root = Recipe
    try:
        recipe = root.model_validate(raw)
    except ValidationError as exc:
        lines = [explain(e, root, raw) for e in exc.errors()]
        raise UsageError(f"{source}: invalid recipe:\n  " + "\n  ".join(lines)) from None
    if lines := problems(recipe):
        raise UsageError(f"{source}: impossible combination:\n  " + "\n  ".join(lines))
    return recipe


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"recipe file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: not valid TOML: {exc}") from None


def check_files(recipe: Recipe, source: str) -> None:
    """Data files named in the recipe must exist (an `hf:` name is left to the hub)."""
    if recipe.data.corpus:
        from tfx.data.corpora import corpus_names

        names = corpus_names()
        if recipe.data.corpus not in names:
            hint = closest(recipe.data.corpus, names)
            raise UsageError(f"{source}: data.corpus: unknown corpus {recipe.data.corpus!r}; allowed: "
                             f"{', '.join(names)}" + (f" (did you mean {hint!r}?)" if hint else ""))
    d = recipe.data
    for split in ("train", "valid", "test"):
        value = getattr(d, split)
        if not value or value.startswith("hf:") or Path(value).is_file():
            continue
        pair = [Path(f"{value}.{d.src_lang}"), Path(f"{value}.{d.tgt_lang}")]
        two_sided = family_of(recipe).two_sided
        if two_sided and all(p.is_file() for p in pair):
            continue
        also = f" nor {pair[0]} + {pair[1]}" if two_sided else ""
        raise UsageError(
            f"{source}: data.{split}: file not found: {value!r}{also} "
            f"(give a local .txt/.tsv/.jsonl/.csv/.parquet file, or hf:NAME for a hub dataset)"
        )

    for key in ("tokenizer", "src_tokenizer"):
        tok_path = getattr(getattr(recipe, key), "path", None)
        if tok_path and not (Path(tok_path) / "tokenizer.json").is_file():
            raise UsageError(f"{source}: {key}.path: no tokenizer at {tok_path!r} (make one with `tfx tokenize train`)")
    if recipe.src_tokenizer is not None and not family_of(recipe).two_sided:
        raise UsageError(f"{source}: src_tokenizer: only a seq2seq recipe has a source side")


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, files: bool = True) -> Recipe:
    """Read, override and validate a recipe; raises UsageError with every problem found."""
    raw = apply_overrides(read_toml(path), list(overrides or []))
    recipe = validate(raw, str(path))
    if files:
        check_files(recipe, str(path))
    return recipe


def recipe_dict(recipe: BaseModel) -> dict:
    return recipe.model_dump(mode="json", exclude_none=True)


# ----------------------------------------------------------------------------- TOML out

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (in a list: model.attention_layers)
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: dict, prefix: str = "") -> str:
    """Write a nested dict of scalars and lists as TOML (tables after the scalars they follow)."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    out = []
    if scalars or not prefix:
        out.append((f"[{prefix}]\n" if prefix else "") + "\n".join(scalars))
    for k, v in data.items():
        if isinstance(v, dict):
            out.append(to_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n\n".join(s for s in out if s.strip()) + ("\n" if not prefix else "")


def validate_kind(reg: Registry, params: dict, where: str) -> Any:
    """Validate one `kind` table outside a recipe (e.g. command-line options)."""
    import_kinds()
    kind = params.get("kind", "")
    if kind not in reg:
        raise UsageError(f"{where}: {reg.unknown_message(kind)}")
    try:
        return reg.config_model(kind).model_validate(params)
    except ValidationError as exc:
        raise UsageError(f"{where}: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                  for e in exc.errors())) from None
