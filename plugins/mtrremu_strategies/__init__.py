"""The built-in zap strategies.

They register through :func:`mtrremu.plugin.hookspecs.mtrremu_strategies`, exactly as a
third-party plugin does; the plugin manager only takes care to register them first.

* :mod:`.kvm_releases` — ``kvm-6.5``, ``kvm-6.7``, ``kvm-6.11``: released kernels' rules.
* :mod:`.series` — ``zap-all``, ``zap-all-serialized``, ``fine-grained``,
  ``fine-grained-split``: the "refine memtype related mmu zap" series, patch by patch.
* :mod:`.experimental` — ``precise`` (zap exactly what changed) and ``lazy`` (Xen-style
  deferred re-evaluation): designs of our own, measured against the series.
"""
