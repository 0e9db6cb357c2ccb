"""Python objects in pipeline files: only what the allowed modules define.

A component reference is ``"package.module:attribute"`` (``attribute`` may be dotted,
``"pkg.mod:Factory.create"``). It is imported only when ``package.module`` is one of the allowed
modules or inside an allowed package; names starting with ``_`` are refused. Nothing is evaluated:
the reference is split, checked, imported with ``importlib``, and looked up attribute by attribute
with :func:`~stageflow.spec._origin.lookup`, and every object on the way must be *defined* in an
allowed module (:func:`~stageflow.spec._origin.vet`): ``"mypkg:os.system"`` is refused even though
``mypkg`` imported ``os``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from stageflow.spec._origin import ComponentRefError, is_allowed, lookup, vet

__all__ = ["ComponentRefError", "check_module_names", "is_allowed", "resolve_component"]

_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_REF = re.compile(rf"^(?P<module>{_NAME}):(?P<attr>{_NAME})$")
_MODULE = re.compile(rf"^{_NAME}$")


def check_module_names(allow_modules: Sequence[str]) -> tuple[str, ...]:
    """The allowed module names, each checked to be a dotted Python name.

    Raises:
        ComponentRefError: ``code="bad_setting"`` for an empty or malformed name.
    """
    for name in allow_modules:
        if not isinstance(name, str) or not _MODULE.match(name):
            raise ComponentRefError(
                f"the allowed module {name!r} is not a module name.",
                code="bad_setting",
                hint="pass a dotted Python module or package name, e.g. --allow-module mypkg.stages",
            )
    return tuple(allow_modules)


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SyntaxError, RuntimeError, SystemExit... in the module's own code
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.split(".")[0]:
            hint = (
                "stageflow imports allowed modules from Python's import path, which does not hold the "
                "current folder when you run the `stageflow` command: run it as `PYTHONPATH=. stageflow "
                "...` (or `python -m stageflow ...`, which adds the current folder), or install the "
                "module's package"
            )
        else:
            hint = (
                "fix the module (run `python -c 'import "
                f"{module_name}'` to see the traceback) or check that its package is installed here"
            )
        raise ComponentRefError(
            f"importing the allowed module '{module_name}' failed: {type(exc).__name__}: {exc}",
            code="component_import_failed",
            hint=hint,
        ) from exc


def _public_names(obj: Any) -> list[str]:
    try:
        names = vars(obj)
    except TypeError:
        return []
    return sorted(n for n, v in names.items() if not n.startswith("_") and callable(v))


def resolve_component(ref: Any, allow_modules: Sequence[str]) -> Any:
    """Import the object named by ``ref`` (see module docstring).

    Raises:
        ComponentRefError: malformed reference, module not allowed, import failure, unknown name, or a
            name that resolves to something defined outside the allowed modules.
    """
    if not isinstance(ref, str) or not (m := _REF.match(ref.strip())):
        raise ComponentRefError(
            f"the component reference {ref!r:.80} is not of the form 'package.module:name'.",
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
    obj: Any = _import(module_name)
    for i, part in enumerate(parts):
        shown = f"{module_name}:{'.'.join(parts[: i + 1])}"
        try:
            obj = lookup(obj, part, shown, allow_modules)
        except AttributeError:
            where = ".".join([module_name, *parts[:i]])
            known = _public_names(obj)
            raise ComponentRefError(
                f"unknown component '{attr}': '{where}' has no attribute '{part}'. "
                f"Public callables there: {known[:12]}{' ...' if len(known) > 12 else ''}.",
                code="unknown_component",
            ) from None
        vet(obj, shown, allow_modules)
    return obj
