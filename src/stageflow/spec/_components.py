"""Python objects in pipeline files: imported only from modules the caller allows.

A component reference is ``"package.module:attribute"`` (``attribute`` may be dotted,
``"pkg.mod:Factory.create"``). It is imported only when ``package.module`` is one of the allowed
modules or inside an allowed package; names starting with ``_`` are refused. Nothing is evaluated:
the reference is split, checked, imported with ``importlib``, and looked up attribute by attribute.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["ComponentRefError", "is_allowed", "resolve_component"]

_REF = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")


class ComponentRefError(Exception):
    """A component reference cannot be used; ``code`` and ``hint`` say why (turned into a SpecError)."""

    def __init__(self, message: str, code: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


def is_allowed(module: str, allow_modules: Sequence[str]) -> bool:
    """``True`` when ``module`` is an allowed module or inside an allowed package."""
    return any(module == a or module.startswith(a + ".") for a in allow_modules if a)


def resolve_component(ref: Any, allow_modules: Sequence[str]) -> Any:
    """Import the object named by ``ref`` (see module docstring).

    Raises:
        ComponentRefError: malformed reference, module not allowed, import failure, unknown name.
    """
    if not isinstance(ref, str) or not (m := _REF.match(ref.strip())):
        raise ComponentRefError(
            f"the component reference {ref!r} is not of the form 'package.module:name'.",
            code="bad_component",
            hint="write e.g. component: 'mypkg.stages:make_retriever'",
        )
    module_name, attr = m.group("module"), m.group("attr")
    if not is_allowed(module_name, allow_modules):
        allowed = ", ".join(repr(a) for a in allow_modules) or "none"
        raise ComponentRefError(
            f"the module '{module_name}' is not in the allowed modules ({allowed}); pipeline files may only "
            "load Python objects from modules you allow explicitly.",
            code="module_not_allowed",
            hint=f"if you trust it, pass --allow-module {module_name.split('.')[0]} "
            f"(or load_pipeline(..., allow_modules=['{module_name.split('.')[0]}']))",
        )
    parts = attr.split(".")
    if any(p.startswith("_") for p in parts):
        raise ComponentRefError(
            f"the component name '{attr}' is private (starts with '_'); only public names can be loaded.",
            code="bad_component",
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ComponentRefError(
            f"cannot import the module '{module_name}': {exc}.",
            code="component_import_failed",
            hint="check the module name and that its package is installed in this environment",
        ) from exc
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            where = ".".join([module_name, *parts[:i]])
            known = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            raise ComponentRefError(
                f"unknown component '{attr}': '{where}' has no attribute '{part}'. "
                f"Public callables there: {known[:12]}{' ...' if len(known) > 12 else ''}.",
                code="unknown_component",
            )
        obj = getattr(obj, part)
    return obj
