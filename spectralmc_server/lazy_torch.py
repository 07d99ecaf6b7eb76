"""torch, imported on first use: for the processes that import the engine's modules
for their constants and types but run no torch (the HTTP process of ``spectralmc
serve`` with the engine in its own process; docs/architecture.md).

:func:`install` puts a stand-in module in ``sys.modules["torch"]``: ``import torch``
then binds the stand-in, and the first attribute read from it (``torch.cat``,
``torch.Tensor``) imports the real torch, which from then on is ``sys.modules["torch"]``
itself: the modules that bound the stand-in are rebound to it, and the stand-in
forwards any other read. Importing torch costs ~0.8 s and ~180 MiB of resident memory
(measured on this project's 2-core VM), which a process that never computes with it
need not pay.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

NAME = "torch"


class _Stand(types.ModuleType):
    """Stands in for torch until something reads from it."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(_load(self), attr)

    def __dir__(self) -> list[str]:
        return dir(_load(self))


_lock = threading.Lock()
_loaded: list[types.ModuleType] = []  # the real torch once its import has finished


def _load(stand: _Stand) -> types.ModuleType:
    """The real torch, imported by the first caller; the others wait for the import to
    finish (sys.modules has torch half-initialised meanwhile)."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            if sys.modules.get(NAME) is stand:
                del sys.modules[NAME]
            try:
                module = importlib.import_module(NAME)
            except BaseException:
                sys.modules.setdefault(NAME, stand)
                raise
            _rebind(stand, module)
            _loaded.append(module)
        return _loaded[0]


def _rebind(stand: _Stand, module: types.ModuleType) -> None:
    """Every module-level name bound to the stand-in names torch itself from now on: the
    modules that imported it before the load then read torch at full speed (the
    stand-in's forwarding stays right for any other holder)."""
    for holder in list(sys.modules.values()):
        try:
            namespace = vars(holder)
        except TypeError:
            continue
        for name, value in list(namespace.items()):
            if value is stand:
                namespace[name] = module


def install() -> bool:
    """Defer importing torch until first use; False (nothing done) when torch is
    imported already or cannot be found."""
    if NAME in sys.modules:
        return False
    spec = importlib.util.find_spec(NAME)
    if spec is None:
        return False
    stand = _Stand(NAME)
    stand.__spec__ = spec  # what ``import torch`` reads of a module already in sys.modules
    sys.modules[NAME] = stand
    return True


def loaded() -> bool:
    """Whether the real torch has been imported in this process."""
    module = sys.modules.get(NAME)
    return module is not None and not isinstance(module, _Stand)
