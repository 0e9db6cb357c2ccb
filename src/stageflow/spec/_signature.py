"""Signature strings from pipeline files, built without importing anything.

``dspy.Signature("q -> a: foo")`` resolves an unknown type name by *importing a module* of that
name (``importlib.import_module("foo")``) and, before that, by searching the calling frames' variables.
A pipeline file could thus import any installed module — running its import-time code — just by
naming it as a type. Here every type expression is checked first: only names from ``typing``, the
builtin types and ``dspy.<Name>`` (``dspy.Image``, ``dspy.History``...), subscripts, ``|``, tuples and
constants (for ``Literal``) are accepted, and the signature is then built with ``custom_types={}``
so DSPy never looks at frames.
"""

from __future__ import annotations

import ast
import typing
from typing import Any

import dspy

__all__ = ["TYPE_NAMES", "make_signature", "unsafe_type_name"]

#: The bare names a signature's types may use.
TYPE_NAMES = (
    frozenset(typing.__all__)
    | frozenset(
        t.__name__
        for t in (int, str, float, bool, list, tuple, dict, set, frozenset, complex, bytes, bytearray)
    )
    | {"NoneType"}
)
_MODULE_ROOTS = ("dspy", "typing")


def _dotted(node: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _bad_node(node: ast.expr) -> str | None:
    """The first part of a type expression that is not allowed (as source text), or ``None``."""
    if isinstance(node, ast.Name):
        return None if node.id in TYPE_NAMES else node.id
    if isinstance(node, ast.Attribute):
        parts = _dotted(node)
        ok = (
            parts is not None
            and len(parts) == 2
            and parts[0] in _MODULE_ROOTS
            and not parts[1].startswith("_")
        )
        return None if ok else ast.unparse(node)
    if isinstance(node, ast.Subscript):
        return _bad_node(node.value) or _bad_node(node.slice)
    if isinstance(node, ast.Tuple):
        return next((bad for elt in node.elts if (bad := _bad_node(elt))), None)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _bad_node(node.left) or _bad_node(node.right)
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int | float | bool | type(None)):
        return None
    if (  # a negative number (``Literal[-1]``)
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub | ast.UAdd)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) in (int, float)
    ):
        return None
    return ast.unparse(node)


def unsafe_type_name(text: str) -> str | None:
    """The first type in signature ``text`` that is not a known type name, or ``None``.

    Text that does not parse is left to DSPy, which reports it.

    >>> unsafe_type_name("question -> answers: list[str], kind: Literal['a', 'b'] | None")
    >>> unsafe_type_name("question -> answer: os.system")
    'os.system'
    >>> unsafe_type_name("question -> score: Literal[-1, 0, 1]")
    """
    if text.count("->") != 1:
        return None
    for side in text.split("->"):
        try:
            tree = ast.parse(f"def f({side}): pass")
        except SyntaxError:
            return None
        func = tree.body[0]
        assert isinstance(func, ast.FunctionDef)
        for arg in func.args.args:
            if arg.annotation is not None and (bad := _bad_node(arg.annotation)):
                return bad
    return None


def make_signature(text: str, instructions: str | None = None) -> Any:
    """``dspy.Signature(text, instructions)`` for text from a file.

    Raises:
        ValueError: an unknown type name (with the allowed ones), or whatever DSPy refuses.
    """
    bad = unsafe_type_name(text)
    if bad is not None:
        raise ValueError(
            f"the type '{bad}' is not one a pipeline file can use; use str, int, float, bool, "
            "list[...], dict[...], Literal[...], Optional[...] and the other names of typing, or "
            "dspy.Image-style dspy types (a custom type needs a component: a module of yours that builds "
            "the predictor)"
        )
    if instructions:
        return dspy.Signature(text, instructions, custom_types={})
    return dspy.Signature(text, custom_types={})
