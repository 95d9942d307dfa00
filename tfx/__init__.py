"""tfx: train, evaluate and generate with Transformer variants from a TOML recipe."""

__version__ = "0.1.0"
