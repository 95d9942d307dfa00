"""Small Hugging Face models built locally for the `tfx convert` tests (no hub): tokenizers trained on
a few hundred lines, random models saved as safetensors, and the comparisons every architecture makes."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the quick brown fox jumps over a lazy dog while café naïve über Straße "
         "ninety-nine bottles of beer on the wall and then some more").split()
IDS_SEED = 0


def lines(n: int = 300) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def byte_bpe(directory: Path, *, vocab: int = 300, specials=("<|endoftext|>",), config: dict | None = None) -> int:
    """A byte-level BPE tokenizer.json (GPT-2's kind) in `directory` with `specials` last, plus a
    tokenizer_config.json naming the first as bos/eos/unk; returns the tokenizer's size."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines(), trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(list(specials))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    first = specials[0]
    (directory / "tokenizer_config.json").write_text(json.dumps(
        config or {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": first, "eos_token": first,
                   "unk_token": first}))
    return tok.get_vocab_size(with_added_tokens=True)


def random_ids(vocab: int, shape=(2, 12), seed: int = IDS_SEED) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def save_hf(model, directory: Path) -> Path:
    """save_pretrained as safetensors into `directory` (next to the tokenizer files already there)."""
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def load_clean(cls, directory: Path):
    """cls.from_pretrained(directory) in eval mode, asserting it reports no missing, unexpected or
    mismatched weights (what transformers would warn about)."""
    model, info = cls.from_pretrained(str(directory), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | \
        ({"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    assert not problems, problems
    return model.eval()


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()
