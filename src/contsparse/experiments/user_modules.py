"""The user's own modules (``--imports``): found in the current directory, never in its way.

A model or dataset registered in the user's module reaches the CLI, sweep workers and resumed runs
through its name, saved with the run. The current directory joins the end of ``sys.path`` (so
worker processes started with *spawn* inherit it, and an installed package of the same name
wins), through a finder that takes no plain folder for a package: a run directory named like an
optional dependency (``z3``, which torch.export probes by importing it) would otherwise import as
an empty namespace package and break whatever probed it.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.machinery
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from contsparse.errors import UserError

# The modules that settings read from files (a run folder or sweep from anyone) may import; None: any
_TRUSTED: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("trusted_imports", default=None)


@contextmanager
def trusting_only(names: Iterable[str]) -> Iterator[None]:
    """Within this block, settings may import only ``names`` (the user's ``--imports``): commands
    that read run or sweep folders (export, bench-inference, report, sweep into an existing
    folder) must not run code that a folder's saved settings name."""
    token = _TRUSTED.set(frozenset(names))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def import_modules(names: list[str]) -> None:
    """Import the user's modules by name, the current directory last on the path."""
    trusted = _TRUSTED.get()
    untrusted = [name for name in names if trusted is not None and name not in trusted and name not in sys.modules]
    if untrusted:
        raise UserError(f"saved settings name module(s) to import ({', '.join(untrusted)}); importing a module runs "
                        f"its code: if you trust them, give --imports {' '.join(untrusted)}")
    for name in names:
        module = sys.modules.get(name)
        if module is None:
            _add_current_directory()
            try:
                module = importlib.import_module(name)
            except (Exception, SystemExit) as err:  # the user's own module: name it, whatever it raised
                top = Path(name.split(".")[0])
                hint = (f" ({top}/ has no __init__.py: add one to make it a package)"
                        if top.is_dir() and not (top / "__init__.py").is_file() else "")
                raise UserError(f"--imports {name}: {type(err).__name__}: {err}{hint}") from err
        local = Path(f"{name.replace('.', os.sep)}.py").resolve()
        origin = getattr(module, "__file__", None)
        if local.is_file() and origin is not None and Path(origin).resolve() != local:
            raise UserError(f"--imports {name} imported {origin}, an installed module of that name, not "
                            f"./{local.name}: rename your module")


class _NoNamespaceFinder(importlib.machinery.FileFinder):
    """The current directory's modules and regular packages, but no namespace packages."""

    def find_spec(self, fullname: str, target: object = None) -> importlib.machinery.ModuleSpec | None:
        spec = super().find_spec(fullname, target)
        return None if spec is not None and spec.origin is None else spec  # a bare folder


def _add_current_directory() -> None:
    directory = os.getcwd()
    if not any(getattr(hook, "directory", None) == directory for hook in sys.path_hooks):
        loaders = [(importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
                   (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
                   (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES)]

        def hook(path: str) -> _NoNamespaceFinder:
            if path != directory:
                raise ImportError("not the current directory")  # the next hook takes it
            return _NoNamespaceFinder(path, *loaders)

        hook.directory = directory  # type: ignore[attr-defined]
        sys.path_hooks.insert(0, hook)
        sys.path_importer_cache.pop(directory, None)  # a finder made before the hook would be reused
    if directory not in sys.path:
        sys.path.append(directory)
