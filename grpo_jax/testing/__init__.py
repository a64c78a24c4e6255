"""Tiny models, tokenizers, datasets and search fixtures built in code, for tests and smoke runs."""
