"""Evaluators for generated images.

`shapes_eval` is a classical (no learned network), deterministic scorer of
generated images against sentence prompts of the built-in `shapes` dataset.
"""
