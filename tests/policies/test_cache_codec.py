"""The cache file format: a typed JSON round trip that never runs code or imports anything."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import sys
import uuid
import zoneinfo
from typing import Any, NamedTuple

import dspy
import numpy as np
import pydantic
import pytest

from stageflow.policies import codec
from stageflow.state import Result


class Color(enum.Enum):
    RED = "red"


class Pair(NamedTuple):
    a: Any
    b: Any


class Answer(pydantic.BaseModel):
    text: str
    score: float = 0.0
    nested: list[Any] = []


class NeverEncoded(pydantic.BaseModel):
    text: str


@dataclasses.dataclass(frozen=True)
class Frozen:
    items: tuple[int, ...]
    label: str


SAMPLES: list[Any] = [
    None,
    True,
    0,
    1,
    1.0,
    -0.0,
    float("inf"),
    2**80,
    "text",
    "",
    "\ud800 lone surrogate",
    b"\x00\xff",
    bytearray(b"ab"),
    3 + 4j,
    [1, [2, (3,)]],
    (1, "a", None),
    {1: "int key", "1": "str key", (1, 2): "tuple key", 2.0: "float key", None: "none key"},
    {True: "bool key"},
    {1, 2},
    frozenset({"a"}),
    datetime.datetime(2026, 1, 2, 3, 4, 5, 6),
    datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    datetime.date(2026, 1, 2),
    datetime.time(3, 4),
    datetime.timedelta(days=1, seconds=2, microseconds=3),
    decimal.Decimal("1.10"),
    uuid.UUID(int=5),
    Color.RED,
    Pair(1, [2]),
    Answer(text="t", score=0.5, nested=[(1, 2)]),
    Frozen((1, 2), "x"),
    np.arange(6, dtype=np.int16).reshape(2, 3),
    np.float32(1.5),
]


def same(a: Any, b: Any) -> bool:
    """Equal *and* of the same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, pydantic.BaseModel):
        return all(same(getattr(a, k), getattr(b, k)) for k in type(a).model_fields)
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b) and (not isinstance(a, float) or str(a) == str(b))


@pytest.mark.parametrize("value", SAMPLES, ids=[type(v).__name__ + str(i) for i, v in enumerate(SAMPLES)])
def test_round_trip_keeps_values_and_types(value: Any) -> None:
    back = codec.loads(codec.dumps(value))
    assert same(back, value), (back, value)


def test_records_round_trip_as_their_own_types() -> None:
    pred = dspy.Prediction.from_completions([{"answer": "a"}, {"answer": "b"}])
    back = codec.loads(codec.dumps(pred))
    assert type(back) is dspy.Prediction
    assert back.answer == "a"
    assert back.completions.answer == ["a", "b"]
    ex = codec.loads(codec.dumps(dspy.Example(q="x", a=(1,)).with_inputs("q")))
    assert type(ex) is dspy.Example
    assert ex.inputs().keys() == ["q"]
    assert ex.a == (1,)
    res = codec.loads(codec.dumps(Result({"y": [1]})))
    assert type(res) is Result
    assert res.y == [1]
    assert res.run.trace == []


@pytest.mark.parametrize(
    "value",
    [
        object(),
        lambda: 1,
        np.array([object()]),
        datetime.datetime(2026, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
        type(
            "Local",
            (pydantic.BaseModel,),
            {"__annotations__": {"x": int}, "__qualname__": "f.<locals>.Local"},
        )(x=1),
        {"ok": [1, {2: object()}]},
    ],
    ids=["object", "lambda", "object-array", "zoneinfo", "local-class", "nested-object"],
)
def test_what_the_format_cannot_say_is_refused(value: Any) -> None:
    with pytest.raises(codec.Unencodable):
        codec.dumps(value)


def test_a_cyclic_value_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(codec.Unencodable):
        codec.dumps(loop)


@pytest.mark.parametrize(
    "text",
    [
        b"\x80\x04\x95",  # a pickle, as bytes
        "\x80\x04\x95",  # a pickle, as text
        "not json",
        json.dumps({"value": 1}),  # no format tag
        json.dumps({"stageflow": 99, "value": 1}),  # another format version
        json.dumps({"stageflow": 1, "value": {"$t": "os.system", "v": "echo"}}),
        json.dumps({"stageflow": 1, "value": {"no": "tag"}}),
        json.dumps({"stageflow": 1, "value": {"$t": "dict", "v": [[[1], 2]]}}),  # unhashable key
        json.dumps({"stageflow": 1, "value": {"$t": "bytes", "v": "!!not base64"}}),
        json.dumps({"stageflow": 1, "value": {"$t": "ndarray", "dtype": "O", "shape": [1], "v": ""}}),
        '{"stageflow": 1, "value": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=[
        "pickle-bytes",
        "pickle-text",
        "garbage",
        "untagged",
        "version",
        "unknown-tag",
        "object",
        "bad-key",
        "bad-base64",
        "object-dtype",
        "deep",
    ],
)
def test_anything_else_is_a_decode_error(text: Any) -> None:
    with pytest.raises(codec.DecodeError):
        codec.loads(text)


def test_class_names_in_a_file_are_never_imported() -> None:
    text = json.dumps(
        {"stageflow": 1, "value": {"$t": "model", "cls": "stageflow_evil_module:Payload", "v": [], "set": []}}
    )
    with pytest.raises(codec.UnknownType):
        codec.loads(text)
    assert "stageflow_evil_module" not in sys.modules


def test_only_allowed_classes_decode_and_no_validator_runs() -> None:
    ran: list[str] = []

    class Checked(pydantic.BaseModel):
        text: str

        @pydantic.field_validator("text")
        @classmethod
        def record(cls, v: str) -> str:
            ran.append(v)
            return v.upper()

    Checked.__qualname__ = "Checked"  # a module-level name, as a real model has
    text = codec.dumps(Checked(text="a"))  # encoding allows the class in this process
    assert ran == ["a"]
    back = codec.loads(text)
    assert type(back) is Checked
    assert back.text == "A"
    assert ran == ["a"]  # decoding ran no validator
    other = text.replace(f"{__name__}:Checked", f"{__name__}:NeverEncoded")
    with pytest.raises(codec.UnknownType):  # a class this process never encoded nor allowed...
        codec.loads(other)
    assert type(codec.loads(other, {f"{__name__}:NeverEncoded": NeverEncoded})) is NeverEncoded
    codec.allow(NeverEncoded)
    assert type(codec.loads(other)) is NeverEncoded  # ...decodes once allowed


def test_a_tag_that_does_not_match_the_class_is_refused() -> None:
    codec.allow(Frozen)
    text = json.dumps(
        {"stageflow": 1, "value": {"$t": "model", "cls": f"{__name__}:Frozen", "v": [], "set": []}}
    )
    with pytest.raises(codec.DecodeError):
        codec.loads(text)


def test_dataclasses_decode_without_running_init() -> None:
    calls: list[int] = []

    @dataclasses.dataclass
    class Tracked:
        x: int

        def __post_init__(self) -> None:
            calls.append(self.x)

    Tracked.__qualname__ = "Tracked"
    text = codec.dumps(Tracked(1))
    back = codec.loads(text)
    assert (type(back), back.x, calls) == (Tracked, 1, [1])


class WithSecret(pydantic.BaseModel):
    a: int
    _secret: str = pydantic.PrivateAttr(default="")


def _secret(value: str) -> WithSecret:
    m = WithSecret(a=1)
    m._secret = value
    return m


def test_private_attributes_of_a_model_survive_the_round_trip() -> None:
    back = codec.loads(codec.dumps({"m": _secret("one")}))["m"]
    assert type(back) is WithSecret
    assert back.a == 1
    assert back._secret == "one"


def test_models_that_differ_only_in_private_attributes_get_other_cache_keys() -> None:
    from stageflow.policies.keys import freeze

    assert freeze(_secret("one")) != freeze(_secret("two"))
    assert freeze(_secret("one")) == freeze(_secret("one"))


def test_a_cached_stage_keyed_on_a_model_runs_again_for_other_private_state() -> None:
    import stageflow

    calls: list[str] = []

    def read(m: WithSecret) -> dict[str, str]:
        calls.append(m._secret)
        return {"out": m._secret}

    p = stageflow.SequentialPipeline([stageflow.Stage(stageflow.stage(read, writes=["out"]), cache=True)])
    assert p(m=_secret("one")).out == "one"
    assert p(m=_secret("two")).out == "two"  # not the first call's cached answer
    assert calls == ["one", "two"]
