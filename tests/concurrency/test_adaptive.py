"""AdaptivePipeline: the tutorial's adapter protocol, structures built once, the pool visible once."""

from __future__ import annotations

from collections.abc import Mapping
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
WHY_Q = "Why, and how, does the sky (at noon) look blue, while [at dusk] it looks red, orange, or pink?"
LONG_STATEMENT = "The committee, after long debate; (with [many] amendments), passed the budget. " * 3


def tutorial_pool(log: list[str]) -> dict[str, Any]:
    """Components named as in the tutorial; each appends its name and passes ``content`` on."""

    def component(name: str) -> Any:
        def run(content: str) -> dict[str, str]:
            log.append(name)
            return {"content": f"{content}|{name}"}

        return stageflow.stage(run, writes=["content"], name=name)

    names = ["processor_a", "preprocessor", "postprocessor", "processor_b", "aggregator"]
    return {n: component(n) for n in names}


def pool() -> dict[str, Any]:
    return {
        "direct": dspy.Predict("question -> answer"),
        "reasoned": dspy.ChainOfThought("question -> answer"),
    }


def module_ids(p: dspy.Module) -> list[int]:
    return [id(m) for _, m in p.named_sub_modules()]


# -- the tutorial's default adapter ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "name", "order"),
    [
        (SIMPLE_Q, "simple", ["processor_a"]),
        (WHY_Q, "multi_approach", ["processor_a", "processor_b", "aggregator"]),
        (LONG_STATEMENT, "complex", ["preprocessor", "processor_a", "postprocessor"]),
    ],
)
async def test_the_default_adapter_follows_the_tutorials_rules(
    mode: str, content: str, name: str, order: list[str]
) -> None:
    log: list[str] = []
    p = AdaptivePipeline(tutorial_pool(log), PipelineAdapter())
    result = await call(p, mode, content=content)
    assert log == order
    assert result.structure_name == name
    assert result.used_structure == order
    assert set(result.input_analysis) == {"length", "complexity", "type"}
    assert result.content == content + "".join(f"|{n}" for n in order)


def test_analysis_matches_the_tutorial() -> None:
    a = PipelineAdapter()
    assert a.analyze_input({"content": "Why is the sky blue?"}) == {
        "length": 5,
        "complexity": pytest.approx((3.2 * 0.2) / 10),
        "type": "complex_reasoning",
    }
    assert a.analyze_input({"content": "Is it raining?"})["type"] == "question"
    assert a.analyze_input({"content": "It rains."})["type"] == "statement"
    assert a.analyze_input({})["length"] == 0
    assert a.analyze_input({"question": "How?"})["type"] == "complex_reasoning"


async def test_a_subclass_overriding_the_two_methods_is_used(mode: str) -> None:
    seen: list[Any] = []

    class ByLength(PipelineAdapter):
        def analyze_input(self, input_data: Mapping[str, Any]) -> dict[str, Any]:
            seen.append(dict(input_data))
            return {"words": len(str(input_data["content"]).split())}

        def select_structure(self, analysis: Mapping[str, Any], component_pool: Mapping[str, Any]) -> Any:
            seen.append(sorted(component_pool))
            return ["processor_b"] if analysis["words"] > 3 else ["processor_a", "aggregator"]

    log: list[str] = []
    p = AdaptivePipeline(tutorial_pool(log), ByLength())
    short = await call(p, mode, content="hi there")
    long = await call(p, mode, content="one two three four five")
    assert log == ["processor_a", "aggregator", "processor_b"]
    assert short.used_structure == ["processor_a", "aggregator"]
    assert long.used_structure == ["processor_b"]
    assert seen[0] == {"content": "hi there"}
    assert seen[1] == ["aggregator", "postprocessor", "preprocessor", "processor_a", "processor_b"]


async def test_any_object_with_the_two_methods_is_an_adapter(mode: str) -> None:
    class Duck:
        def analyze_input(self, input_data: Mapping[str, Any]) -> dict[str, Any]:
            return {"ask": "?" in input_data["content"]}

        def select_structure(self, analysis: Mapping[str, Any], component_pool: Mapping[str, Any]) -> Any:
            return {"ensemble": ["processor_a", "processor_b"]} if analysis["ask"] else ["aggregator"]

    log: list[str] = []
    p = AdaptivePipeline(tutorial_pool(log), Duck())
    assert (await call(p, mode, content="x")).used_structure == ["aggregator"]
    both = await call(p, mode, content="x?")
    assert sorted(log[1:]) == ["processor_a", "processor_b"]
    assert both.structure_name == "ensemble(processor_a,processor_b)"


async def test_dynamic_structures_are_built_once_and_reused(mode: str) -> None:
    class Fixed:
        def analyze_input(self, input_data: Mapping[str, Any]) -> dict[str, Any]:
            return {}

        def select_structure(self, analysis: Mapping[str, Any], component_pool: Mapping[str, Any]) -> Any:
            return ["processor_b", "aggregator"]

    p = AdaptivePipeline(tutorial_pool([]), Fixed())
    await call(p, mode, content="a")
    first = p.structures["processor_b+aggregator"]
    await call(p, mode, content="b")
    assert p.structures["processor_b+aggregator"] is first


async def test_an_unknown_component_from_a_custom_adapter_is_a_routing_error(mode: str) -> None:
    class Wrong:
        def analyze_input(self, input_data: Mapping[str, Any]) -> dict[str, Any]:
            return {}

        def select_structure(self, analysis: Mapping[str, Any], component_pool: Mapping[str, Any]) -> Any:
            return "nope"

    p = AdaptivePipeline(tutorial_pool([]), Wrong())
    with pytest.raises(RoutingError):
        await call(p, mode, content="a")


# -- another pool with the default adapter ------------------------------------------------------------


def test_default_structures_over_another_pool_are_derived_from_it() -> None:
    components = pool()
    p = AdaptivePipeline(components)
    structures = p.structures
    assert isinstance(structures["simple"], SequentialPipeline)
    assert structures["simple"].stages == [components["direct"]]
    assert structures["complex"].stages == [components["direct"], components["reasoned"]]
    assert isinstance(structures["multi_approach"], EnsemblePipeline)
    assert structures["multi_approach"].processors == [components["direct"], components["reasoned"]]


async def test_default_adapter_over_another_pool_runs(mode: str) -> None:
    model = FakeLM({"answer": "A", "reasoning": "because"})
    p = AdaptivePipeline(pool())
    with dspy.context(lm=model):
        result = await call(p, mode, question=SIMPLE_Q)
    assert result.structure_name == "simple"
    assert result.answer == "A"
    assert model.calls == 1


def test_every_pool_component_appears_exactly_once_in_named_predictors() -> None:
    p = AdaptivePipeline(pool())
    names = [n for n, _ in p.named_predictors()]
    assert names == ["components['direct']", "components['reasoned'].predict"]
    assert len(set(module_ids(p))) == len(module_ids(p))


def test_custom_patterns_naming_an_unknown_component_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        AdaptivePipeline(pool(), PipelineAdapter({"simple": ["missing"]}))
    assert ei.value.code == "unknown_component"


async def test_choose_replaces_the_rules(mode: str) -> None:
    model = FakeLM({"answer": "A", "reasoning": "because"})
    adapter = PipelineAdapter({"fast": ["direct"], "both": ["direct", "reasoned"]}, choose=lambda a: "both")
    p = AdaptivePipeline(pool(), adapter)
    with dspy.context(lm=model):
        result = await call(p, mode, question="q")
    assert result.structure_name == "both"
    assert model.calls == 2


# -- an LM stage as the adapter ------------------------------------------------------------------------


async def test_lm_adapter_stage_chooses_the_structure(mode: str) -> None:
    model = FakeLM({"structure": "careful", "answer": "A", "reasoning": "r"})
    p = AdaptivePipeline(
        pool(),
        dspy.Predict("question -> structure"),
        structures={"quick": ["direct"], "careful": ["direct", "reasoned"]},
    )
    with dspy.context(lm=model):
        result = await call(p, mode, question="q")
    assert result.used_structure == "careful"
    assert result.structure_name == "careful"
    assert model.calls == 3


def test_lm_adapter_without_structures_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        AdaptivePipeline(pool(), dspy.Predict("question -> structure"))
    assert ei.value.field == "structures"


async def test_unknown_structure_from_an_lm_adapter_is_a_routing_error(mode: str) -> None:
    model = FakeLM({"structure": "nonsense", "answer": "A"})
    p = AdaptivePipeline(pool(), dspy.Predict("question -> structure"), structures={"quick": ["direct"]})
    with dspy.context(lm=model), pytest.raises(RoutingError):
        await call(p, mode, question="q")


async def test_adaptive_nested_in_a_pipeline(mode: str) -> None:
    model = FakeLM({"answer": "A", "reasoning": "r", "summary": "S"})
    p = SequentialPipeline([AdaptivePipeline(pool()), dspy.Predict("question, answer -> summary")])
    with dspy.context(lm=model):
        result = await call(p, mode, question=SIMPLE_Q)
    assert result.summary == "S"
    assert result.details["stages[0]"]["structure_name"] == "simple"
