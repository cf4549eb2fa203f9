"""Rule-based rewards: one module per family, a registry, a time-boxed worker pool.

Public entry points: :class:`r1mega.rewards.scorer.RewardScorer` (the trainer's),
:func:`r1mega.rewards.registry.register_reward` (add a reward; list its module in
``rewards.modules`` so the workers import it), ``r1mega reward`` (``cli.main``).

A reward may register a ``self_check`` (run once per scorer before scoring: the sandbox judges a
known-good and a known-bad program, math-verify a known pair; a failure raises
``RewardSetupError`` naming the cause) and raises ``MissingReference`` for a reference without
the fields it needs, which the scorer reports in the item's ``error``. A reward's name also
works as a kind of its own (``{"kind": "format"}``: that reward alone).

Rewards and the reference fields they read (all also accept ``answer_pattern``, a regex whose
first group is the answer, instead of the last ``<answer>`` block):

================  ===========================================  ===========================
reward            reference                                    module
================  ===========================================  ===========================
math_accuracy     ``answer``                                   math.py (math-verify)
exact_match       ``answer``                                   math.py
format            (none) strict R1-Zero structure               format.py
format_lenient    (none)                                       format.py
code_tests        ``tests``, ``entry_point``, ``prefix``;      code.py + sandbox.py
                  or ``stdio`` [{input, output}]
countdown         ``numbers``, ``target``, ``require_all``     puzzles.py
river_crossing    ``items``, ``rowers``, ``forbidden``,        puzzles.py
                  ``capacity``
language_consistency  ``language`` (else rewards.target_language)  language.py
overlong_penalty  (none) uses num_tokens, max_new_tokens       length.py
reasoning_gym     ``dataset``, ``entry``                       reasoning_gym.py
================  ===========================================  ===========================
"""
