"""A client's long-lived objects off the garbage collector's lists.

A client keeps tens of thousands of small objects for good: an index cache entry per key
(``fusee.cache``) and a slot target per slot in recent use (``ClientCore.target``). CPython
tracks each as a container, and every full collection walked all of them: in a load phase
that was ~7 us of an insert's ~50 us of client CPU, and each new one brought the next full
collection closer (issue 12). None of them can sit in a reference cycle (ints, tuples of
ints, and objects that never lead back to them), and an object in no cycle is freed by its
reference count alone: the collector has nothing to find there.

``untracked(obj)`` (emulator/_atomic.c, at the end) takes ``obj`` off the lists when nothing
it holds but its type is a container the collector tracks (a plain tuple of such counts as
one, as at a tuple's first collection); else it leaves it. Its class must keep it so: a field
assigned later must never lead back to the object. Where the extension is not built, the
objects stay tracked (``untracked_py``): the same behaviour, slower full collections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final


def untracked_py(obj: object) -> object:
    """``untracked`` where the extension is not built: ``obj``, still tracked."""
    return obj


def _in_c() -> Callable[[object], object]:
    try:
        from fusee.emulator._atomic import untracked
    except ImportError:     # pragma: no cover (a source tree without its build, or a stale one)
        return untracked_py
    return untracked


#: Final: a compiled caller reads it from a C static, not from the module's dict
untracked: Final = _in_c()
