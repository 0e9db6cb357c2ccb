"""What a custom ``dspy.Module`` stage is given: the parameters of the ``forward`` its call runs.

Helper 97 found modules whose ``forward`` is not a plain method of the class (set on the instance,
a property, given by ``__getattr__``, only an ``aforward``) read as taking anything — fed the whole
state, or nothing once nested — and a ``forward(self, **kwargs)`` module silently given nothing in
a nested pipeline. Each test here would have caught one of them.
"""

from __future__ import annotations

from typing import Any

import dspy

import stageflow
from stageflow import BranchingPipeline, IterativePipeline, SequentialPipeline
from stageflow.testing import FakeLM, call


class Shout(dspy.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.forward = self.shout  # (set on the instance, as GEPA and hand-written code do)

    def shout(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(loud=text.upper())


def test_a_forward_set_on_the_instance_gives_the_stages_inputs() -> None:
    ports = stageflow.describe(Shout())
    assert (ports.required, ports.accepts_any) == (("text",), False)


async def test_a_forward_set_on_the_instance_runs_wherever_the_stage_is(mode: str) -> None:
    assert (await call(SequentialPipeline([Shout()]), mode, text="hi", lang="en")).loud == "HI"
    nested = SequentialPipeline([SequentialPipeline([Shout()])])
    assert (await call(nested, mode, text="hi")).loud == "HI"
    looped = IterativePipeline([Shout()], lambda state, i: i >= 1)
    assert (await call(looped, mode, text="hi")).loud == "HI"
    branch = BranchingPipeline(lambda text: "a", {"a": Shout()})
    assert (await call(branch, mode, text="hi")).loud == "HI"
    with dspy.context(lm=FakeLM({"text": "hello"})):
        after = SequentialPipeline([dspy.Predict("question -> text"), Shout()])
        assert (await call(after, mode, question="q")).loud == "HELLO"


class ByProperty(dspy.Module):  # type: ignore[misc]
    @property
    def forward(self) -> Any:
        return lambda text: dspy.Prediction(loud=text.upper())


class ByGetattr(dspy.Module):  # type: ignore[misc]
    def __getattr__(self, name: str) -> Any:
        if name == "forward":
            return lambda text: dspy.Prediction(loud=text.upper())
        return super().__getattr__(name)


class AsyncOnly(dspy.Module):  # type: ignore[misc]
    async def aforward(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(loud=text.upper())


def test_a_forward_property_or_getattr_or_an_aforward_alone_gives_the_inputs() -> None:
    for module in (ByProperty(), ByGetattr(), AsyncOnly()):
        assert stageflow.describe(module).required == ("text",), type(module).__name__


async def test_they_run_nested_with_their_inputs(mode: str) -> None:
    for module in (ByProperty(), ByGetattr()):
        nested = SequentialPipeline([SequentialPipeline([module])])
        assert (await call(nested, mode, text="hi", other_field=1)).loud == "HI"
    nested = SequentialPipeline([SequentialPipeline([AsyncOnly()])])
    assert (await nested.acall(text="hi", other_field=1)).loud == "HI"


class Echo(dspy.Module):  # type: ignore[misc]
    """The tutorial's shape: ``forward(self, **kwargs)``."""

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        return dspy.Prediction(seen=sorted(kwargs))


async def test_a_kwargs_module_gets_the_whole_state_nested_as_flat(mode: str) -> None:
    flat = SequentialPipeline([Echo()])
    nested = SequentialPipeline([SequentialPipeline([Echo()])])
    deeper = SequentialPipeline([stageflow.stage(lambda q: {"r": q}, writes=["r"]), nested])
    assert (await call(flat, mode, q="x")).seen == ["q"]
    assert (await call(nested, mode, q="x")).seen == ["q"]
    assert (await call(deeper, mode, q="x")).seen == ["q", "r"]
    assert stageflow.describe(nested).accepts_any


def test_a_kwargs_module_as_a_hierarchical_node_gets_the_state() -> None:
    tree = stageflow.HierarchicalPipeline(
        {"root": {"type": "pipeline", "stages": ["e"]}, "e": {"type": "module", "module": Echo()}}
    )
    assert tree(question="q").seen == ["question"]


class ClassAcall(dspy.Module):  # type: ignore[misc]
    async def acall(self, question: str) -> dspy.Prediction:  # type: ignore[override]
        return dspy.Prediction(answer="own acall")

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer="forward")


class InstanceAcall(dspy.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()

        async def acall(question: str) -> dspy.Prediction:
            return dspy.Prediction(answer="own acall")

        self.acall = acall

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer="forward")


async def test_an_acall_of_yours_runs_when_awaited_without_an_aforward(mode: str) -> None:
    expected = "forward" if mode == "sync" else "own acall"
    for cls in (ClassAcall, InstanceAcall):
        assert (await call(SequentialPipeline([cls()]), mode, question="q")).answer == expected
        fanout = stageflow.ForEach(cls(), over="qs", item="question", collect={"answer": "answers"})
        assert (await call(fanout, mode, qs=["q"])).answers == [expected]


async def test_instrumentation_on_dspys_acall_leaves_a_forward_only_module_on_a_thread(
    monkeypatch: Any,
) -> None:
    """(helper 99, R1) OpenInference wraps ``dspy.Module.acall`` itself: still DSPy's ``acall``, so a
    module without ``aforward`` keeps running its ``forward`` on a worker thread under ``acall``."""
    original = dspy.Module.acall
    seen: list[str] = []

    async def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(type(self).__name__)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(dspy.Module, "acall", wrapped)

    class Step(dspy.Module):  # type: ignore[misc]
        def forward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(answer=question.upper())

    assert (await SequentialPipeline([Step()]).acall(question="q")).answer == "Q"
    assert "Step" not in seen  # (its forward ran on a thread, as without the wrapper)
