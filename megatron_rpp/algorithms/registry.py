"""A small registry of named plug-ins (estimators, losses, KL kinds, rewards, architectures).

Standard library only, so any package may import it cheaply.

    LOSSES = Registry("policy loss")

    @LOSSES.register("ppo_clip")
    def ppo_clip(...): ...

    LOSSES.get("ppo_clip")            # the registered object
    LOSSES.get("my_losses.py:my_fn")  # a user's function, loaded from a file ...
    LOSSES.get("my_pkg.losses:my_fn") # ... or from an importable module

Names are unique per registry: registering a name twice is an error, never a silent
override. Asking for an unknown name raises :class:`UnknownNameError`, whose message
lists the valid names in sorted order.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "RegistryError", "UnknownNameError", "load_object"]


class RegistryError(ValueError):
    """A registry was used wrongly (duplicate name, bad plug-in spec)."""


class UnknownNameError(KeyError, ValueError):
    """An unknown name was asked for. Catchable as ``KeyError`` or ``ValueError``."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def load_object(spec: str) -> Any:
    """Load ``"path/to/file.py:name"`` or ``"package.module:name"``.

    The file form imports the file as a fresh module (cached in ``sys.modules`` under a
    name derived from its resolved path, so loading it twice returns the same object).
    """
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise RegistryError(f"plug-in spec {spec!r} must look like 'file.py:name' or 'pkg.module:name'")
    if module_part.endswith(".py"):
        path = Path(module_part).expanduser().resolve()
        if not path.is_file():
            raise RegistryError(f"plug-in spec {spec!r}: file {str(path)!r} does not exist")
        mod_name = "_megatron_rpp_plugin_" + "".join(c if c.isalnum() else "_" for c in str(path))
        module = sys.modules.get(mod_name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert file_spec is not None and file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = module
            try:
                file_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]
                raise
    else:
        module = importlib.import_module(module_part)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RegistryError(f"plug-in spec {spec!r}: {module_part!r} has no attribute {attr!r}") from None


class Registry(Generic[T]):
    """Named objects of one kind.

    Args:
        kind: what the entries are, used in error messages ("advantage estimator").
        coerce: optional function applied to every object on registration and on
            plug-in load (e.g. wrap a bare function into the entry type). The
            ``register`` decorator still returns the original, undecorated object.
    """

    def __init__(self, kind: str, coerce: Callable[[Any], T] | None = None) -> None:
        self.kind = kind
        self._coerce = coerce
        self._entries: dict[str, T] = {}
        self._plugins: dict[str, T] = {}

    def register(self, name: str, obj: Any = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""
        if not isinstance(name, str) or not name or ":" in name:
            raise RegistryError(f"{self.kind} name must be a non-empty string without ':', got {name!r}")

        def _add(o: Any) -> Any:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = self._coerce(o) if self._coerce else o
            return o

        return _add if obj is None else _add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and interactive use)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The object registered as ``name``, or the plug-in ``name`` points at."""
        if name in self._entries:
            return self._entries[name]
        if isinstance(name, str) and ":" in name:
            if name not in self._plugins:
                obj = load_object(name)
                self._plugins[name] = self._coerce(obj) if self._coerce else obj
            return self._plugins[name]
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
            " (or a plug-in 'file.py:name' / 'pkg.module:name')"
        )

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
