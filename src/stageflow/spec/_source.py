"""Reading a pipeline file: safe parsing, and where each key is (for error messages).

The data comes from ``yaml.safe_load`` (or ``json.loads`` for ``.json`` files): plain dicts, lists,
strings and numbers, never Python objects. The YAML node tree (``yaml.compose``) gives the line of
every key and list item, so an error can say ``pipeline.yaml, line 12, at nodes.root.stages[1]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = ["KeyPath", "SpecError", "SpecSource", "format_key_path", "read_spec"]

KeyPath = tuple[str | int, ...]


class SpecError(ConfigurationError):
    """A pipeline file (or spec dict) is invalid.

    Attributes:
        file: The file, or ``None`` for an in-memory spec.
        line: The 1-based line of the offending key, when known.
        key: The key path (``nodes.root.stages[1].predict``).
    """

    default_code = "bad_spec"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        where = [part for part in (file, f"line {line}" if line else None) if part]
        if key:
            where.append(f"at '{key}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message, **kwargs)


def format_key_path(path: KeyPath) -> str:
    """``("nodes", "root", "stages", 1)`` → ``nodes.root.stages[1]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


@dataclass
class SpecSource:
    """A parsed spec and the line of each key path in its file (empty for in-memory specs)."""

    data: Any
    file: str | None = None
    lines: dict[KeyPath, int] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of its closest enclosing key that has one."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def error(self, path: KeyPath, message: str, **kwargs: Any) -> SpecError:
        """A :class:`SpecError` located at ``path``."""
        return SpecError(
            message, file=self.file, line=self.line_of(path), key=format_key_path(path) or None, **kwargs
        )


def _walk(node: Any, path: KeyPath, lines: dict[KeyPath, int], seen: set[int], src: SpecSource) -> None:
    import yaml

    if id(node) in seen:  # an alias: already walked (and never walked twice: no exponential blow-up)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            sub = (*path, key)
            line = key_node.start_mark.line + 1
            if key in keys:
                raise SpecError(
                    f"the key '{key}' appears twice in the same mapping.",
                    file=src.file,
                    line=line,
                    key=format_key_path(sub),
                    code="duplicate_key",
                    hint="YAML keeps only the last one silently; remove or rename one",
                )
            keys.add(key)
            lines.setdefault(sub, line)
            _walk(value_node, sub, lines, seen, src)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.setdefault((*path, i), item.start_mark.line + 1)
            _walk(item, (*path, i), lines, seen, src)


def _parse_yaml(text: str, src: SpecSource) -> Any:
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise SpecError(
            f"invalid YAML: {problem}" + (f" (column {mark.column + 1})" if mark else "") + ".",
            file=src.file,
            line=mark.line + 1 if mark else None,
            code="invalid_yaml",
            hint="check the indentation and quoting around that line",
        ) from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"invalid YAML: {exc}", file=src.file, code="invalid_yaml") from exc
    if root is not None:
        src.lines[()] = root.start_mark.line + 1
        _walk(root, (), src.lines, set(), src)
    return data


def _parse_json(text: str, src: SpecSource) -> Any:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"invalid JSON: {exc.msg} (column {exc.colno}).",
            file=src.file,
            line=exc.lineno,
            code="invalid_json",
        ) from exc
    try:  # JSON is YAML: reuse the YAML node tree for key lines (best effort)
        _parse_yaml(text, SpecSource(None, src.file, src.lines))
    except SpecError as exc:
        if exc.code == "duplicate_key":
            raise
    return data


def read_spec(path: str | os.PathLike[str]) -> SpecSource:
    """Read and parse a ``.yaml``/``.yml``/``.json`` pipeline file.

    Raises:
        SpecError: the file is missing, unreadable, not UTF-8, not valid YAML/JSON, or not a mapping.
    """
    p = Path(path).expanduser()
    src = SpecSource(None, str(path), {}, p.resolve().parent)
    if not p.is_file():
        raise SpecError(
            "pipeline file not found.",
            file=str(path),
            code="spec_not_found",
            hint="pass the path of a .yaml or .json pipeline file",
        )
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError("the file is not UTF-8 text.", file=str(path), code="invalid_yaml") from exc
    except OSError as exc:
        raise SpecError(f"cannot read the file: {exc.strerror or exc}.", file=str(path)) from exc
    src.data = _parse_json(text, src) if p.suffix.lower() == ".json" else _parse_yaml(text, src)
    if not isinstance(src.data, Mapping):
        found = "an empty file" if src.data is None else f"a {type(src.data).__name__}"
        raise SpecError(
            f"a pipeline file must be a mapping with a 'nodes' (or 'root') key; found {found}.",
            file=str(path),
            line=src.line_of(()),
            hint="start from: nodes: {root: {type: pipeline, stages: [{predict: 'question -> answer'}]}}",
        )
    return src
