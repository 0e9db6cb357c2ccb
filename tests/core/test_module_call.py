"""How the engine calls a custom ``dspy.Module`` stage: what DSPy's ``Module.__call__`` / ``acall``
would do, without their cost (``stageflow.engine.module_call``).

Each test pins one thing that must behave as DSPy's own call does: history, ``caller_modules``,
callbacks (global and the module's own), instrumentation wrapping ``Module.__call__``, a ``forward``
set on the instance, odd ``forward`` attributes, and usage tracking.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, ClassVar

import dspy
import pytest
from dspy.utils.callback import BaseCallback
from test_nested_call import Noting

from stageflow import SequentialPipeline
from stageflow.testing import FakeLM, call


class Asks(dspy.Module):  # type: ignore[misc]
    """The tutorial's shape: a custom module around a predictor, returning ``dspy.Prediction``."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")
        self.callers: list[list[str]] = []

    def forward(self, question: str) -> dspy.Prediction:
        self.callers.append([type(m).__name__ for m in dspy.settings.caller_modules or []])
        return dspy.Prediction(answer=self.predict(question=question).answer)

    async def aforward(self, question: str) -> dspy.Prediction:
        self.callers.append([type(m).__name__ for m in dspy.settings.caller_modules or []])
        return dspy.Prediction(answer=(await self.predict.acall(question=question)).answer)


class Hand(dspy.Module):  # type: ignore[misc]
    """The same module composed by hand: what DSPy's own calls record."""

    def __init__(self, inner: dspy.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, question: str) -> dspy.Prediction:
        return self.inner(question=question)

    async def aforward(self, question: str) -> dspy.Prediction:
        return await self.inner.acall(question=question)


async def _both(mode: str, make: Any, **kw: Any) -> tuple[Any, Any]:
    """(module run as a stage, module run by hand): each a fresh ``make()``."""
    staged, by_hand = make(), make()
    await call(SequentialPipeline([staged]), mode, **kw)
    await call(Hand(by_hand), mode, **kw)
    return staged, by_hand


async def test_history_and_caller_modules_are_dspys(mode: str) -> None:
    with dspy.context(lm=FakeLM({"answer": "a"})):
        staged, by_hand = await _both(mode, Asks, question="q")
    # DSPy records an LM call in the history of every module on the call stack.
    assert len(staged.history) == len(staged.predict.history) == 1
    assert len(by_hand.history) == 1
    # (stageflow's usage probe, a private module, sits outermost)
    named = [[n for n in c if not n.startswith("_")] for c in staged.callers]
    assert named == [["SequentialPipeline", "Asks"]]
    assert by_hand.callers == [["Hand", "Asks"]]
    assert dspy.settings.caller_modules in (None, [])  # (restored after the call)


class _Recorder(BaseCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.started: list[str] = []
        self.ended: list[Any] = []

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.started.append(type(instance).__name__)

    def on_module_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self.ended.append(exception)


async def test_global_callbacks_see_the_module(mode: str) -> None:
    recorder = _Recorder()
    with dspy.context(lm=FakeLM({"answer": "a"}), callbacks=[recorder]):
        result = await call(SequentialPipeline([Asks()]), mode, question="q")
    assert result.answer == "a"
    assert recorder.started == ["SequentialPipeline", "Asks", "Predict"]
    assert recorder.ended == [None, None, None]


async def test_the_modules_own_callbacks_fire(mode: str) -> None:
    recorder = _Recorder()
    module = Asks()
    module.callbacks = [recorder]
    with dspy.context(lm=FakeLM({"answer": "a"})):
        assert (await call(SequentialPipeline([module]), mode, question="q")).answer == "a"
    assert recorder.started == ["Asks"]


async def test_a_forward_set_on_the_instance_runs(mode: str) -> None:
    module = Asks()
    module.forward = lambda question: dspy.Prediction(answer=question.upper())

    async def aforward(question: str) -> dspy.Prediction:
        return dspy.Prediction(answer=question.upper() + "!")

    module.aforward = aforward
    result = await call(SequentialPipeline([module]), mode, question="q")
    assert result.answer == ("Q" if mode == "sync" else "Q!")


async def test_instrumentation_wrapping_module_call_sees_the_stage(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(dspy.Module, "__call__", Noting(dspy.Module.__call__, seen))
    monkeypatch.setattr(dspy.Module, "acall", Noting(dspy.Module.acall, seen))
    with dspy.context(lm=FakeLM({"answer": "a"})):
        assert (await call(SequentialPipeline([Asks()]), mode, question="q")).answer == "a"
    assert seen[:2] == ["SequentialPipeline", "Asks"]


class OwnCall(dspy.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super().__call__(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await super().acall(*args, **kwargs)

    def forward(self, x: int) -> dspy.Prediction:
        return dspy.Prediction(y=x + 1)

    async def aforward(self, x: int) -> dspy.Prediction:
        return dspy.Prediction(y=x + 1)


async def test_a_call_of_its_own_runs(mode: str) -> None:
    module = OwnCall()
    assert (await call(SequentialPipeline([module]), mode, x=1)).y == 2
    assert module.calls == 1


class Reads(dspy.Module):  # type: ignore[misc]
    """Looks its attributes up its own way: DSPy's own call reads ``forward`` through it."""

    reads: ClassVar[list[str]] = []

    def __getattribute__(self, name: str) -> Any:
        if name in ("forward", "aforward"):
            type(self).reads.append(name)
        return super().__getattribute__(name)

    def forward(self, x: int) -> dspy.Prediction:
        return dspy.Prediction(y=x * 2)

    async def aforward(self, x: int) -> dspy.Prediction:
        return dspy.Prediction(y=x * 2)


async def test_a_getattribute_of_its_own_sees_the_read(mode: str) -> None:
    pipeline = SequentialPipeline([Reads()])
    assert (await call(pipeline, mode, x=2)).y == 4  # (planning reads the methods too)
    Reads.reads = []
    assert (await call(pipeline, mode, x=2)).y == 4
    assert Reads.reads == (["forward"] if mode == "sync" else ["aforward"])


def _double(x: int) -> dspy.Prediction:
    return dspy.Prediction(y=x * 2)


class StaticForward(dspy.Module):  # type: ignore[misc]
    forward = staticmethod(_double)


class PartialForward(dspy.Module):  # type: ignore[misc]
    forward = functools.partial(_double)  # no __get__: read from an instance, it is itself


class Inherited(StaticForward):
    pass


@pytest.mark.parametrize("cls", [StaticForward, PartialForward, Inherited])
def test_odd_forward_attributes_are_read_as_python_reads_them(cls: type) -> None:
    assert cls()(x=3).y == 6  # DSPy's own call
    assert SequentialPipeline([cls()])(x=3).y == 6


def test_no_forward_gives_dspys_error() -> None:
    class NoForward(dspy.Module):  # type: ignore[misc]
        pass

    with pytest.raises(Exception) as by_dspy:
        NoForward()(x=1)
    with pytest.raises(Exception) as staged:
        SequentialPipeline([NoForward()])(x=1)
    assert str(by_dspy.value) in str(staged.value)


async def test_no_called_directly_warning(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="dspy.primitives.module"),
        dspy.context(lm=FakeLM({"answer": "a"})),
    ):
        assert (await call(SequentialPipeline([Asks(), Asks()]), mode, question="q")).answer == "a"
    assert not caplog.records


async def test_usage_tracking_counts_the_modules_lm_calls(mode: str) -> None:
    with dspy.context(lm=FakeLM({"answer": "a"}), track_usage=True):
        result = await call(SequentialPipeline([Asks(), Asks()]), mode, question="q")
    assert result.run.usage.total.lm_calls == 2


async def test_settings_after_the_stage_are_the_callers(mode: str) -> None:
    seen: list[Any] = []

    def peek(x: int) -> dspy.Prediction:
        seen.append(dspy.settings.lm)
        return dspy.Prediction(y=x)

    class Peek(dspy.Module):  # type: ignore[misc]
        def forward(self, x: int) -> dspy.Prediction:
            return peek(x)

        async def aforward(self, x: int) -> dspy.Prediction:
            return peek(x)

    lm = FakeLM({"answer": "a"})
    with dspy.context(lm=lm):
        await call(SequentialPipeline([Peek(), Peek()]), mode, x=1)
        assert dspy.settings.lm is lm
    assert seen == [lm, lm]


# -- helper 96's findings: each was a difference from DSPy's own call -------------------------------


async def test_an_acall_set_on_the_instance_is_what_an_awaited_call_runs(mode: str) -> None:
    class Both(dspy.Module):  # type: ignore[misc]
        def forward(self, x: int) -> dspy.Prediction:
            return dspy.Prediction(y="forward")

        async def aforward(self, x: int) -> dspy.Prediction:
            return dspy.Prediction(y="aforward")

    module = Both()

    async def patched(**kwargs: Any) -> dspy.Prediction:
        return dspy.Prediction(y="instance acall")

    module.acall = patched
    result = await call(SequentialPipeline([module]), mode, x=1)
    assert result.y == ("forward" if mode == "sync" else "instance acall")


class _Shared(BaseCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.started: list[str] = []

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.started.append(type(instance).__name__)


async def test_callbacks_from_a_property_or_the_class_fire(mode: str) -> None:
    recorder = _Shared()

    class ByProperty(dspy.Module):  # type: ignore[misc]
        @property
        def callbacks(self) -> list[Any]:
            return [recorder]

        @callbacks.setter
        def callbacks(self, value: Any) -> None:
            pass

        def forward(self, x: int) -> dspy.Prediction:
            return dspy.Prediction(y=x)

        async def aforward(self, x: int) -> dspy.Prediction:
            return dspy.Prediction(y=x)

    class ByClass(dspy.Module):  # type: ignore[misc]
        callbacks: ClassVar[list[Any]] = [recorder]

        def forward(self, x: int) -> dspy.Prediction:
            return dspy.Prediction(y=x)

        async def aforward(self, x: int) -> dspy.Prediction:
            return dspy.Prediction(y=x)

    by_class = ByClass()
    del by_class.callbacks  # (DSPy gave the instance an empty list of its own; the class's shows)
    await call(SequentialPipeline([ByProperty(), by_class]), mode, x=1)
    assert recorder.started == ["ByProperty", "ByClass"]


async def test_a_callbacks_property_keeping_a_list_under_its_own_name_fires(mode: str) -> None:
    """(session 33's left-out corner) The property's setter stores what DSPy's ``__init__`` gives it
    in the instance's ``__dict__`` under the same name; its getter returns the callbacks in force.
    The engine read the stored (empty) list and skipped them; the class is now called by DSPy."""
    recorder = _Shared()

    class Stored(dspy.Module):  # type: ignore[misc]
        @property
        def callbacks(self) -> list[Any]:
            return [recorder]

        @callbacks.setter
        def callbacks(self, value: Any) -> None:
            self.__dict__["callbacks"] = value

        def forward(self, x: int) -> dspy.Prediction:
            return dspy.Prediction(y=x)

        async def aforward(self, x: int) -> dspy.Prediction:
            return dspy.Prediction(y=x)

    module = Stored()
    assert module.__dict__["callbacks"] == []
    assert (await call(SequentialPipeline([module]), mode, x=1)).y == 1
    assert recorder.started == ["Stored"]


async def test_a_forward_property_of_the_class_beats_the_instances_own(mode: str) -> None:
    class Prop(dspy.Module):  # type: ignore[misc]
        @property
        def forward(self) -> Any:
            return lambda x: dspy.Prediction(y="class property")

    module = Prop()
    module.__dict__["forward"] = lambda x: dspy.Prediction(y="instance")
    assert module(x=1).y == "class property"  # (DSPy's own call, as Python looks it up)
    assert (await call(SequentialPipeline([module]), "sync", x=1)).y == "class property"


def test_dspy_configure_inside_a_stage_does_not_reach_the_rest_of_its_call() -> None:
    """``Module.__call__`` snapshots every global setting: ``dspy.configure`` inside ``forward``
    changes nothing until the call returns; so for every entry point of a pipeline."""
    one, two = FakeLM({"answer": "ONE"}), FakeLM({"answer": "TWO"})

    class Switches(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.predict = dspy.Predict("question -> answer")

        def forward(self, question: str) -> dspy.Prediction:
            dspy.configure(lm=two)
            try:
                return self.predict(question=question)
            finally:
                dspy.configure(lm=one)

    before = dspy.settings.lm
    dspy.configure(lm=one)
    try:
        p = SequentialPipeline([Switches()])
        assert p(question="q").answer == "ONE"
        assert p.forward(question="q").answer == "ONE"
        assert p.stageflow_call({"question": "q"}).answer == "ONE"
    finally:
        dspy.configure(lm=before)


def test_a_setting_configured_by_an_earlier_stage_is_the_one_a_later_module_sees() -> None:
    from stageflow import stage

    def set_foo(question: str) -> dict[str, Any]:
        dspy.configure(stageflow_test_foo=1)
        return {"z": 1}

    class ReadFoo(dspy.Module):  # type: ignore[misc]
        def forward(self, z: int) -> dspy.Prediction:
            dspy.configure(stageflow_test_foo=2)  # (after the call's snapshot: not seen in it)
            return dspy.Prediction(foo=dspy.settings.stageflow_test_foo)

    try:
        p = SequentialPipeline([stage(set_foo, writes=["z"]), ReadFoo()])
        assert p(question="q").foo == 1
    finally:
        importlib.import_module("dspy.dsp.utils.settings").main_thread_config.pop("stageflow_test_foo", None)


def test_an_instrumentation_wrapper_removed_again_leaves_dspys_call_recognised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``wrapt`` wrapper compares and hashes equal to the function it wraps: once it is removed,
    DSPy's own ``Module.__call__`` must not count as foreign."""
    from stageflow.engine.nested import pushable

    original = dspy.Module.__call__

    class EqualWrapper:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __get__(self, obj: Any, owner: Any = None) -> Any:
            return self if obj is None else functools.partial(self.fn, obj)

        def __eq__(self, other: object) -> bool:
            return bool(other == self.fn)

        def __hash__(self) -> int:
            return hash(self.fn)

    from stageflow._callers import KNOWN_ENTRY_POINTS

    module = Asks()
    monkeypatch.delitem(KNOWN_ENTRY_POINTS, "__call__", raising=False)  # (as in a fresh process)
    monkeypatch.setattr(dspy.Module, "__call__", EqualWrapper(original))
    assert not pushable(module, "__call__")
    monkeypatch.setattr(dspy.Module, "__call__", original)
    assert pushable(module, "__call__")


def test_a_class_with_a_call_of_its_own_is_freed_after_use() -> None:
    """(helper 98, A2) The memo of foreign ``__call__``s must not keep a class made on the fly alive:
    a ``super()`` in its ``__call__`` holds the class, and the class what it references."""
    import gc
    import weakref

    refs = []
    for _ in range(20):

        class Made(dspy.Module):  # type: ignore[misc]
            payload = bytearray(1024)

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                return super().__call__(*args, **kwargs)

            def forward(self, x: int) -> dspy.Prediction:
                return dspy.Prediction(y=x)

        assert SequentialPipeline([Made()])(x=1).y == 1
        refs.append(weakref.ref(Made))
        del Made
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
