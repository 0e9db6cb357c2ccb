"""AdaptivePipeline: the default adapter, structures built once, the pool visible once, LM adapters."""

from __future__ import annotations

from collections import Counter
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import (
    AdaptivePipeline,
    ConfigurationError,
    EnsemblePipeline,
    PipelineAdapter,
    RoutingError,
    SequentialPipeline,
)
from stageflow.testing import FakeLM, call

SIMPLE_Q = "What is the capital of France?"
COMPARE_Q = "Compare Python versus Java for web servers"
COMPLEX_Q = (
    "Why does the sky look blue during the day, and why does it turn red at sunset, while the moon "
    "stays white, if the air is clean?"
)


def pool() -> dict[str, Any]:
    return {
        "direct": dspy.Predict("question -> answer"),
        "reasoned": dspy.ChainOfThought("question -> answer"),
    }


def lm() -> FakeLM:
    return FakeLM({"answer": "A", "reasoning": "because"})


def module_ids(p: dspy.Module) -> list[int]:
    return [id(m) for _, m in p.named_sub_modules()]


# -- the default adapter ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "structure", "qtype", "calls"),
    [
        (SIMPLE_Q, "simple", "factual", 1),
        (COMPARE_Q, "multi_approach", "comparison", 2),
        (COMPLEX_Q, "complex", "explanation", 2),
    ],
)
async def test_default_adapter_chooses_by_question(
    mode: str, question: str, structure: str, qtype: str, calls: int
) -> None:
    model = lm()
    p = AdaptivePipeline(pool())
    with dspy.context(lm=model):
        result = await call(p, mode, question=question)
    assert result.used_structure == structure
    assert result.input_analysis["question_type"] == qtype
    assert result.input_analysis["length"] == len(question.split())
    assert 0.0 <= result.input_analysis["complexity"] <= 1.0
    assert result.answer == "A"
    assert model.calls == calls
    assert result.trace[0].path == f"structures['{structure}']"


def test_default_structures_are_built_from_the_pool_objects() -> None:
    components = pool()
    p = AdaptivePipeline(components)
    assert set(p.structures) == {"simple", "complex", "multi_approach"}
    simple, complex_, multi = p.structures["simple"], p.structures["complex"], p.structures["multi_approach"]
    assert isinstance(simple, SequentialPipeline)
    assert isinstance(complex_, SequentialPipeline)
    assert isinstance(multi, EnsemblePipeline)
    assert simple.stages == [components["direct"]]
    assert all(a is b for a, b in zip(complex_.stages, components.values(), strict=True))
    assert all(a is b for a, b in zip(multi.processors, components.values(), strict=True))


def test_analysis_scores_complexity() -> None:
    adapter = PipelineAdapter()
    short, long = adapter.analyze(SIMPLE_Q), adapter.analyze(COMPLEX_Q)
    assert short["complexity"] < adapter.complexity_threshold <= long["complexity"]
    assert adapter.analyze("How many moons does Mars have?")["question_type"] == "calculation"


# -- built once, visible once -----------------------------------------------------------------------


async def test_structures_are_built_once_and_reused(mode: str) -> None:
    p = AdaptivePipeline(pool())
    structures = dict(p.structures)
    modules = module_ids(p)
    predictors = [(n, id(x)) for n, x in p.named_predictors()]
    model = lm()
    with dspy.context(lm=model, trace=[]):
        for q in (SIMPLE_Q, COMPARE_Q, COMPLEX_Q, SIMPLE_Q, COMPARE_Q):
            await call(p, mode, question=q)
        traced = {id(pred) for pred, _, _ in dspy.settings.trace}
    assert all(p.structures[name] is s for name, s in structures.items())
    assert set(p.structures) == set(structures)
    assert module_ids(p) == modules  # no module appeared
    assert [(n, id(x)) for n, x in p.named_predictors()] == predictors
    assert traced == {id(x) for _, x in p.named_predictors()}  # only the pool's predictors ran


def test_every_pool_component_appears_exactly_once_in_named_predictors() -> None:
    components = pool()
    p = AdaptivePipeline(components)
    named = p.named_predictors()
    assert [n for n, _ in named] == ["components['direct']", "components['reasoned'].predict"]
    counts = Counter(id(x) for _, x in named)
    assert all(c == 1 for c in counts.values())
    assert {id(x) for _, x in named} == {id(components["direct"]), id(components["reasoned"].predict)}


# -- custom structures and adapters ------------------------------------------------------------------------


async def test_custom_structures_and_choose(mode: str) -> None:
    model = FakeLM({"answer": "A", "reasoning": "r", "summary": "S"})
    components = {**pool(), "summarize": dspy.Predict("question, answer -> summary")}
    adapter = PipelineAdapter(
        structures={
            "fast": ["direct"],
            "vote": {"ensemble": ["direct", "reasoned"]},
            "full": ["direct", "summarize"],
        },
        choose=lambda a: (
            "full" if a["question_type"] == "explanation" else ("vote" if a["length"] > 5 else "fast")
        ),
    )
    p = AdaptivePipeline(components, adapter)
    assert set(p.structures) == {"fast", "vote", "full"}
    with dspy.context(lm=model):
        fast = await call(p, mode, question="Capital of France?")
        vote = await call(p, mode, question="What is the capital city of France?")
        full = await call(p, mode, question="Why is the sky blue?")
    assert (fast.used_structure, vote.used_structure, full.used_structure) == ("fast", "vote", "full")
    assert full.summary == "S"
    assert "summary" not in fast
    assert model.calls == 1 + 2 + 2
    assert len(p.named_predictors()) == 3


def test_structure_naming_an_unknown_component_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        AdaptivePipeline(pool(), PipelineAdapter(structures={"x": ["direct", "missing"]}))
    assert ei.value.code == "unknown_component"


async def test_lm_adapter_stage_chooses_the_structure(mode: str) -> None:
    model = FakeLM(
        {
            "structure": lambda i: "deep" if "deep" in i["question"] else "quick",
            "answer": "A",
            "reasoning": "r",
        }
    )
    selector = dspy.Predict("question -> structure: Literal['quick', 'deep']")
    p = AdaptivePipeline(pool(), selector, structures={"quick": ["direct"], "deep": ["direct", "reasoned"]})
    assert [n for n, _ in p.named_predictors()] == [
        "components['direct']",
        "components['reasoned'].predict",
        "adapter_stage",
    ]
    with dspy.context(lm=model):
        quick = await call(p, mode, question="go")
        deep = await call(p, mode, question="go deep")
    assert quick.used_structure == "quick"
    assert deep.used_structure == "deep"
    assert deep.structure == "deep"
    assert deep.input_analysis == {"structure": "deep"}
    assert model.calls == (1 + 1) + (1 + 2)
    assert [outputs for outputs, _ in model.log][:2] == [("structure",), ("answer",)]


def test_lm_adapter_without_structures_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        AdaptivePipeline(pool(), dspy.Predict("question -> structure"))
    assert ei.value.field == "structures"


async def test_unknown_structure_from_an_lm_adapter_is_a_routing_error(mode: str) -> None:
    model = FakeLM({"structure": "sideways", "answer": "A"})
    p = AdaptivePipeline(pool(), dspy.Predict("question -> structure"), structures={"quick": ["direct"]})
    with dspy.context(lm=model), pytest.raises(RoutingError) as ei:
        await call(p, mode, question="q")
    assert ei.value.code == "unknown_structure"
    assert "sideways" in str(ei.value)
    assert model.calls == 1  # only the adapter ran


async def test_unknown_structure_from_choose_is_a_routing_error(mode: str) -> None:
    model = lm()
    p = AdaptivePipeline(pool(), PipelineAdapter(choose=lambda a: "bespoke"))
    with dspy.context(lm=model), pytest.raises(RoutingError) as ei:
        await call(p, mode, question="q")
    assert ei.value.field == "structure"
    assert model.calls == 0


async def test_adaptive_nested_in_a_pipeline(mode: str) -> None:
    model = lm()
    p = SequentialPipeline(
        [
            stageflow.stage(lambda topic: {"question": f"What is {topic}?"}, writes=["question"]),
            AdaptivePipeline(pool()),
        ]
    )
    with dspy.context(lm=model):
        result = await call(p, mode, topic="Paris")
    assert result.answer == "A"
    assert "stages[1].structures['simple'].stages[0]" in [r.path for r in result.trace]
