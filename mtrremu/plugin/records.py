"""Typed registration records: what a plugin hands the manager."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mtrremu.core.memtype import Profile
from mtrremu.core.oracle import Gap
from mtrremu.core.strategy import MmuLock, ZapStrategy

#: Builds one VM's strategy object from its (already validated) options.
StrategyFactory = Callable[[Mapping[str, str]], ZapStrategy]

_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]*")


@dataclass(frozen=True)
class StrategySpec:
    """One zap strategy a plugin provides.

    ``profile`` is the memory-type profile VMs using the strategy get
    (docs/semantics.md#the-ept-entry-a-fault-installs).
    ``options`` documents the option names the factory accepts (name → help); a VM asking for
    any other option is refused before the factory runs. ``known_gaps`` declares the KVM
    behaviour the strategy reproduces on purpose that leaves a vCPU's own view stale after its
    event (:class:`~mtrremu.core.oracle.Gap`): the oracle reports what a declared gap explains
    as excused, by name, not as stale. A strategy meant to be correct declares none.
    ``mmu_lock`` says how every zap of its VMs holds the MMU lock.
    """

    name: str
    description: str
    profile: Profile
    factory: StrategyFactory
    options: Mapping[str, str] = field(default_factory=dict)
    known_gaps: frozenset[Gap] = frozenset()
    #: How the strategy's zaps hold the MMU lock (patch 12 holds it for read).
    mmu_lock: MmuLock = MmuLock.WRITE

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"strategy name {self.name!r} must be lower-case letters, digits, '.' and '-'"
            )
