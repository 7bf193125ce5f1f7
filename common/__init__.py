"""Shared ground, below every other package: what a training run and an evaluation both read.

- ``common.config``: the experiment configuration (nested dataclasses, YAML + ``key=value``).
- ``common.manifest``: is a model or checkpoint folder whole, and which task and rating scale it
  was trained for.
- ``common.errors``: the user-error types and how every command reports them.

It imports nothing of the project, so ``data``, ``models``, ``eval`` and ``grpo`` all stand on it
and none of them has to climb into another for its settings or its error types.
"""
