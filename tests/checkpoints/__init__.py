"""Checkpoints written by earlier versions of the package, kept so that they keep loading.

See `tests.checkpoints.recipe` for how they were written and how to write a new one.
"""
