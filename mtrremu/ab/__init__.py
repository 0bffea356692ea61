"""A/B comparison: workloads replayed under several strategies, counted, checked, reported.

:mod:`.runner` plans and runs (in-process or against a live server, on any Executor);
:mod:`.records` defines the JSON Lines record; :mod:`.report` renders tables, CSV and charts;
:mod:`.published` holds the series' published numbers.
"""
