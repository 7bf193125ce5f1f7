"""Scoring and evaluation: the layer between ``models`` and ``grpo``.

``score`` (soft / hard scores, anchor ranking, Mean@k), ``pairwise``, ``metrics`` (the official
protocols) and ``evaluate.evaluate`` (score a set of prompt groups, report every protocol) read only
``common``, ``data`` and ``models``. The training loop's held-out evaluation therefore calls *down*
into ``eval.evaluate.evaluate``: the same code the ``python -m eval.evaluate`` and ``eval.rank``
commands run, so a number logged during training and a number reported afterwards are one
computation. It sits below ``grpo`` rather than in a package of its own because the metric
protocols it reports are a public contract at ``eval.metrics``; nothing in ``eval`` imports ``grpo``.

The judge as a reward service sits on top of ``score`` and ``rank`` (docs/serving.md): ``batch``
(many prompts in batched rollouts), ``adapters`` (the call shapes of diffusion-RL trainers),
``serve`` with ``serve_io`` and ``coalesce`` (the HTTP server) and ``client``.
"""
