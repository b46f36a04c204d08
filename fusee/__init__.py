"""fusee: a fully memory-disaggregated key-value store (after FUSEE, USENIX FAST 2023).

``from fusee import Client, LocalCluster`` works, but importing ``fusee`` (or ``fusee.verbs``)
loads neither of them: transports import ``fusee.verbs``, so an eager import here would be a
cycle and would pull ZeroMQ into every memory node and simulator. They load on first access
(PEP 562), as does ``__version__`` (the installed distribution's version).
"""

from __future__ import annotations

_LAZY = {"Client": ("fusee.client", "Client"),
         "LocalCluster": ("emulator.cluster", "LocalCluster")}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import version
        globals()[name] = value = version("fusee")
        return value
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'fusee' has no attribute {name!r}") from None
    import importlib
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
