"""Evaluation: zero-shot classification and image-text retrieval (zeroshot), and the benchmarks built on them."""
