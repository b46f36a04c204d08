"""fusee: a fully memory-disaggregated key-value store (after FUSEE, USENIX FAST 2023).

``from fusee import Client, LocalCluster`` works, but importing ``fusee`` (or ``fusee.verbs``)
loads neither of them: transports import ``fusee.verbs``, so an eager import here would be a
cycle and would pull ZeroMQ into every memory node and simulator. They load on first access
(PEP 562), as does ``__version__`` (the installed distribution's version).

The repository keeps the emulated memory-node side and the client's verb backends in top-level
folders of their own (``emulator/``, ``transports/``), but they are installed as
``fusee.emulator`` and ``fusee.transports`` (``package-dir`` in pyproject.toml), so that fusee
claims no generic top-level name in site-packages. In a source checkout run without installing
(``PYTHONPATH=checkout``), the same names resolve through the checkout's root, added below to
this package's search path.
"""

from __future__ import annotations

import os as _os

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "emulator"))
        and _os.path.isfile(_os.path.join(_ROOT, "emulator", "__init__.py"))
        and _os.path.isfile(_os.path.join(_ROOT, "pyproject.toml"))):
    __path__.append(_ROOT)          # a source checkout: fusee.emulator is <root>/emulator

_LAZY = {"Client": ("fusee.client", "Client"),
         "LocalCluster": ("fusee.emulator.cluster", "LocalCluster")}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> object:
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
