"""Package attributes imported on first use (PEP 562), so that importing a package for one light
name (a CLI's option declarations, say) does not import torch for the others."""

from __future__ import annotations

import sys
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]):
    """`__getattr__` and `__dir__` for `package` that import `exports[name]` (a module path) the first
    time `name` is read, and keep the value in the package's namespace."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):
        if name in exports:
            value = getattr(import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
