"""Test profiles: ``quick`` (the default, for people at their desks) and ``ci`` (thorough;
``.ci/run`` sets ``MTRREMU_TEST_PROFILE=ci``). Both are seeded: the same profile runs the same
examples every time, so a failure reproduces."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from tests.helpers import PROFILE

_COMMON = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile("quick", _COMMON, max_examples=20, stateful_step_count=25)
settings.register_profile("ci", _COMMON, max_examples=150, stateful_step_count=50)
settings.load_profile(PROFILE)
