"""Batch input: JSON Lines or CSV files, or records given in Python, each with a stable key.

A record's key is its ``id`` field (another name with ``id_field=``), or else its line number in
the file (its position, from 1, for records given in Python). The key is not passed to the
pipeline; every other field is an input. Files are UTF-8; a byte order mark at the start (as
Excel's "CSV UTF-8" writes) is skipped, in CSV and JSON Lines alike. A CSV header without the id
column keys records by line number, with a warning when a column looks like it (``ID``, `` id``);
with ``id_field`` named (``"id"`` included), that column must exist.

Reading validates the whole input before any work:
malformed JSON, a line that is not an object, an unusable or duplicate id are
:class:`~stageflow.ConfigurationError` naming the file and line.

A source can be read any number of times (the runner reads it twice: once to plan and check,
once to feed the records still to do), so a file is never held in memory whole.

Examples:
    >>> from stageflow.runtime.records import open_records
    >>> source = open_records([{"id": "a", "text": "hi"}, {"text": "there"}])
    >>> [(r.key, r.inputs) for r in source.scan()]
    [('a', {'text': 'hi'}), ('2', {'text': 'there'})]
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import hashlib
import io
import json
import os
import pickle
import types
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from stageflow.errors import ConfigurationError
from stageflow.policies.keys import EXACT_REPR, NotDurable, Unkeyable, durable_text, freeze

__all__ = ["Record", "RecordSource", "input_hash", "open_records"]

_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


class Record(NamedTuple):
    """One input record.

    Attributes:
        seq: Position among the records (0-based); the output keeps this order.
        key: The record's key as text (its ``id``, or its line number).
        id: The id as given (a string or an int), written back in the output.
        inputs: The pipeline's input fields (the record without its id field).
        line: Line number in the file (position from 1 for records given in Python).
    """

    seq: int
    key: str
    id: Any
    inputs: dict[str, Any]
    line: int


class _Unhashable(Exception):  # noqa: N818 - a signal inside input_hash
    pass


_JSON_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any) -> bool:
    """JSON holds ``value`` exactly (what a JSONL or CSV record always is)."""
    t = type(value)
    if t in _JSON_SCALARS:
        return True
    if t is list:
        return all(_plain(v) for v in value)
    if t is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False


def _tagged(value: Any, depth: int = 0) -> Any:
    """A value by its type and content, for the hash of a record JSON cannot hold exactly: a tuple is
    not a list, ``{1: ...}`` is not ``{"1": ...}``, dicts count by content whatever their order, and a
    value JSON has no place for counts by its exact ``repr``, its canonical key (a numpy array by its
    elements), its state (a dataclass's or pydantic model's fields and other attributes, an object's
    ``__dict__``) or, last, its pickle — never by a ``repr`` that may be abridged or constant (a large
    array's elides its middle), which would make a changed record look unchanged."""
    t = type(value)
    if t is float:
        return ("float", value.hex())
    if t in _JSON_SCALARS:
        return value
    if depth > _MAX_DEPTH:
        return _pickled(value)
    d = depth + 1
    if t in EXACT_REPR:
        return (t.__qualname__, repr(value))
    name = f"{t.__module__}.{t.__qualname__}"
    builtin = _builtin_content(value, d)
    if builtin is not None:  # a list, dict, set... or a subclass of one: its content, and its attributes
        extra = getattr(value, "__dict__", None)
        return ("builtin", name, builtin, _tagged(dict(extra), d) if extra else None)
    state = _state(value, t)
    if state is not None:
        return ("state", name, _tagged(state, d))
    try:
        return ("key", durable_text(freeze(value)))
    except (Unkeyable, NotDurable):
        pass
    return _pickled(value)


def _builtin_content(value: Any, d: int) -> Any:
    """The content of a list, tuple, dict or set, or of an instance of a subclass of a builtin type
    (``class Cfg(dict)``: its content lives outside its ``__dict__``); ``None`` for anything else.
    Dicts and sets count whatever their order."""
    if isinstance(value, dict):
        return sorted(((_tagged(k, d), _tagged(v, d)) for k, v in dict.items(value)), key=repr)
    if isinstance(value, list | tuple):
        return [
            _tagged(v, d)
            for v in (list.__iter__(value) if isinstance(value, list) else tuple.__iter__(value))
        ]
    if isinstance(value, set | frozenset):
        return sorted((_tagged(v, d) for v in value), key=repr)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return float.hex(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return None


_MAX_DEPTH = 64
_PICKLE_HOOKS = ("__reduce_ex__", "__reduce__", "__getstate__")


def _state(value: Any, t: type) -> dict[str, Any] | None:
    """What a dataclass, pydantic model or plain object holds, or ``None`` (hashed otherwise)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            **{f.name: getattr(value, f.name) for f in dataclasses.fields(value)},
            **getattr(value, "__dict__", {}),
        }
    fields = getattr(t, "model_fields", None)
    if isinstance(fields, dict) and hasattr(value, "model_dump"):  # a pydantic model
        return {
            "fields": {k: getattr(value, k) for k in fields},
            "extra": getattr(value, "__pydantic_extra__", None) or {},
            "private": getattr(value, "__pydantic_private__", None) or {},
        }
    if (
        t.__module__ != "builtins"
        and not isinstance(value, type | types.ModuleType | types.FunctionType | enum.Enum)
        and type(getattr(value, "__dict__", None)) is dict
        and getattr(t, "__slots__", None) is None
        and all(getattr(t, m) is getattr(object, m) for m in _PICKLE_HOOKS)  # its pickle is its __dict__
    ):
        return dict(value.__dict__)
    return None


def _pickled(value: Any) -> Any:
    try:
        data = pickle.dumps(value, protocol=4)
    except Exception as e:
        raise _Unhashable(type(value).__qualname__) from e
    return ("pickle", type(value).__qualname__, hashlib.blake2b(data, digest_size=16).hexdigest())


def input_hash(inputs: Mapping[str, Any], where: str = "a record") -> str:
    """A short content hash of a record's inputs, to notice changed records: canonical JSON when
    JSON holds them exactly, else each value by its type and content (``_tagged``). A value that
    has no stable encoding at all is refused, naming the field.

    >>> input_hash({"q": "hi"}) == input_hash({"q": "hi"}) != input_hash({"q": "ho"})
    True
    >>> input_hash({"v": (1, 2)}) != input_hash({"v": [1, 2]})
    True
    """
    try:
        return _input_hash(inputs, where)
    except (RecursionError, ValueError) as e:  # nested too deep; an int longer than str() allows
        field = next((k for k in inputs if _too_big(inputs[k])), None)
        what = f"the field '{field}'" if field is not None else "a field"
        raise ConfigurationError(
            f"{where}: {what} cannot be encoded to tell whether the record changed between runs "
            f"({type(e).__name__}: {e}).",
            field=field,
            code="bad_input",
            hint="give the record plain data nested less than a few hundred levels deep; pass a very "
            "large integer as text",
        ) from e


def _too_big(value: Any) -> bool:
    try:
        _input_hash({"v": value}, "")
    except (RecursionError, ValueError):
        return True
    except Exception:
        return False
    return False


def _input_hash(inputs: Mapping[str, Any], where: str) -> str:
    if _plain(inputs):
        text = json.dumps(inputs, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    else:
        try:
            text = "\x00" + repr(_tagged(dict(inputs)))
        except _Unhashable as e:
            field = next((k for k in inputs if _unhashable(inputs[k])), None)
            raise ConfigurationError(
                f"{where}: the field '{field}' holds a {e} value, which stageflow cannot compare "
                "between runs (no canonical encoding, and it cannot be pickled), so a resumed batch "
                "could not tell whether the record changed.",
                field=field,
                code="bad_input",
                hint="give the record plain data (text, numbers, lists, dicts), a numpy array, a "
                "pydantic model or a dataclass",
            ) from e.__cause__
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def _unhashable(value: Any) -> bool:
    try:
        _tagged(value)
    except _Unhashable:
        return True
    return False


class RecordSource:
    """Where records come from: :meth:`scan` yields them, validated, in order."""

    #: A short description for messages ("data.jsonl", "250 records given in Python").
    label: str = ""
    #: The file, if the records come from one.
    path: Path | None = None

    def __init__(self, id_field: str | None) -> None:
        #: Whether the id field was named (``id_field="id"`` included): a named field must exist.
        self.chosen = id_field is not None
        self.id_field = "id" if id_field is None else id_field

    def scan(self) -> Iterator[Record]:
        """Every record, in order (re-readable)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What identifies the source besides its content (file path, size, modification time)."""
        return {"source": self.label}

    def _no_id_anywhere(self) -> None:
        """A named id field that no record has: most likely a misspelt name, which would otherwise
        key every record by its line number without a word."""
        if not self.chosen:
            return
        raise ConfigurationError(
            f"{self.label}: no record has the '{self.id_field}' field, chosen as the id field.",
            field=self.id_field,
            code="bad_input",
            hint="check the name given to --id-field (id_field= in Python), or leave it out to key "
            "records by their 'id' field or line number",
        )

    def _record(self, seq: int, line: int, data: Any, seen: dict[str, int] | None) -> Record:
        where = f"{self.label} line {line}" if self.path is not None else f"record {line}"
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                f"{where} is a JSON {type(data).__name__}, not an object of input fields.",
                code="bad_input",
                hint='write one object per line, e.g. {"id": "q1", "question": "..."}',
            )
        inputs = dict(data)
        if self.id_field in inputs:
            raw = inputs.pop(self.id_field)
            if isinstance(raw, bool) or not isinstance(raw, str | int) or raw == "":
                raise ConfigurationError(
                    f"{where}: the '{self.id_field}' field is {raw!r}; a record id must be a non-empty "
                    "string or an integer.",
                    field=self.id_field,
                    code="bad_input",
                )
            key, rid = str(raw), raw
        else:
            key, rid = str(line), line
        if seen is not None:
            first = seen.setdefault(key, line)
            if first != line:
                raise ConfigurationError(
                    f"{where}: the record id {rid!r} was already used at line {first}; every record needs "
                    "its own id, so that results can be matched and resumed.",
                    field=self.id_field,
                    code="duplicate_id",
                    hint=f"give each record a unique '{self.id_field}' (or drop the field to key records "
                    "by line number)",
                )
        return Record(seq, key, rid, inputs, line)


class _MemorySource(RecordSource):
    def __init__(self, records: Iterable[Any], id_field: str | None) -> None:
        super().__init__(id_field)
        self._items = list(records)
        self.label = f"{len(self._items)} records given in Python"
        seen: dict[str, int] = {}
        self._records = [self._record(i, i + 1, d, seen) for i, d in enumerate(self._items)]
        if self._records and all(self.id_field not in d for d in self._items if isinstance(d, Mapping)):
            self._no_id_anywhere()

    def scan(self) -> Iterator[Record]:
        return iter(self._records)


class _FileSource(RecordSource):
    def __init__(self, path: Path, fmt: str, id_field: str | None) -> None:
        super().__init__(id_field)
        self.path = self.file = path
        self.fmt = fmt
        self.label = str(path)
        self._warned = False

    def identity(self) -> dict[str, Any]:
        st = self.file.stat()
        return {"source": str(self.file.resolve()), "size": st.st_size, "mtime": st.st_mtime}

    def scan(self) -> Iterator[Record]:
        seen: dict[str, int] = {}
        rows = self._jsonl() if self.fmt == "jsonl" else self._csv()
        keyed = False
        for seq, (line, data) in enumerate(rows):
            record = self._record(seq, line, data, seen)
            keyed = keyed or (isinstance(data, Mapping) and self.id_field in data)
            yield record
        if not keyed and seen:
            self._no_id_anywhere()

    def _open(self) -> io.TextIOWrapper:
        try:
            # utf-8-sig: a byte order mark (Excel's "CSV UTF-8", some editors) is skipped, in both formats.
            return open(self.file, encoding="utf-8-sig", newline="")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the input file {self.label}: {exc.strerror or exc}.", code="bad_input"
            ) from exc

    def _lines(self, fh: io.TextIOWrapper) -> Iterator[tuple[int, str]]:
        line = 0
        try:
            for line, text in enumerate(fh, 1):
                yield line, text
        except UnicodeDecodeError as exc:
            raise ConfigurationError(
                f"{self.label} line {line + 1} is not UTF-8 text (byte {exc.start} of a read block).",
                code="bad_input",
            ) from exc

    def _jsonl(self) -> Iterator[tuple[int, Any]]:
        with self._open() as fh:
            for line, text in self._lines(fh):
                if not text.strip():
                    continue
                try:
                    yield line, json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigurationError(
                        f"{self.label} line {line} is not valid JSON: {exc.msg} (column {exc.colno}).",
                        code="bad_input",
                        hint="JSON Lines needs one complete JSON object per line",
                    ) from exc
                except RecursionError as exc:
                    raise ConfigurationError(
                        f"{self.label} line {line} is nested deeper than Python's JSON reader goes.",
                        code="bad_input",
                        hint="nest the record's values less than a few hundred levels deep",
                    ) from exc
                except ValueError as exc:  # an integer longer than Python reads
                    raise ConfigurationError(
                        f"{self.label} line {line} holds a value that cannot be read: {exc}.",
                        code="bad_input",
                        hint='write very long numbers as strings ("123...")',
                    ) from exc

    def _csv(self) -> Iterator[tuple[int, Any]]:
        with self._open() as fh:
            reader = csv.reader(_TrackLines(self._lines(fh)))
            try:
                header = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise ConfigurationError(f"{self.label} line 1: {exc}.", code="bad_input") from exc
            if len(set(header)) != len(header) or any(not h.strip() for h in header):
                raise ConfigurationError(
                    f"{self.label} line 1: the CSV header {header} has empty or repeated column names.",
                    code="bad_input",
                )
            if self.id_field not in header:
                self._no_id_column(header)
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise ConfigurationError(f"{self.label} line {start}: {exc}.", code="bad_input") from exc
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise ConfigurationError(
                        f"{self.label} line {start} has {len(row)} values for {len(header)} columns "
                        f"({', '.join(header)}).",
                        code="bad_input",
                        hint="quote values that contain commas or line breaks",
                    )
                yield start, dict(zip(header, row, strict=True))

    def _no_id_column(self, header: list[str]) -> None:
        """A CSV header without the id column: an error when ``id_field`` was named (``"id"``
        included), a warning (once per source) when a column looks like it (``ID``, `` id``)."""
        columns = ", ".join(repr(h) for h in header)
        if self.chosen:
            raise ConfigurationError(
                f"{self.label} line 1: the CSV header has no '{self.id_field}' column (the id field); its "
                f"columns are {columns}.",
                field=self.id_field,
                code="bad_input",
                hint="name the id column with --id-field (id_field= in Python), or fix the header",
            )
        near = [h for h in header if h.strip().strip("\"'").lower() == self.id_field]
        if near and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.label} line 1: the CSV header has no '{self.id_field}' column, but has {near[0]!r}; "
                "records are keyed by their line number. Rename the column to "
                f"'{self.id_field}' or pass --id-field {near[0].strip()!r} (id_field= in Python) to key them "
                "by it.",
                UserWarning,
                stacklevel=2,
            )


class _TrackLines:
    """Feeds ``csv.reader`` text lines (it counts them itself in ``line_num``)."""

    def __init__(self, lines: Iterator[tuple[int, str]]) -> None:
        self._lines = lines

    def __iter__(self) -> _TrackLines:
        return self

    def __next__(self) -> str:
        return next(self._lines)[1]


def open_records(records: Any, *, id_field: str | None = None, fmt: str | None = None) -> RecordSource:
    """The record source for ``records``: a path to a ``.jsonl``/``.ndjson``/``.csv`` file, or an
    iterable of mappings (read once, kept in memory).

    Args:
        records: A file path or an iterable of dicts.
        id_field: The field holding a record's key. Named (``"id"`` included), it must exist: in
            the CSV header, or in at least one record. ``None`` (default): the ``id`` field where a
            record has one, else the line number.
        fmt: ``"jsonl"`` or ``"csv"`` to override the file extension.

    Raises:
        ConfigurationError: a missing or unreadable file, an unknown format, or (for records given
            in Python) a record that is not a mapping or has a bad or duplicate id.
    """
    if isinstance(records, str | os.PathLike):
        path = Path(records)
        kind = fmt or _FORMATS.get(path.suffix.lower())
        if kind not in ("jsonl", "csv"):
            raise ConfigurationError(
                f"cannot tell the format of the input file {path}: expected a .jsonl, .ndjson or .csv file.",
                code="bad_input",
                hint="rename the file, or pass --format jsonl|csv (fmt= in Python)",
            )
        if not path.is_file():
            raise ConfigurationError(f"the input file {path} does not exist.", code="bad_input")
        return _FileSource(path, kind, id_field)
    if isinstance(records, Mapping) or not isinstance(records, Iterable):
        raise ConfigurationError(
            f"records must be a file path or an iterable of dicts, got {type(records).__name__}.",
            code="bad_input",
            hint='pass "data.jsonl", or a list like [{"id": "q1", "question": "..."}]',
        )
    return _MemorySource(records, id_field)
