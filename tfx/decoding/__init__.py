"""Decoding: logit processors and sampling, autoregressive generation with a KV cache."""
