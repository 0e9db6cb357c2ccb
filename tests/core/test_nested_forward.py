"""A nested pipeline whose ``forward`` is its own — set on the instance (the tutorial's multi-hop
logic) or defined by its class — gives the same fields nested as alone, sync and async.

Reproducers (user-style verification): a ``forward`` set on a nested pipeline returned
``dspy.Prediction(title=..., words=...)``, and the enclosing pipeline merged none of it (its stages
had undeclared outputs); a subclass overriding ``forward`` gave three different results depending
on sync or async and nested or not (``acall`` skipped the override).
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ContractError
from stageflow.testing import FakeLM, call


class Extract(dspy.Module):
    def forward(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(title=text.title())


def _with_own_forward() -> stageflow.SequentialPipeline:
    inner = stageflow.SequentialPipeline([Extract()])

    def forward(self: Any, text: str) -> dspy.Prediction:
        return dspy.Prediction(title=self.stages[0](text=text).title, words=len(text.split()))

    inner.forward = forward.__get__(inner, stageflow.SequentialPipeline)
    return inner


async def test_a_forward_set_on_a_nested_pipeline_gives_all_its_fields(mode: str) -> None:
    inner = _with_own_forward()
    alone = await call(inner, mode, text="hello world")
    assert dict(alone) == {"title": "Hello World", "words": 2}
    outer = stageflow.SequentialPipeline([inner])
    for _ in range(3):
        nested = await call(outer, mode, text="hello world")
        assert dict(nested) == {"text": "hello world", "title": "Hello World", "words": 2}
    reader = stageflow.SequentialPipeline([inner, stageflow.stage(lambda words: {"n": words}, writes=["n"])])
    assert (await call(reader, mode, text="hello world")).n == 2


class MyQA(stageflow.SequentialPipeline):
    def __init__(self) -> None:
        super().__init__([dspy.Predict("question -> answer")])

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        r = super().forward(**kwargs)
        return dspy.Prediction(answer=r.answer.title(), source="MyQA")


async def test_a_subclass_forward_is_run_sync_and_async_alone_and_nested(mode: str) -> None:
    with dspy.context(lm=FakeLM({"answer": "paris"})):
        alone = MyQA()
        outer = stageflow.SequentialPipeline([MyQA()])
        for _ in range(3):
            assert dict(await call(alone, mode, question="q")) == {"answer": "Paris", "source": "MyQA"}
            nested = await call(outer, mode, question="q")
            assert dict(nested) == {"question": "q", "answer": "Paris", "source": "MyQA"}


async def test_a_subclass_with_its_own_aforward_keeps_it(mode: str) -> None:
    class Both(stageflow.SequentialPipeline):
        def forward(self, **kwargs: Any) -> dspy.Prediction:
            return dspy.Prediction(y=kwargs["x"], how="sync")

        async def aforward(self, **kwargs: Any) -> dspy.Prediction:
            return dspy.Prediction(y=kwargs["x"], how="async")

    outer = stageflow.SequentialPipeline([Both([stageflow.stage(lambda x: {"y": x}, writes=["y"])])])
    for _ in range(2):
        result = await call(outer, mode, x=1)
        assert (result.how, result.y) == (mode, 1)


async def test_an_own_forward_must_return_the_declared_outputs(mode: str) -> None:
    inner = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x}, writes=["y"])])
    inner.forward = lambda **kw: dspy.Prediction(z=1)
    outer = stageflow.SequentialPipeline([inner])
    with pytest.raises(ContractError, match=r"'stages\[0\]' .*declares output 'y' but did not return"):
        await call(outer, mode, x=1)


async def test_any_mapping_an_own_forward_returns_merges_whole(mode: str) -> None:
    import collections
    import types

    for make in (collections.OrderedDict, types.MappingProxyType, dict):

        class Sub(stageflow.SequentialPipeline):
            def forward(self, **kw: Any) -> Any:
                r = super().forward(**kw)
                return make({**dict(r), "extra": 1})  # noqa: B023  (built and called in this turn)

        outer = stageflow.SequentialPipeline([Sub([stageflow.stage(lambda q: {"a": q}, writes=["a"])])])
        for _ in range(2):
            assert dict(await call(outer, mode, q="x")) == {"q": "x", "a": "x", "extra": 1}


@pytest.mark.parametrize("how", ["instance", "subclass", "custom module"])
async def test_the_lm_work_of_an_own_forward_is_its_stages(mode: str, how: str) -> None:
    # Reproducer: the usage of a nested pipeline with its own forward was filed under the path of
    # the pipeline around it ('stages[0]'), where a custom module at its place gets its own path.
    class Sub(stageflow.SequentialPipeline):
        def forward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(draft=self.stages[0](question=question).draft)

    class Custom(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = dspy.Predict("question -> draft")

        def forward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(draft=self.p(question=question).draft)

    if how == "instance":
        own: Any = stageflow.SequentialPipeline([dspy.Predict("question -> draft")])
        own.forward = Sub.forward.__get__(own, stageflow.SequentialPipeline)
    else:
        own = Sub([dspy.Predict("question -> draft")]) if how == "subclass" else Custom()
    program = stageflow.SequentialPipeline(
        [stageflow.SequentialPipeline([own, dspy.Predict("draft -> note")])]
    )
    with dspy.context(lm=FakeLM({"draft": "D", "note": "N"})):
        for _ in range(2):
            result = await call(program, mode, question="q")
            assert sorted(result.run.usage.to_dict()) == ["stages[0].stages[0]", "stages[0].stages[1]"]
            assert result.run.usage.total.lm_calls == 2


async def test_an_own_aforward_and_what_hooks_and_profiles_see(mode: str) -> None:
    # Reproducers: a subclass with its own aforward filed its LM calls under '' (not its stage); the
    # profiler, traces and hooks saw no LM work for a nested pipeline with its own forward.
    class Both(stageflow.SequentialPipeline):
        def __init__(self) -> None:
            super().__init__([dspy.Predict("question -> answer")])
            self.extra = dspy.Predict("question -> answer")

        def forward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(answer=self.extra(question=question).answer)

        async def aforward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(answer=(await self.extra.acall(question=question)).answer)

    seen: dict[str, Any] = {}

    class Listen(stageflow.Hook):
        def after_stage(self, *, path: str, usage: dict[str, Any] | None = None, **future: Any) -> None:
            seen[path] = usage and usage["lm_calls"]

    program = stageflow.SequentialPipeline([stageflow.stage(lambda question: {"x": 1}, writes=["x"]), Both()])
    with dspy.context(lm=FakeLM({"answer": "a"})):
        result = await call(program, mode, question="q")
        assert list(result.run.usage.to_dict()) == ["stages[1]"]
        with stageflow.profile() as prof, stageflow.attach_hooks(Listen()):
            await call(program, mode, question="q")
    assert seen["stages[1]"] == 1
    assert prof.totals()["lm_calls"] == 1
