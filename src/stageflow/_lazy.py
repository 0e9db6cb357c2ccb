"""Lazy module attributes (PEP 562): names resolve to their defining module on first use."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes", "submodules"]


def lazy_attributes(
    package: str, locations: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``locations`` maps a public name to the module
    defining it; a resolved name is cached in the package ``namespace``. Any other public name that
    is a module of the package is imported (``stageflow.lm`` after a plain ``import stageflow``)."""

    submodule = submodules(package)

    def getattr_(name: str) -> Any:
        module = locations.get(name)
        if module is None:
            return submodule(name)
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(locations))

    return getattr_, dir_


def submodules(package: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports its public modules on first use, as
    ``import package.name`` would (so ``stageflow.apps.multihop`` works after ``import stageflow``).

    >>> submodules("stageflow.apps")("multihop").__name__
    'stageflow.apps.multihop'
    >>> submodules("stageflow.apps")("nothing_here")
    Traceback (most recent call last):
    AttributeError: module 'stageflow.apps' has no attribute 'nothing_here'
    """

    def getattr_(name: str) -> Any:
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return getattr_
