"""The "hf" tokenizer kind: a Hugging Face fast-tokenizer file (tokenizer.json) behind tfx's interface.

`tfx convert` imports one with a Hugging Face model, so the ids are exactly the model's. Unlike the
other kinds its special ids are the model's own, set per instance (GPT-2: pad = bos = eos = unk =
50256). The run's tokenizer directory holds the Hugging Face file as ``hf-tokenizer.json`` next to
tfx's ``tokenizer.json``. The `tokenizers` package is imported only when an hf tokenizer is built.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Literal

from tfx.data.tokenizers import SPEC_FILE, Tokenizer, _id_list, _write_atomic, load_tokenizer
from tfx.errors import UsageError
from tfx.registry import TOKENIZER, KindConfig

HF_FILE = "hf-tokenizer.json"
ROLES = ("pad", "bos", "eos", "unk")
# The keys of a tokenizer_config.json / special_tokens_map.json naming each role's token, in order.
TOKEN_KEYS = {"pad": ("pad_token",), "bos": ("bos_token", "cls_token"), "eos": ("eos_token", "sep_token"),
              "unk": ("unk_token",)}
NOT_TRAINED = ("an hf tokenizer is imported with `tfx convert` from a Hugging Face model directory, not trained; "
               "to reuse one in a new run set tokenizer.path to a Hugging Face model directory, its "
               "tokenizer.json, or a saved tfx hf tokenizer")


class HFTokenizerConfig(KindConfig):
    """A Hugging Face tokenizer.json; ``path`` reuses one for a new run: a Hugging Face model directory,
    its tokenizer.json, or a saved tfx tokenizer of this kind."""

    kind: Literal["hf"] = "hf"
    path: str | None = None


def _backend() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise UsageError("the hf tokenizer needs the `tokenizers` package: pip install tokenizers") from None
    return tokenizers


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} where the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _first_id(value: Any) -> int | None:
    """An id from config.json: an int, or the first of a list (Llama 3 lists several eos ids)."""
    if isinstance(value, list) and value:
        value = value[0]
    return value if type(value) is int and value >= 0 else None


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_id(key: str, maps: list[dict[str, Any]], lookup: Any) -> int | None:
    """The id of the first token any of `maps` names under `key` that the tokenizer knows, else None."""
    if lookup is None:
        return None
    for m in maps:
        token = _token_string(m.get(key))
        if token is not None and (i := lookup(token)) is not None:
            return i
    return None


def _hf_dir_files(d: Path, tokenizer_file: str | Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """A model directory's (tokenizer_config.json and special_tokens_map.json, config.json, the
    token_to_id of `tokenizer_file` (default: its tokenizer.json) or None where it cannot be read)."""
    tok_file = Path(tokenizer_file) if tokenizer_file is not None else d / "tokenizer.json"
    maps = [_read_json(d / "tokenizer_config.json"), _read_json(d / "special_tokens_map.json")]
    lookup = None
    if tok_file.is_file():
        try:
            lookup = _backend().Tokenizer.from_file(str(tok_file)).token_to_id
        except Exception:  # no package, or a malformed file: the ids of config.json only
            lookup = None
    return maps, _read_json(d / "config.json"), lookup


def named_token_id(hf_dir: str | Path, key: str) -> int | None:
    """The id of the token a model directory's tokenizer files name under `key` (e.g. "mask_token"),
    looked up in its tokenizer.json; else config.json's ``<key>_id``; else None."""
    maps, config, lookup = _hf_dir_files(Path(hf_dir))
    found = _token_id(key, maps, lookup)
    return found if found is not None else _first_id(config.get(f"{key}_id"))


@TOKENIZER.register("hf", config=HFTokenizerConfig)
class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer; ``encode`` adds no special tokens (nor truncates or pads),
    ``decode`` skips pad/bos/eos and ids outside the file's tokens."""

    kind = "hf"

    def __init__(self, config: HFTokenizerConfig | None = None, *, data: bytes, vocab_size: int | None = None,
                 pad_id: int, bos_id: int, eos_id: int, unk_id: int, extra_tokens: dict[str, str] | None = None):
        """`extra_tokens`: the model's other named tokens (mask_token, cls_token, sep_token, ...), kept for
        `save_hf`."""
        tokenizers = _backend()
        super().__init__(config or HFTokenizerConfig())
        try:
            tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"not a Hugging Face tokenizer file: {e}") from None
        tok.no_truncation()
        tok.no_padding()
        self._tok, self._data = tok, data
        ids = tok.get_vocab(with_added_tokens=True).values()
        # the file's own tokens; vocab_size (the model's embedding rows) may be more
        self.n_tokens = max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        vocab_size = self.n_tokens if vocab_size is None else vocab_size
        if type(vocab_size) is not int:
            raise ValueError(f"vocab_size {vocab_size!r} is not an int")
        if vocab_size < self.n_tokens:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {self.n_tokens} tokens")
        self.vocab_size = vocab_size
        for role, i in zip(ROLES, (pad_id, bos_id, eos_id, unk_id)):
            if type(i) is not int or not 0 <= i < vocab_size:
                raise ValueError(f"{role}_id {i!r} is not an id in 0..{vocab_size - 1}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = pad_id, bos_id, eos_id, unk_id  # type: ignore[misc]
        self.special_tokens = {role: tok.id_to_token(getattr(self, f"{role}_id")) for role in ROLES}
        self.extra_tokens = {k: v for k, v in (extra_tokens or {}).items()
                             if isinstance(k, str) and isinstance(v, str) and tok.token_to_id(v) is not None}

    @classmethod
    def from_hf_file(cls, path: str | Path, *, vocab_size: int | None = None, pad_id: int | None = None,
                     bos_id: int | None = None, eos_id: int | None = None, unk_id: int | None = None,
                     config: HFTokenizerConfig | None = None) -> "HFTokenizer":
        """The tokenizer of a Hugging Face tokenizer.json. `vocab_size` (default: the file's tokens, added
        ones included) may exceed the file's tokens, for a model with a padded vocabulary. A missing bos or
        eos is the other; a missing pad or unk is eos. ValueError when no eos can be found or an id is bad."""
        eos_id = bos_id if eos_id is None else eos_id
        bos_id = eos_id if bos_id is None else bos_id
        if eos_id is None:
            raise ValueError(f"{path}: no eos (or bos) id given; special_ids_from_hf_dir finds a model's")
        pad_id = eos_id if pad_id is None else pad_id
        unk_id = eos_id if unk_id is None else unk_id
        return cls(config, data=Path(path).read_bytes(), vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id,
                   eos_id=eos_id, unk_id=unk_id)

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path, *, vocab_size: int | None = None,
                    config: HFTokenizerConfig | None = None, **ids: int | None) -> "HFTokenizer":
        """The tokenizer of a Hugging Face model directory (its tokenizer.json), with the special ids
        `special_ids_from_hf_dir` finds there; `ids` (pad_id=..., ...) override them."""
        found = cls.special_ids_from_hf_dir(hf_dir)
        found.update({k: v for k, v in ids.items() if v is not None})
        tok = cls.from_hf_file(Path(hf_dir) / "tokenizer.json", vocab_size=vocab_size, config=config, **found)
        d, roles = Path(hf_dir), {f"{role}_token" for role in ROLES}
        for m in (_read_json(d / "special_tokens_map.json"), _read_json(d / "tokenizer_config.json")):
            named = {k: _token_string(v) for k, v in m.items() if k.endswith("_token") and k not in roles}
            tok.extra_tokens.update({k: v for k, v in named.items() if v and tok._tok.token_to_id(v) is not None})
        return tok

    @staticmethod
    def special_ids_from_hf_dir(hf_dir: str | Path, tokenizer_file: str | Path | None = None) -> dict[str, int | None]:
        """{"pad_id", "bos_id", "eos_id", "unk_id"} of a Hugging Face model directory, None where not found.
        A role's token in tokenizer_config.json, else special_tokens_map.json (BERT-style models: bos is
        [CLS], eos is [SEP]), is looked up in `tokenizer_file` (default: the directory's tokenizer.json);
        else config.json's ``<role>_token_id`` is taken. An encoder-decoder model's decoder_start_token_id
        is bos, as tfx's seq2seq starts the target with bos. Missing or unreadable files are skipped."""
        maps, config, lookup = _hf_dir_files(Path(hf_dir), tokenizer_file)
        out: dict[str, int | None] = {}
        for role in ROLES:
            key, *aliases = TOKEN_KEYS[role]
            found = _token_id(key, maps, lookup)
            if found is None:
                found = _first_id(config.get(f"{role}_token_id"))
            for key in aliases:
                found = _token_id(key, maps, lookup) if found is None else found
            out[f"{role}_id"] = found
        start = _first_id(config.get("decoder_start_token_id"))
        if start is not None and config.get("is_encoder_decoder"):
            out["bos_id"] = start
        return out

    @classmethod
    def train(cls, cfg: HFTokenizerConfig, texts: Iterable[str]) -> Tokenizer:
        if cfg.path is None:
            raise UsageError(NOT_TRAINED)
        p = Path(cfg.path)
        try:
            if (p / HF_FILE).is_file():  # a saved tfx tokenizer
                tok = load_tokenizer(p)
                if not isinstance(tok, cls):
                    raise UsageError(f"tokenizer.path {cfg.path!r} holds a {tok.kind!r} tokenizer, not an hf one")
                return tok
            if p.is_dir():
                return cls.from_hf_dir(p, config=cfg)
            if p.is_file():
                return cls.from_hf_file(p, config=cfg, **cls.special_ids_from_hf_dir(p.parent, p))
        except (OSError, ValueError) as e:
            raise UsageError(f"tokenizer.path {cfg.path!r}: {e}") from None
        raise UsageError(f"tokenizer.path {cfg.path!r} does not exist")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        skip, n = {self.pad_id, self.bos_id, self.eos_id}, self.n_tokens
        kept = [int(i) for i in _id_list(ids) if 0 <= i < n and i not in skip]
        return self._tok.decode(kept, skip_special_tokens=False)

    def save_hf(self, out_dir: str | Path) -> None:
        """Write what `transformers.AutoTokenizer.from_pretrained(out_dir)` loads: the Hugging Face file as
        tokenizer.json and a tokenizer_config.json naming the special tokens."""
        d = Path(out_dir)
        if (d / HF_FILE).exists():
            raise ValueError(f"{d} is a tfx tokenizer directory; its tokenizer.json is tfx's own")
        d.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.extra_tokens,
                  **{f"{role}_token": t for role, t in self.special_tokens.items() if t is not None}}
        _write_atomic(d / "tokenizer.json", self._data)
        _write_atomic(d / "tokenizer_config.json", (json.dumps(config, indent=1) + "\n").encode("utf-8"))

    def _spec(self) -> dict[str, Any]:
        return {"hf_file": HF_FILE, **{f"{role}_id": getattr(self, f"{role}_id") for role in ROLES},
                "special_tokens": self.special_tokens, "extra_tokens": self.extra_tokens}

    def _write_files(self, directory: Path) -> None:
        _write_atomic(directory / HF_FILE, self._data)

    @classmethod
    def _load(cls, cfg: HFTokenizerConfig, spec: dict[str, Any], directory: Path) -> "HFTokenizer":
        name = spec.get("hf_file", HF_FILE)
        if not isinstance(name, str) or Path(name).name != name or name == SPEC_FILE:
            raise ValueError(f"bad hf_file {name!r}")
        ids = {f"{role}_id": spec[f"{role}_id"] for role in ROLES}
        return cls(cfg, data=(directory / name).read_bytes(), vocab_size=spec["vocab_size"],
                   extra_tokens=spec.get("extra_tokens") or {}, **ids)
