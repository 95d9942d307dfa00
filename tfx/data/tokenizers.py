"""Tokenizers: byte, char and sentencepiece behind one small interface.

Every kind reserves ids 0..3 for pad, bos, eos and unk. ``encode`` adds no bos/eos; ``decode``
skips pad/bos/eos and never fails on an id outside the vocabulary (a sampled id from a padded
output layer decodes like unk). A tokenizer lives in a directory whose ``tokenizer.json`` names
the kind and holds what the kind needs (char: its characters; sentencepiece: the model file's
name), so a run directory reloads it without executing any code.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from tfx.errors import UsageError
from tfx.registry import TOKENIZER, KindConfig

SPEC_FILE = "tokenizer.json"
N_SPECIAL = 4  # pad, bos, eos, unk
REPLACEMENT = "\ufffd"


class ByteConfig(KindConfig):
    """UTF-8 bytes: nothing to train, 260 ids."""

    kind: Literal["byte"] = "byte"


class CharConfig(KindConfig):
    """One id per character seen in the training text; unseen characters become unk."""

    kind: Literal["char"] = "char"


class SentencePieceConfig(KindConfig):
    """Subwords trained with the sentencepiece library; ``path`` reuses a saved tokenizer."""

    kind: Literal["sentencepiece"] = "sentencepiece"
    vocab_size: int = Field(2000, ge=8)
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: float = Field(1.0, gt=0.0, le=1.0)
    # Unseen characters become their UTF-8 bytes instead of unk; costs 256 ids of the vocabulary.
    byte_fallback: bool = True
    # Case-fold (and NFKC-normalise) every text, in training and in encoding alike, so "Great" and
    # "great" are one token: for classifiers and pretraining on lowercased corpora; decode then gives
    # the folded text.
    lowercase: bool = False
    path: str | None = None
    # Subword regularisation of training batches (seq2seq, classifier; evaluation, generation and `tfx
    # tokenize` keep the best segmentation): each epoch re-encodes the training texts, seeded by (train.seed,
    # epoch). bpe: BPE-dropout (Provilkov et al., 2020), sampling_alpha = the probability of dropping a merge,
    # in (0, 1] (paper: 0.1); unigram: subword sampling (Kudo, 2018), sampling_alpha > 0 sharpens the
    # segmentations' probabilities (paper: 0.1-0.5), nbest_size picks among the n best (-1: all). None: off.
    sampling_alpha: float | None = Field(None, gt=0.0)
    nbest_size: int = -1

    @field_validator("sampling_alpha")
    @classmethod
    def _bpe_dropout_is_a_probability(cls, alpha: float | None, info: ValidationInfo) -> float | None:
        if alpha is not None and alpha > 1 and info.data.get("model_type") == "bpe":
            raise ValueError("for a bpe model sampling_alpha is the BPE-dropout probability of a merge, in (0, 1]")
        return alpha

    @field_validator("nbest_size")
    @classmethod
    def _nbest(cls, n: int) -> int:
        if n in (0, 1) or n < -1 or n > 512:
            raise ValueError("nbest_size is -1 (sample among all segmentations) or 2 to 512 (among the n best)")
        return n


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _id_list(ids: Iterable[int]) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors, without per-element boxing
        return ids.tolist()
    return ids if isinstance(ids, list) else list(ids)


class Tokenizer:
    """The interface every kind implements; ``save``/``load_tokenizer`` are shared."""

    kind: ClassVar[str] = ""
    pad_id: ClassVar[int] = 0
    bos_id: ClassVar[int] = 1
    eos_id: ClassVar[int] = 2
    unk_id: ClassVar[int] = 3
    vocab_size: int

    def __init__(self, config: KindConfig):
        self.config = config

    @classmethod
    def train(cls, cfg: Any, texts: Iterable[str]) -> "Tokenizer":
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Write ``directory/tokenizer.json`` (last, so its presence means the rest is there)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._write_files(d)
        spec = {"kind": self.kind, "vocab_size": self.vocab_size,
                "config": self.config.model_dump(), **self._spec()}
        _write_atomic(d / SPEC_FILE, (json.dumps(spec, indent=1) + "\n").encode("utf-8"))

    def _spec(self) -> dict[str, Any]:
        return {}

    def _write_files(self, directory: Path) -> None:
        pass

    @classmethod
    def _load(cls, cfg: Any, spec: dict[str, Any], directory: Path) -> "Tokenizer":
        return cls(cfg)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


@TOKENIZER.register("byte", config=ByteConfig)
class ByteTokenizer(Tokenizer):
    """Raw UTF-8 bytes, byte b -> id b + 4: any text, no training, no unknowns."""

    kind = "byte"
    vocab_size = N_SPECIAL + 256

    def __init__(self, config: ByteConfig | None = None):
        super().__init__(config or ByteConfig())

    @classmethod
    def train(cls, cfg: ByteConfig, texts: Iterable[str]) -> "ByteTokenizer":
        return cls(cfg)

    def encode(self, text: str) -> list[int]:
        raw = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        return (raw.astype(np.int64) + N_SPECIAL).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        a = np.asarray(_id_list(ids), dtype=np.int64)
        a = a[(a >= N_SPECIAL) & (a < self.vocab_size)] - N_SPECIAL
        return a.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


@TOKENIZER.register("char", config=CharConfig)
class CharTokenizer(Tokenizer):
    """Characters of the training text, sorted, after the four specials."""

    kind = "char"

    def __init__(self, config: CharConfig | None = None, *, chars: Iterable[str]):
        super().__init__(config or CharConfig())
        chars = sorted(set(chars))
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("a char vocabulary holds single characters only")
        self.chars: list[str] = chars
        self.vocab_size = N_SPECIAL + len(chars)
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted, as chars
        self._pieces = ["", "", "", REPLACEMENT, *chars]

    @classmethod
    def train(cls, cfg: CharConfig, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(cfg, chars=seen)

    def encode(self, text: str) -> list[int]:
        # Vectorised lookup: code points -> position in the sorted vocabulary, else unk.
        cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        if len(self._codepoints) == 0:
            return [self.unk_id] * len(cps)
        pos = np.minimum(np.searchsorted(self._codepoints, cps), len(self._codepoints) - 1)
        ids = np.where(self._codepoints[pos] == cps, pos + N_SPECIAL, self.unk_id)
        return ids.tolist()

    def decode(self, ids: Iterable[int]) -> str:
        a = np.asarray(_id_list(ids), dtype=np.int64)
        a[(a < 0) | (a >= self.vocab_size)] = self.unk_id
        pieces = self._pieces
        return "".join([pieces[i] for i in a.tolist()])

    def _spec(self) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def _load(cls, cfg: CharConfig, spec: dict[str, Any], directory: Path) -> "CharTokenizer":
        chars = spec["chars"]
        if not isinstance(chars, list):
            raise ValueError("'chars' is not a list")
        return cls(cfg, chars=chars)


NEWLINE_PIECE = "<nl>"
MAX_LINE_CHARS = 16384  # longer lines are cut into chunks for training only


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), MAX_LINE_CHARS):
                yield line[start:start + MAX_LINE_CHARS]


@TOKENIZER.register("sentencepiece", config=SentencePieceConfig)
class SentencePieceTokenizer(Tokenizer):
    """Subword units from sentencepiece (Kudo & Richardson, 2018): BPE (Sennrich et al., 2016)
    or the unigram language model (Kudo, 2018).

    sentencepiece sees single lines, so a text is encoded line by line with the control piece
    ``<nl>`` between lines. Control pieces never come out of encoding text, so a literal "<nl>"
    in the text stays text. Whitespace is kept as is (identity normalisation, no collapsing), so
    ``decode(encode(text)) == text``, except that U+2581 (sentencepiece's own space mark) decodes
    as a space, and that ``lowercase = true`` folds case (with NFKC) in training and encoding.
    """

    kind = "sentencepiece"
    model_file = "sp.model"

    def __init__(self, config: SentencePieceConfig | None = None, *, model_proto: bytes):
        import sentencepiece as spm

        super().__init__(config or SentencePieceConfig())
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._sampler: tuple = (None, None)  # (alpha, nbest_size) and its SubwordSampler
        self.vocab_size = self._sp.get_piece_size()
        specials = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id())
        if specials != (0, 1, 2, 3):
            raise ValueError(f"pad/bos/eos/unk ids are {specials}, not (0, 1, 2, 3)")
        self.newline_id = self._sp.piece_to_id(NEWLINE_PIECE)
        if self.newline_id == self.unk_id or not self._sp.is_control(self.newline_id):
            raise ValueError(f"the model has no control piece {NEWLINE_PIECE!r}")

    @classmethod
    def train(cls, cfg: SentencePieceConfig, texts: Iterable[str]) -> Tokenizer:
        if cfg.path is not None:
            tok = load_tokenizer(cfg.path)
            if not isinstance(tok, cls):
                raise UsageError(f"tokenizer.path {cfg.path!r} holds a {tok.kind!r} tokenizer, "
                                 "not a sentencepiece one")
            return tok
        import sentencepiece as spm

        spm.set_random_generator_seed(0)  # the sampled/shuffled training lines are reproducible
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(texts), model_writer=model,
                vocab_size=cfg.vocab_size, model_type=cfg.model_type,
                character_coverage=cfg.character_coverage, byte_fallback=cfg.byte_fallback,
                pad_id=0, bos_id=1, eos_id=2, unk_id=3, control_symbols=[NEWLINE_PIECE],
                unk_surface=REPLACEMENT,
                # keep the text exactly (no NFKC, no collapsing of repeated spaces) unless it is to be
                # case-folded; the rule is saved in the model, so encoding folds the same way
                normalization_rule_name="nfkc_cf" if cfg.lowercase else "identity", remove_extra_whitespaces=False,
                split_by_whitespace=True, allow_whitespace_only_pieces=True,
                # a small corpus gets a smaller vocabulary instead of an error
                hard_vocab_limit=False,
                max_sentence_length=4 * MAX_LINE_CHARS, input_sentence_size=2_000_000,
                shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=1)
        except RuntimeError as e:
            raise UsageError(f"sentencepiece could not train with "
                             f"{cfg.model_dump(exclude_none=True)}: {e}") from None
        return cls(cfg, model_proto=model.getvalue())

    def encode(self, text: str) -> list[int]:
        return self._join(self._sp.encode(text.split("\n"), num_threads=os.cpu_count() or 1))

    def _join(self, lines: Iterable[list[int]]) -> list[int]:
        """The ids of a text's lines, with the ``<nl>`` piece between them."""
        out: list[int] = []
        for i, ids in enumerate(lines):
            if i:
                out.append(self.newline_id)
            out.extend(ids)
        return out

    def encode_sampled(self, texts: list[str], *, alpha: float, nbest_size: int = -1, seed: int) -> list[list[int]]:
        """A sampled segmentation of each text, laid out as by ``encode``: BPE-dropout for a bpe model,
        unigram sampling for a unigram one; a function of (texts, alpha, nbest_size, seed) alone, in any
        process (tfx.data.subword_sampling says why sentencepiece's own sampling is not)."""
        from tfx.data.subword_sampling import SubwordSampler

        key = (float(alpha), int(nbest_size))
        if self._sampler[0] != key:  # kept: it remembers the words it has seen
            self._sampler = (key, SubwordSampler(self._sp, model_type=self.config.model_type, alpha=alpha,
                                                 nbest_size=nbest_size))
        lines = [line for text in texts for line in text.split("\n")]
        encoded = iter(self._sampler[1](lines, seed))
        return [self._join(next(encoded) for _ in range(text.count("\n") + 1)) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id}
        nl, n = self.newline_id, self.vocab_size
        lines: list[list[int]] = [[]]
        for i in _id_list(ids):
            if i == nl:
                lines.append([])
            elif i not in skip:
                lines[-1].append(i if 0 <= i < n else self.unk_id)
        return "\n".join(self._sp.decode(lines))

    def _spec(self) -> dict[str, Any]:
        return {"model_file": self.model_file, "newline_piece": NEWLINE_PIECE}

    def _write_files(self, directory: Path) -> None:
        _write_atomic(directory / self.model_file, self._proto)

    @classmethod
    def _load(cls, cfg: SentencePieceConfig, spec: dict[str, Any],
              directory: Path) -> "SentencePieceTokenizer":
        name = spec.get("model_file", cls.model_file)
        if not isinstance(name, str) or Path(name).name != name:
            raise ValueError(f"bad model_file {name!r}")
        return cls(cfg, model_proto=(directory / name).read_bytes())


def training_sampler(cfg: KindConfig | None, tokenizer: Tokenizer,
                     key: str = "tokenizer") -> Callable[[list[str], int], list[list[int]]] | None:
    """The recipe's subword sampling of training texts, ``sample(texts, seed) -> ids``, or None where
    ``cfg`` (the recipe's ``key`` table) sets no sampling_alpha; checked against the real model
    (``path`` may name a saved one)."""
    alpha = getattr(cfg, "sampling_alpha", None)
    if alpha is None:
        return None
    if not isinstance(tokenizer, SentencePieceTokenizer):
        raise UsageError(f"{key}.sampling_alpha: the run's {key} is a {tokenizer.kind} one; subword sampling "
                         "needs a sentencepiece model")
    if getattr(tokenizer.config, "model_type", "bpe") == "bpe" and alpha > 1:
        raise UsageError(f"{key}.sampling_alpha: {alpha} for a bpe model ({key}.path holds one), whose "
                         "sampling_alpha is the BPE-dropout probability of a merge, in (0, 1]")
    nbest = cfg.nbest_size
    return lambda texts, seed: tokenizer.encode_sampled(texts, alpha=alpha, nbest_size=nbest, seed=seed)


def sampling_kind(tokenizer: Tokenizer, cfg: KindConfig) -> str:
    """How `cfg` samples `tokenizer`'s segmentations, in words (for the log)."""
    unigram = getattr(tokenizer.config, "model_type", "bpe") == "unigram"
    return f"unigram sampling alpha {cfg.sampling_alpha:g}, nbest {cfg.nbest_size}" if unigram \
        else f"BPE-dropout {cfg.sampling_alpha:g}"


def train_tokenizer(cfg: KindConfig, texts: Iterable[str]) -> Tokenizer:
    """Build the tokenizer ``cfg`` describes from training texts (byte ignores them)."""
    if cfg.kind not in TOKENIZER:
        raise UsageError(TOKENIZER.unknown_message(cfg.kind))
    return TOKENIZER.get(cfg.kind).train(cfg, texts)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer saved by ``Tokenizer.save``; a missing or corrupt one is a UsageError."""
    d = Path(directory)
    spec_path = d / SPEC_FILE
    if not spec_path.is_file():
        raise UsageError(f"no tokenizer at {d}: {spec_path} does not exist")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        kind = spec["kind"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"corrupt tokenizer file {spec_path}: {e!r}") from None
    if not isinstance(kind, str) or kind not in TOKENIZER:
        raise UsageError(f"{spec_path}: {TOKENIZER.unknown_message(str(kind))}")
    try:
        cfg = TOKENIZER.config_model(kind).model_validate(spec.get("config") or {"kind": kind})
        return TOKENIZER.get(kind)._load(cfg, spec, d)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f"corrupt {kind} tokenizer in {d}: {e}") from None
