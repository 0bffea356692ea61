"""Tools for people who test zap strategies.

* :mod:`mtrremu.testing.mutants` — deliberately broken strategies, each one plausible bug, that
  a workload with detection power must catch (``mtrremu ab --plugin mtrremu.testing.mutants``,
  ``scripts/mutants.py``).
"""
