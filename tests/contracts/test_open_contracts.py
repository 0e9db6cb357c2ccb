"""Open contracts (issue 8): fields that only stages with undeclared outputs may produce are checked
at run time, at the boundary of the stage that reads them; everything stageflow can know is still
checked before any stage runs; ``strict`` restores refusal."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import (
    BranchingPipeline,
    ContractError,
    EnsemblePipeline,
    ForEach,
    IterativePipeline,
    ParallelPipeline,
    SequentialPipeline,
    Stage,
)
from stageflow.cli import main
from stageflow.testing import call


class Extract(dspy.Module):  # the issue's example: a hand-written forward, nothing declared
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, text: str) -> Any:
        self.calls += 1
        return dspy.Prediction(title=text.title(), words=len(text.split()))


class Shout(dspy.Module):
    def __init__(self, field: str = "title") -> None:
        super().__init__()
        self.field = field
        self.calls = 0

    def forward(self, **inputs: Any) -> Any:
        self.calls += 1
        return dspy.Prediction(loud=str(inputs[self.field]).upper())


class ShoutTitle(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, title: str) -> Any:
        self.calls += 1
        return dspy.Prediction(loud=title.upper())


class ShoutSubtitle(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, subtitle: str) -> Any:
        self.calls += 1
        return dspy.Prediction(loud=subtitle.upper())


@pytest.fixture(autouse=True)
def _not_strict() -> Iterator[None]:
    yield
    stageflow.configure(strict=False)


async def test_the_issue_example_runs(mode: str) -> None:
    result = await call(SequentialPipeline([Extract(), ShoutTitle()]), mode, text="hello world")
    assert (result.title, result.words, result.loud) == ("Hello World", 2, "HELLO WORLD")


async def test_a_field_never_produced_fails_before_the_needy_stage_runs(mode: str) -> None:
    needy = ShoutSubtitle()
    extract = Extract()
    pipeline = SequentialPipeline([extract, needy])
    with pytest.raises(ContractError) as info:
        await call(pipeline, mode, text="hello world")
    assert needy.calls == 0  # never ran on a missing input
    assert extract.calls == 1
    e = info.value
    assert (e.stage_path, e.field) == ("stages[1]", "subtitle")
    # The same shape as the static error: stage, field, what is available, the undeclared stage, the fix.
    assert "Stage 'stages[1]'" in e.message
    assert "'subtitle'" in e.message
    assert "stages[0]" in e.message
    assert "title" in e.message
    assert e.hint


def test_the_static_error_and_the_run_time_error_read_alike() -> None:
    static = SequentialPipeline(
        [stageflow.stage(lambda text: {"title": text}, writes=["title"]), ShoutSubtitle()]
    )
    with pytest.raises(ContractError) as s:
        static(text="x")
    dynamic = SequentialPipeline([Extract(), ShoutSubtitle()])
    with pytest.raises(ContractError) as d:
        dynamic(text="x")
    for e in (s.value, d.value):
        assert e.message.startswith("Stage 'stages[1]' (ShoutSubtitle) needs input 'subtitle'")
        assert e.field == "subtitle"


def test_what_stageflow_knows_is_still_refused_before_anything_runs() -> None:
    first = Extract()
    declared = Stage(first, writes=["title", "words"])  # now every upstream output is known
    needy = ShoutSubtitle()
    pipeline = SequentialPipeline([declared, needy])
    with pytest.raises(ContractError) as info:
        pipeline(text="x")
    assert first.calls == 0
    assert needy.calls == 0
    assert info.value.code == "missing_input"


def test_check_reports_deferred_reads_as_warnings() -> None:
    result = SequentialPipeline([Extract(), ShoutTitle()]).check(["text"])
    assert [(d.stage, d.field, d.candidates) for d in result.deferred] == [
        ("stages[1]", "title", ("stages[0]",))
    ]
    assert len(result.warnings) == 1
    assert "'stages[1]' reads 'title'" in result.warnings[0]
    assert "'stages[0]'" in result.warnings[0]
    assert "writes=['title'" in result.warnings[0]


def test_a_fully_declared_pipeline_has_no_warnings() -> None:
    pipeline = SequentialPipeline([Stage(Extract(), writes=["title", "words"]), ShoutTitle()])
    assert pipeline.check(["text"]).warnings == []


@pytest.mark.parametrize("how", ["pipeline", "configure"])
async def test_strict_refuses_before_any_stage_runs(how: str, mode: str) -> None:
    first = Extract()
    if how == "pipeline":
        pipeline = SequentialPipeline([first, ShoutTitle()], strict=True)
    else:
        stageflow.configure(strict=True)
        pipeline = SequentialPipeline([first, ShoutTitle()])
    with pytest.raises(ContractError) as info:
        await call(pipeline, mode, text="x")
    assert first.calls == 0
    assert "Strict contracts are on" in info.value.message
    assert "writes=['title']" in info.value.message


def test_a_pipeline_may_opt_out_of_global_strictness() -> None:
    stageflow.configure(strict=True)
    assert SequentialPipeline([Extract(), ShoutTitle()], strict=False)(text="a b").loud == "A B"


# -- everywhere a field flows ------------------------------------------------------------------------


class TaskRouter(dspy.Module):  # the tutorial's router shape: returns branch and task_type
    def forward(self, question: str) -> Any:
        kind = "math" if any(ch.isdigit() for ch in question) else "prose"
        return dspy.Prediction(branch=kind, task_type=f"{kind} question")


class Describe(dspy.Module):
    def forward(self, question: str, task_type: str) -> Any:
        return dspy.Prediction(answer=f"{task_type}: {question}")


async def test_branches_read_fields_the_router_returned(mode: str) -> None:
    pipeline = BranchingPipeline(
        router_stage=TaskRouter(), branches={"math": Describe(), "prose": Describe()}
    )
    assert (await call(pipeline, mode, question="2+2")).answer == "math question: 2+2"


class Improve(dspy.Module):
    def forward(self, draft: str) -> Any:
        return dspy.Prediction(draft=draft + "!", quality_score=len(draft) / 10, improvement=0.1)


async def test_a_stopping_condition_reads_fields_of_undeclared_stages(mode: str) -> None:
    pipeline = IterativePipeline(
        [Improve()], stageflow.QualityBasedStopping(quality_threshold=0.5), max_iterations=10
    )
    result = await call(pipeline, mode, draft="abc")
    assert result.draft == "abc!!!"  # scores 0.3, 0.4, 0.5: the third reaches the threshold
    assert result.converged


async def test_foreach_collects_an_undeclared_field_by_name(mode: str) -> None:
    pipeline = SequentialPipeline(
        [
            ForEach(Extract(), over="texts", item="text", collect={"title": "titles"}),
            stageflow.stage(lambda titles: {"n": len(titles)}, writes=["n"]),
        ]
    )
    result = await call(pipeline, mode, texts=["a b", "c"])
    assert (result.titles, result.n) == (["A B", "C"], 2)


async def test_parallel_groups_of_undeclared_stages_feed_later_stages(mode: str) -> None:
    class Count(dspy.Module):
        def forward(self, text: str) -> Any:
            return dspy.Prediction(count=len(text))

    pipeline = SequentialPipeline([ParallelPipeline([[Extract(), Count()]]), ShoutTitle()])
    result = await call(pipeline, mode, text="ab cd")
    assert (result.loud, result.count) == ("AB CD", 5)


async def test_an_ensemble_of_undeclared_members_aggregates(mode: str) -> None:
    class Member(dspy.Module):
        def __init__(self, answer: str, confidence: float) -> None:
            super().__init__()
            self.answer, self.confidence = answer, confidence

        def forward(self, question: str) -> Any:
            return dspy.Prediction(answer=self.answer, confidence=self.confidence)

    pipeline = SequentialPipeline(
        [EnsemblePipeline([Member("yes", 0.9), Member("no", 0.4), Member("yes", 0.5)]), Shout("answer")]
    )
    assert (await call(pipeline, mode, question="q")).loud == "YES"


async def test_a_nested_pipeline_with_undeclared_stages_feeds_the_outer_one(mode: str) -> None:
    inner = SequentialPipeline([Extract()])
    needy = ShoutTitle()
    outer = SequentialPipeline([inner, needy])
    assert (await call(outer, mode, text="x y")).loud == "X Y"
    missing = SequentialPipeline([SequentialPipeline([Extract()]), ShoutSubtitle()])
    with pytest.raises(ContractError) as info:
        await call(missing, mode, text="x")
    assert info.value.field == "subtitle"


# -- stageflow validate -------------------------------------------------------------------------------


def test_validate_prints_deferred_reads_as_warnings_and_strict_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "open_mods.py").write_text(
        textwrap.dedent(
            """
            import dspy
            class Extract(dspy.Module):
                def forward(self, text):
                    return dspy.Prediction(title=text.title())
            class Shout(dspy.Module):
                def forward(self, title):
                    return dspy.Prediction(loud=title.upper())
            """
        ),
        encoding="utf-8",
    )
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "version: 1\ninputs: [text]\nnodes:\n  root:\n    type: pipeline\n    stages:\n"
        "    - component: open_mods:Extract\n    - component: open_mods:Shout\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "open_mods", raising=False)
    assert main(["validate", str(spec), "--allow-module", "open_mods"]) == 0
    out = capsys.readouterr().out
    assert "warning: 'stages[1]' reads 'title', which only 'stages[0]'" in out
    assert "1 field(s) are checked when the pipeline runs" in out
    assert main(["validate", str(spec), "--allow-module", "open_mods", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "Strict contracts are on" in err
