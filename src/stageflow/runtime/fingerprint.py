"""The fingerprint of a whole program, stored in a batch journal so a resume cannot mix programs.

Every stage that decides outputs is covered: each predictor (signature, instructions, fields,
demos, model name and settings) and each function stage (its code), together with the program's
structure (the path and class of every sub-module), so adding, removing or re-ordering stages
changes it too. Per-stage fingerprints come from the stage cache's ``fingerprint`` — imported
here and nowhere else in the runtime, so switching to a program-level fingerprint is one line.
"""

from __future__ import annotations

import hashlib
from typing import Any

from stageflow.policies.cache import fingerprint as _stage_fingerprint

__all__ = ["program_fingerprint"]


def _covered(module: Any) -> bool:
    """Stages whose own state or code decides outputs: predictors, function stages, and modules of
    user classes (stageflow's own containers are covered through their parts and structure)."""
    import dspy

    if isinstance(module, dspy.Predict):
        return True
    cls = type(module)
    return cls.__name__ == "FunctionStage" or not cls.__module__.startswith(("stageflow.", "dspy."))


def _code_extra(module: Any) -> str:
    """Constants, names and plain closure values of a function stage's code (nested code included),
    which the stage cache's fingerprint does not cover yet: ``lambda x: 2 * x`` and
    ``lambda x: 3 * x`` differ, and so do closures over ``scale = 2`` and ``scale = 3``."""
    fn = getattr(module, "fn", None)
    code = getattr(fn, "__code__", None)
    if code is None:
        return ""
    parts: list[str] = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        plain = isinstance(value, str | int | float | bool | type(None) | tuple | frozenset)
        parts.append(repr(value) if plain else type(value).__qualname__)
    stack = [code]
    while stack:
        c = stack.pop()
        parts.append(repr(c.co_names))
        for const in c.co_consts:
            if hasattr(const, "co_code"):
                stack.append(const)
                parts.append(const.co_code.hex())
            else:
                parts.append(repr(const))
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


_SKIP = frozenset({"history", "callbacks", "demos", "traces", "train", "lm"})


def _modules(program: Any) -> list[tuple[str, Any]]:
    """Every module in ``program`` with its path, in a stable order.

    Like DSPy's ``named_sub_modules`` (which sees nested containers too), but without walking
    into call histories: DSPy appends every LM call to each calling module's ``history`` (up to
    10,000 entries), and walking those made fingerprinting a used program cost a second.
    """
    from dspy.primitives.base_module import BaseModule

    out: list[tuple[str, Any]] = []
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [("self", program, 0)]
    while stack:
        path, obj, depth = stack.pop()
        if isinstance(obj, BaseModule):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            out.append((path, obj))
            items = [(f"{path}.{k}", v) for k, v in vars(obj).items() if k not in _SKIP]
        elif isinstance(obj, list | tuple) and depth < 8:
            items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif isinstance(obj, dict) and depth < 8:
            items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        else:
            continue
        stack.extend(
            (p, v, depth + 1) for p, v in reversed(items) if isinstance(v, BaseModule | list | tuple | dict)
        )
    return out


def program_fingerprint(program: Any) -> str:
    """A content hash of ``program``: structure, predictors and function stages.

    The LM of a predictor without its own is the one ``dspy.context``/``dspy.configure`` provides,
    so call this inside the same DSPy settings the records will run with.

    Examples:
        >>> import stageflow
        >>> double = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": 2 * x}, writes=["y"])])
        >>> triple = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": 3 * x}, writes=["y"])])
        >>> program_fingerprint(double) == program_fingerprint(triple)
        False
        >>> len(program_fingerprint(double))
        24
    """
    parts: list[str] = []
    for path, module in _modules(program):
        cls = type(module)
        line = f"{path}\t{cls.__module__}.{cls.__qualname__}"
        if _covered(module):
            line += "\t" + _stage_fingerprint(module) + _code_extra(module)
        parts.append(line)
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:24]
