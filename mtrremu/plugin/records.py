"""Typed registration records: what a plugin hands the manager."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mtrremu.core.memtype import Profile
from mtrremu.core.strategy import ZapStrategy

#: Builds one VM's strategy object from its (already validated) options.
StrategyFactory = Callable[[Mapping[str, str]], ZapStrategy]

_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]*")


@dataclass(frozen=True)
class StrategySpec:
    """One zap strategy a plugin provides.

    ``profile`` is the memory-type profile VMs using the strategy get (semantics.md §5).
    ``options`` documents the option names the factory accepts (name → help); a VM asking for
    any other option is refused before the factory runs.
    """

    name: str
    description: str
    profile: Profile
    factory: StrategyFactory
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"strategy name {self.name!r} must be lower-case letters, digits, '.' and '-'"
            )
