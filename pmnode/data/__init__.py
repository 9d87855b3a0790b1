"""Tokenizers, corpus files and the deterministic train / held-out batches."""
