"""Rule-based rewards: one module per family, a registry, a time-boxed worker pool.

Public entry points: :class:`r1mega.rewards.scorer.RewardScorer` (the trainer's),
:func:`r1mega.rewards.registry.register_reward` (add a reward), ``r1mega reward`` (``cli.main``).
"""
