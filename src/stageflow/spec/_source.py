"""Reading a pipeline file: safe parsing, and where each key is (for error messages).

The data comes from YAML's safe loader (or ``json.loads`` for ``.json`` files): plain dicts, lists,
strings and numbers, never Python objects. The YAML node tree gives the line of every key and list
item, so an error can say ``pipeline.yaml, line 12, at nodes.root.stages[1]``.

Hostile files are refused before they are built, with a located :class:`SpecError`:

* a file larger than :data:`MAX_SPEC_BYTES` (1 MB; ``$STAGEFLOW_MAX_SPEC_BYTES`` or
  ``load_pipeline(..., max_bytes=...)`` raise it);
* nesting deeper than :data:`MAX_DEPTH` levels (which would exhaust Python's recursion limit);
* aliases that expand to more than :data:`MAX_VALUES` values ("billion laughs": a few lines that
  would take hours and gigabytes to print, copy or serialise).

Both checks run on YAML's event stream, which is read without recursion and without expanding
aliases; JSON's brackets are counted outside strings.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = [
    "MAX_DEPTH",
    "MAX_SPEC_BYTES",
    "MAX_VALUES",
    "SPEC_BYTES_ENV",
    "KeyPath",
    "SpecError",
    "SpecSource",
    "format_key_path",
    "max_spec_bytes",
    "read_spec",
]

KeyPath = tuple[str | int, ...]

#: Largest pipeline file read, in bytes (``$STAGEFLOW_MAX_SPEC_BYTES`` overrides it).
MAX_SPEC_BYTES = 1_000_000
SPEC_BYTES_ENV = "STAGEFLOW_MAX_SPEC_BYTES"
#: Deepest nesting of mappings/lists in a file, and of nodes in the pipeline built from it.
MAX_DEPTH = 64
#: Most values a file may hold once its aliases are expanded.
MAX_VALUES = 1_000_000


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
                    hint="a parser would keep only the last one, silently; remove or rename one",
                )
            keys.add(key)
            lines.setdefault(sub, line)
            _walk(value_node, sub, lines, seen, src)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.setdefault((*path, i), item.start_mark.line + 1)
            _walk(item, (*path, i), lines, seen, src)


def _too_deep(src: SpecSource, line: int | None) -> SpecError:
    return SpecError(
        f"the file is nested more than {MAX_DEPTH} levels deep.",
        file=src.file,
        line=line,
        code="too_deep",
        hint="flatten it: define deep parts as named nodes under 'nodes' and refer to them by name",
    )


#: Python refuses to read integers longer than this (``sys.get_int_max_str_digits()``, 4300 by default).
_INT_DIGITS = sys.get_int_max_str_digits() or 4300
_LONG_INT = re.compile(r"[-+]?[0-9][0-9_]*")


def _huge_number(src: SpecSource, line: int | None, digits: int) -> SpecError:
    return SpecError(
        f"a number with {digits:,} digits is too long to read (Python reads integers of up to "
        f"{_INT_DIGITS:,} digits).",
        file=src.file,
        line=line,
        code="bad_value",
        hint='quote it to keep it as text ("123...")',
    )


def _check_number(value: str, src: SpecSource, line: int | None) -> None:
    """Refuse a plain YAML scalar that is an integer too long for ``int()``."""
    if _LONG_INT.fullmatch(value):
        digits = sum(ch.isdigit() for ch in value)
        if digits > _INT_DIGITS:
            raise _huge_number(src, line, digits)


def _json_number_line(text: str) -> tuple[int | None, int]:
    """The line of the first integer literal too long to read in JSON ``text``, and its digits
    (strings blanked out first; JSON strings hold no raw line breaks, so lines are kept)."""
    bare = _JSON_STRING.sub('""', text)
    m = re.search(rf"[0-9]{{{_INT_DIGITS + 1},}}", bare)
    if m is None:
        return None, 0
    return bare.count("\n", 0, m.start()) + 1, len(m.group())


def _line(event: Any) -> int | None:
    mark = event.start_mark
    return int(mark.line) + 1 if mark is not None else None


def _check_events(text: str, src: SpecSource, loader: Any) -> None:
    """Refuse deep nesting and alias bombs from the event stream (no recursion, no expansion)."""
    import yaml

    frames: list[list[Any]] = []  # [anchor, expanded size] per open mapping/sequence
    sizes: dict[str, int] = {}
    total = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            frames.append([event.anchor, 1])
            if len(frames) > MAX_DEPTH:
                raise _too_deep(src, _line(event))
            total += 1
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, size = frames.pop()
            if anchor:
                sizes[anchor] = size
            if frames:
                frames[-1][1] += size
            continue
        if isinstance(event, yaml.ScalarEvent):
            if event.implicit[0] and len(event.value) > _INT_DIGITS:
                _check_number(event.value, src, _line(event))
            size = 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            size = sizes.get(event.anchor or "", 1)
        else:
            continue
        total += size
        if frames:
            frames[-1][1] += size
        if total > MAX_VALUES:
            raise SpecError(
                f"the file holds more than {MAX_VALUES:,} values once its aliases (*name) are expanded.",
                file=src.file,
                line=_line(event),
                code="too_large",
                hint="a few lines of nested aliases can expand to billions of values; write the values "
                "out, or reuse parts as named nodes under 'nodes'",
            )


def _parse_yaml(text: str, src: SpecSource) -> Any:
    import yaml

    loader_class = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_events(text, src, loader_class)
        loader = loader_class(text)
        try:
            root = loader.get_single_node()
            if root is not None:
                # Lines and duplicate keys are read from the document as written: constructing it
                # folds merge keys (``<<: *base``) into their mappings, where a key the mapping sets
                # again, as a merge allows, would look like a duplicate.
                src.lines[()] = root.start_mark.line + 1
                _walk(root, (), src.lines, set(), src)
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except ValueError as exc:  # a value YAML cannot convert (e.g. an integer in another notation)
        if isinstance(exc, SpecError):
            raise
        raise SpecError(
            f"invalid value: {exc}.",
            file=src.file,
            code="bad_value",
            hint="quote the value to keep it as text",
        ) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if "maximum nesting depth" in str(exc.problem):  # libyaml's own limit, hit while scanning ahead
            raise _too_deep(src, mark.line + 1 if mark else None) from exc
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
    return data


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _check_json_depth(text: str, src: SpecSource) -> None:
    depth = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise _too_deep(src, None)


def _parse_json(text: str, src: SpecSource) -> Any:
    _check_json_depth(text, src)
    try:
        data = json.loads(text)
    except RecursionError as exc:  # not reachable after the depth check; never a crash either way
        raise _too_deep(src, None) from exc
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"invalid JSON: {exc.msg} (column {exc.colno}).",
            file=src.file,
            line=exc.lineno,
            code="invalid_json",
        ) from exc
    except ValueError as exc:  # an integer too long for int()
        line, digits = _json_number_line(text)
        if digits:
            raise _huge_number(src, line, digits) from exc
        raise SpecError(f"invalid value: {exc}.", file=src.file, code="bad_value") from exc
    try:  # JSON is YAML: reuse the YAML node tree for key lines (best effort)
        _parse_yaml(text, SpecSource(None, src.file, src.lines))
    except SpecError as exc:
        if exc.code in ("duplicate_key", "too_deep", "too_large"):
            raise
    return data


def max_spec_bytes(explicit: int | None = None) -> int:
    """The size limit for pipeline files: ``explicit``, else ``$STAGEFLOW_MAX_SPEC_BYTES``, else 1 MB.

    >>> max_spec_bytes(), max_spec_bytes(5_000_000)
    (1000000, 5000000)
    """
    if explicit is not None:
        return explicit
    raw = os.environ.get(SPEC_BYTES_ENV, "").strip()
    if not raw:
        return MAX_SPEC_BYTES
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise SpecError(
            f"${SPEC_BYTES_ENV}={raw!r} is not a positive number of bytes.",
            code="bad_setting",
            hint=f"set it to e.g. {2 * MAX_SPEC_BYTES} or unset it (default {MAX_SPEC_BYTES})",
        )
    return value


def read_spec(path: str | os.PathLike[str], max_bytes: int | None = None) -> SpecSource:
    """Read and parse a ``.yaml``/``.yml``/``.json`` pipeline file.

    Args:
        path: The file.
        max_bytes: Refuse larger files (default: :func:`max_spec_bytes`).

    Raises:
        SpecError: the file is missing, unreadable, too large, not UTF-8, not valid YAML/JSON, nested too
            deep, an alias bomb, or not a mapping.
    """
    limit = max_spec_bytes(max_bytes)
    p = Path(path).expanduser()
    src = SpecSource(None, str(path), {}, p.resolve().parent)
    if not p.is_file():
        raise SpecError(
            "pipeline file not found." if not p.exists() else "this is not a regular file.",
            file=str(path),
            code="spec_not_found",
            hint="pass the path of a .yaml or .json pipeline file",
        )
    try:
        with p.open("rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise SpecError(f"cannot read the file: {exc.strerror or exc}.", file=str(path)) from exc
    if len(raw) > limit:
        raise SpecError(
            f"the file is larger than the limit of {limit:,} bytes for pipeline files.",
            file=str(path),
            code="file_too_large",
            hint=f"if the file is right, raise the limit: {SPEC_BYTES_ENV}={2 * limit} "
            "(or load_pipeline(..., max_bytes=...))",
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(
            "the file is not UTF-8 text.", file=str(path), line=line, code="invalid_yaml"
        ) from exc
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
