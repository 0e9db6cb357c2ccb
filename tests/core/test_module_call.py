"""How the engine calls a custom ``dspy.Module`` stage: what DSPy's ``Module.__call__`` / ``acall``
would do, without their cost (``stageflow.engine.module_call``).

Each test pins one thing that must behave as DSPy's own call does: history, ``caller_modules``,
callbacks (global and the module's own), instrumentation wrapping ``Module.__call__``, a ``forward``
set on the instance, odd ``forward`` attributes, and usage tracking.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, ClassVar

import dspy
import pytest
from dspy.utils.callback import BaseCallback

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

    class Wrapper:  # not a plain function, like wrapt's FunctionWrapper
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __get__(self, obj: Any, owner: Any = None) -> Any:
            if obj is None:
                return self

            def bound(*args: Any, **kwargs: Any) -> Any:
                seen.append(type(obj).__name__)
                return self.fn(obj, *args, **kwargs)

            return bound

    monkeypatch.setattr(dspy.Module, "__call__", Wrapper(dspy.Module.__call__))
    monkeypatch.setattr(dspy.Module, "acall", Wrapper(dspy.Module.acall))
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
