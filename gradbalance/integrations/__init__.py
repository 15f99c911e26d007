"""Recipes and small helpers for training frameworks: `lightning` (PyTorch Lightning) and
`huggingface` (the `transformers` Trainer and `accelerate`).

Each submodule imports its framework on import; ``import gradbalance`` imports none of them.
"""
