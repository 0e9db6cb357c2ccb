"""Tutorial "Advanced Architectural Patterns" §3 "Parallel Architecture": ``ParallelPipeline``,
``ResultMerger``.

The tutorial's ``ParallelPipeline(parallel_groups, merger)`` runs the groups in order; a group of
one stage runs alone, the stages of a larger group run concurrently on the same input, and
``merger.merge(parallel_results)`` combines them. A failed stage becomes ``{'error': ...}``, which
the merger leaves out; when every stage failed it raises ``PipelineError("All parallel stages
failed")``. ``ResultMerger`` joins the stages' ``content`` with newlines. The result has ``result``
and ``group_results`` (per group, the list of its stages' results).
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest

from stageflow import ConfigurationError, ContractError, ParallelPipeline, PipelineError, ResultMerger
from stageflow.testing import FakeLM, call


# User code: a drafting step, two perspectives written at the same time, an editing step.
class Outline(dspy.Module):
    def __init__(self):
        super().__init__()
        self.outline = dspy.Predict("topic -> content")

    def forward(self, topic):
        return self.outline(topic=topic)


class Perspective(dspy.Module):
    def __init__(self, angle, lm=None):
        super().__init__()
        self.angle = angle
        self.write = dspy.Predict("outline, angle -> view")
        self.write.lm = lm

    def forward(self, content):
        return dspy.Prediction(content=self.write(outline=content, angle=self.angle).view)


class Edit(dspy.Module):
    def __init__(self):
        super().__init__()
        self.edit = dspy.Predict("content -> final")

    def forward(self, content):
        return self.edit(content=content)


class Unavailable(dspy.Module):
    def forward(self, content):
        raise TimeoutError("the writer timed out")


def writer_lm(**options: Any) -> FakeLM:
    return FakeLM(
        {
            "content": lambda i: f"outline({i['topic']})",
            "view": lambda i: f"{i['angle']} view of {i['outline']}",
            "final": lambda i: "EDITED: " + i["content"].replace("\n", " / "),
        },
        **options,
    )


async def test_groups_run_in_order_and_content_is_joined_with_newlines(mode: str) -> None:
    lm = writer_lm()
    pipeline = ParallelPipeline(
        [[Outline()], [Perspective("economic"), Perspective("ecological")], [Edit()]], ResultMerger()
    )
    with dspy.context(lm=lm):
        result = await call(pipeline, mode, topic="rivers")
    assert result.content == "economic view of outline(rivers)\necological view of outline(rivers)"
    assert result.final == "EDITED: economic view of outline(rivers) / ecological view of outline(rivers)"
    assert result.result["final"] == result.final  # the tutorial's `result=current_input`
    assert len(result.group_results) == 3
    for detail in ("result", "group_results"):
        assert detail not in result


async def test_the_stages_of_a_group_run_concurrently(mode: str) -> None:
    group_lm = writer_lm(rendezvous=3, rendezvous_timeout=10.0)
    angles = ("economic", "ecological", "cultural")
    pipeline = ParallelPipeline([[Outline()], [Perspective(a, lm=group_lm) for a in angles]], ResultMerger())
    with dspy.context(lm=writer_lm()):
        result = await call(pipeline, mode, topic="rivers")
    assert group_lm.peak_active == 3
    assert result.content.splitlines() == [f"{a} view of outline(rivers)" for a in angles]


async def test_a_failed_stage_is_left_out_of_the_merge(mode: str) -> None:
    from stageflow.patterns.parallel import UndeclaredFailureWarning

    pipeline = ParallelPipeline([[Outline()], [Perspective("economic"), Unavailable()]], ResultMerger())
    # Its outputs are undeclared, so stageflow cannot drop what it would have written: it says so.
    with dspy.context(lm=writer_lm()), pytest.warns(UndeclaredFailureWarning, match="stages\\[2\\]"):
        result = await call(pipeline, mode, topic="rivers")
    assert result.content == "economic view of outline(rivers)"


async def test_a_group_where_every_stage_fails_is_a_pipeline_error(mode: str) -> None:
    pipeline = ParallelPipeline([[Outline()], [Unavailable(), Unavailable()]], ResultMerger())
    with dspy.context(lm=writer_lm()), pytest.raises(PipelineError) as info:
        await call(pipeline, mode, topic="rivers")
    assert "timed out" in str(info.value)


def test_merge_is_called_as_the_tutorial_calls_it() -> None:
    merger = ResultMerger()
    parallel_results = [
        dspy.Prediction(content="economic view"),
        {"error": "the writer timed out"},  # the tutorial's record of a failed stage
        dspy.Prediction(content="ecological view"),
    ]
    assert merger.merge(parallel_results) == {"content": "economic view\necological view"}
    with pytest.raises(PipelineError) as info:
        merger.merge([{"error": "timeout"}, {"error": "timeout"}])
    assert "All parallel stages failed" in str(info.value)


def test_a_clash_on_another_field_is_reported_when_the_pipeline_is_built() -> None:
    with pytest.raises(ContractError) as info:
        ParallelPipeline(
            [[dspy.Predict("content -> summary"), dspy.Predict("content -> summary")]], ResultMerger()
        )
    assert info.value.field == "summary"


async def test_group_results_hold_each_stages_result(mode: str) -> None:
    from stageflow.patterns.parallel import UndeclaredFailureWarning

    pipeline = ParallelPipeline([[Outline()], [Perspective("economic"), Unavailable()]], ResultMerger())
    with dspy.context(lm=writer_lm()), pytest.warns(UndeclaredFailureWarning):
        result = await call(pipeline, mode, topic="rivers")
    assert [r.content for r in result.group_results[0]] == ["outline(rivers)"]
    economic, failed = result.group_results[1]
    assert economic.content == "economic view of outline(rivers)"
    assert "timed out" in str(failed["error"])


def test_the_groups_are_kept_as_given() -> None:
    outline, economic, ecological = Outline(), Perspective("economic"), Perspective("ecological")
    pipeline = ParallelPipeline([[outline], [economic, ecological]], ResultMerger())
    assert pipeline.parallel_groups == [[outline], [economic, ecological]]
    assert isinstance(pipeline.merger, ResultMerger)


# -- a merger of your own, the tutorial's way (helper 91: a TypeError from stageflow's merge call) --


class Summary(dspy.Module):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def forward(self, content: str) -> dspy.Prediction:
        return dspy.Prediction(content=f"{self.text}({content})")


class Broken(dspy.Module):
    def forward(self, content: str) -> dspy.Prediction:
        raise RuntimeError("no luck")


class KeepFirstWords(ResultMerger):
    """The tutorial's subclass shape: ``merge(self, results)``, results as the stages returned them."""

    def merge(self, results):  # type: ignore[no-untyped-def,override]
        ok = [r for r in results if not isinstance(r, dict) or "error" not in r]
        return {"content": " | ".join(r.content for r in ok), "failed": len(results) - len(ok)}


async def test_a_merger_subclass_of_yours_is_called_as_the_tutorial_calls_it(mode: str) -> None:
    p = ParallelPipeline([[Summary("a"), Broken(), Summary("b")]], KeepFirstWords())
    result = await call(p, mode, content="x")
    assert result.content == "a(x) | b(x)"
    assert result.failed == 1  # (the failed stage reached it as {'error': ...}, as in the tutorial)


async def test_any_object_with_merge_is_a_merger_and_may_return_a_prediction(mode: str) -> None:
    class Duck:
        def merge(self, results):  # type: ignore[no-untyped-def]
            return dspy.Prediction(content="+".join(r.content for r in results))

    p = ParallelPipeline([[Summary("a"), Summary("b")]], Duck())
    assert (await call(p, mode, content="x")).content == "a(x)+b(x)"


def test_a_merge_of_yours_returning_no_fields_is_a_clear_error() -> None:
    class Text(ResultMerger):
        def merge(self, results):  # type: ignore[no-untyped-def,override]
            return "a and b"

    with pytest.raises(PipelineError, match=r"Text\.merge\(\) returned str") as info:
        ParallelPipeline([[Summary("a"), Summary("b")]], Text())(content="x")
    assert info.value.code == "bad_merge"


def test_an_object_without_merge_is_refused_naming_what_is_needed() -> None:
    with pytest.raises(ConfigurationError, match=r"merge\(results\)"):
        ParallelPipeline([[Summary("a"), Summary("b")]], object())


def test_a_merger_of_yours_is_drawn_by_its_name() -> None:
    from stageflow.observe.graph import to_mermaid

    p = ParallelPipeline([[Summary("a"), Summary("b")]], KeepFirstWords())
    assert "KeepFirstWords.merge()" in to_mermaid(p)


# -- helper 92: what a merger of yours raises, returns and changes ---------------------------------


class TutorialMerger:
    """The tutorial's ``ResultMerger``, as its readers copy it (``PipelineError`` is stageflow's)."""

    def merge(self, results):  # type: ignore[no-untyped-def]
        successful = [r for r in results if not isinstance(r, dict) or "error" not in r]
        if not successful:
            raise PipelineError("All parallel stages failed")
        merged_content = []
        for result in successful:
            if hasattr(result, "predictions"):
                content = result.predictions.get("content", "")
            else:
                content = str(result)
            merged_content.append(content)
        return {"content": "\n".join(merged_content)}


async def test_the_tutorials_own_merger_gets_results_with_predictions(mode: str) -> None:
    p = ParallelPipeline([[Summary("a"), Broken(), Summary("b")]], TutorialMerger())
    assert (await call(p, mode, content="x")).content == "a(x)\nb(x)"  # (not the results' repr)


def test_an_error_in_your_merge_names_it() -> None:
    class Missing(ResultMerger):
        def merge(self, results):  # type: ignore[no-untyped-def,override]
            return {}["k"]

    with pytest.raises(PipelineError, match=r"Missing\.merge\(\) raised KeyError") as info:
        ParallelPipeline([[Summary("a"), Summary("b")]], Missing())(content="x")
    assert info.value.code == "merge_failed"
    assert isinstance(info.value.__cause__, KeyError)


def test_a_field_name_that_is_no_string_is_a_clear_error() -> None:
    class Numbered(ResultMerger):
        def merge(self, results):  # type: ignore[no-untyped-def,override]
            return {1: "x", "content": "c"}

    with pytest.raises(PipelineError, match=r"Numbered\.merge\(\) returned a field named 1"):
        ParallelPipeline([[Summary("a"), Summary("b")]], Numbered())(content="x")


def test_a_merge_that_is_not_callable_is_refused_when_built() -> None:
    class Nothing(ResultMerger):
        merge = None  # type: ignore[assignment]

    with pytest.raises(ConfigurationError, match="merger must be"):
        ParallelPipeline([[Summary("a"), Summary("b")]], Nothing())


def test_what_your_merge_changes_stays_in_its_copies() -> None:
    shared = {"content": "A"}

    def first(content: str) -> dict[str, str]:
        return shared

    class Changes(ResultMerger):
        def merge(self, results):  # type: ignore[no-untyped-def,override]
            results[0]["content"] = "changed"
            return {"content": "merged"}

    r = ParallelPipeline([[first, Summary("b")]], Changes())(content="x")
    assert r.content == "merged"
    assert shared == {"content": "A"}
    assert r.group_results[0][0] == {"content": "A"}


def test_to_spec_names_the_merger_of_yours() -> None:
    from stageflow import to_spec

    with pytest.raises(
        ConfigurationError,
        match=r"the root \(ParallelPipeline\): its merger is code of yours \(KeepFirstWords\)",
    ):
        to_spec(
            ParallelPipeline([[dspy.Predict("content -> a"), dspy.Predict("content -> b")]], KeepFirstWords())
        )


async def test_a_group_of_one_runs_alone_as_in_the_tutorial(mode: str) -> None:
    # (helper 94: the tutorial's merger was called on [[a, b], [final]]'s last group too, dropping
    # final's answer and writing content='')
    def final(content: str) -> dict[str, str]:
        return {"answer": f"final({content})"}

    p = ParallelPipeline([[Summary("a"), Summary("b")], [final]], TutorialMerger())
    result = await call(p, mode, content="x")
    assert result.content == "a(x)\nb(x)"
    assert result.answer == "final(a(x)\nb(x))"
