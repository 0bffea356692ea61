"""mtrremu: an emulator of how Linux KVM on Intel EPT decides guest memory types and zaps.

Quick start::

    import mtrremu
    vm = mtrremu.create_vm(mtrremu.VmConfig(vcpus=2, noncoherent_dma=1), "fine-grained")
    vm.write_cr0(0, 0x10)          # guest clears CR0.CD: a zap event under the series' rules
    vm.access(0, 0x1000)            # a fault installs a leaf

The core lives in :mod:`mtrremu.core`, the plugin API in :mod:`mtrremu.plugin`.
"""

from collections.abc import Mapping

from mtrremu.core import *  # noqa: F403  (the core's public names are the package's)
from mtrremu.core import __all__ as _core_all
from mtrremu.core.config import VmConfig
from mtrremu.core.vm import Vm
from mtrremu.plugin.manager import PluginManager, default_manager


def create_vm(
    config: VmConfig | None = None,
    strategy: str = "fine-grained",
    options: Mapping[str, str] | None = None,
) -> Vm:
    """A VM built by the default plugin manager (built-ins plus installed plugins)."""
    return default_manager().create_vm(config, strategy, options)


__all__ = [*_core_all, "PluginManager", "create_vm", "default_manager"]  # noqa: PLE0604
