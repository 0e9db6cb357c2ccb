"""A pipeline subclass's ``forward`` is read as Python reads a class attribute, whatever it is: a
``staticmethod``, a ``functools.partial``, a decorator object with its own ``__get__`` (what
``wrapt`` makes). Before, the wrapper that keeps
DSPy's "forward read directly" warning bound every one of them as a plain function (crashes, and a
decorator that never saw its instance)."""

from __future__ import annotations

import functools
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import SequentialPipeline, stage
from stageflow.testing import call


def _inner() -> list[Any]:
    return [stage(lambda x: {"y": x}, writes=["y"])]


async def test_a_staticmethod_or_partial_forward_is_called_as_dspy_calls_it() -> None:
    class Static(SequentialPipeline):
        forward = staticmethod(lambda **kw: dspy.Prediction(y=kw["x"] + 1))

    class Partial(SequentialPipeline):
        forward = functools.partial(lambda k, **kw: dspy.Prediction(y=kw["x"] + k), 2)

    class Plain(dspy.Module):  # type: ignore[misc]
        forward = staticmethod(lambda **kw: dspy.Prediction(y=kw["x"] + 1))

    assert Static(_inner())(x=1).y == Plain()(x=1).y == 2
    assert Partial(_inner())(x=1).y == 3
    assert SequentialPipeline([Static(_inner())])(x=1).y == 2
    assert SequentialPipeline([Partial(_inner())])(x=1).y == 3


class _Bound:
    """A decorator object binding itself as ``wrapt`` does: it records the instance it was read from."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.seen: list[Any] = []

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        self.seen.append(obj)
        return functools.partial(self.fn, obj) if obj is not None else self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


async def test_a_decorator_object_gets_its_instance(mode: str) -> None:
    def forward(self: Any, **kw: Any) -> Any:
        return SequentialPipeline.forward(self, **kw)

    decorated = _Bound(forward)

    class Decorated(SequentialPipeline):
        pass

    Decorated.forward = decorated  # (set after the class is made: wrapped like a body's forward)
    stageflow.engine.nested.wrap_forward(Decorated)
    p = Decorated(_inner())
    if mode == "sync":
        assert p(x=4).y == 4
        assert SequentialPipeline([p])(x=4).y == 4
        assert decorated.seen
        assert all(o is p for o in decorated.seen if o is not None)  # (None: read from the class)
    else:
        assert (await call(p, mode, x=4)).y == 4


def test_reading_forward_directly_still_warns(caplog: pytest.LogCaptureFixture) -> None:
    class Static(SequentialPipeline):
        forward = staticmethod(lambda **kw: dspy.Prediction(y=0))

    p = Static(_inner())
    with caplog.at_level("WARNING", logger="dspy.primitives.module"):
        p(x=1)
        assert not caplog.records
        p.forward(x=1)
    assert len(caplog.records) == 1


async def test_a_classmethod_or_property_forward_is_read_as_python_reads_it(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Cls(SequentialPipeline):
        @classmethod
        def forward(cls, **kw: Any) -> Any:
            return dspy.Prediction(y=cls.__name__)

    class Prop(SequentialPipeline):
        @property
        def forward(self) -> Any:
            return lambda **kw: dspy.Prediction(y="prop")

    for p, expected in ((Cls(_inner()), "Cls"), (Prop(_inner()), "prop")):
        assert (await call(p, mode, x=1)).y == expected
        assert (await call(SequentialPipeline([p]), mode, x=1)).y == expected
    with caplog.at_level("WARNING", logger="dspy.primitives.module"):
        Cls(_inner()).forward(x=1)
    assert len(caplog.records) == 1
