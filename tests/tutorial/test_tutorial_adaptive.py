"""Tutorial "Advanced Architectural Patterns" §2 "Adaptive Architecture": ``AdaptivePipeline``,
``PipelineAdapter``.

The tutorial's pipeline calls ``adapter.analyze_input(kwargs)`` and
``adapter.select_structure(input_analysis, component_pool)``, runs the chosen component names in
order, and returns ``result``, ``used_structure`` and ``input_analysis``. Its ``PipelineAdapter``
analyses the ``content`` input (``length`` in words, ``complexity`` 0..1, ``type``) and picks
``simple`` (short and simple), ``multi_approach`` (reasoning) or ``complex`` over the components
``processor_a``, ``preprocessor``, ``postprocessor``, ``processor_b``, ``aggregator``. An adapter
may be stageflow's ``PipelineAdapter``, a subclass of it, or any object with those two methods.
"""

from __future__ import annotations

import dspy

# ADAPTED: the tutorial's PipelineAdapter calls np.mean but its code block never imports numpy.
import numpy as np
import pytest

from stageflow import AdaptivePipeline, PipelineAdapter
from stageflow.testing import FakeLM, call


# User code: the component pool, with the tutorial's names. Each LM component rewrites `content`.
class Component(dspy.Module):
    def __init__(self, role):
        super().__init__()
        self.role = role
        self.rewrite = dspy.Predict("content, role -> revised")

    def forward(self, content):
        return dspy.Prediction(content=self.rewrite(content=content, role=self.role).revised)


def component_pool() -> dict[str, Component]:
    return {
        name: Component(name)
        for name in ("preprocessor", "processor_a", "processor_b", "aggregator", "postprocessor")
    }


def pool_lm() -> FakeLM:
    return FakeLM({"revised": lambda i: f"{i['role']}({i['content'][:8]})"})


# The tutorial's PipelineAdapter body, as written, on stageflow's PipelineAdapter.
class TutorialAdapter(PipelineAdapter):
    """Adapter for selecting optimal pipeline structure."""

    def __init__(self):
        super().__init__()
        self.structure_patterns = {
            "simple": ["processor_a"],
            "complex": ["preprocessor", "processor_a", "postprocessor"],
            "multi_approach": ["processor_a", "processor_b", "aggregator"],
        }

    def analyze_input(self, input_data):
        """Analyze input characteristics."""

        # Simple analysis based on input properties
        text = input_data.get("content", "")

        characteristics = {
            "length": len(text.split()),
            "complexity": self._compute_complexity(text),
            "type": self._classify_input_type(text),
        }

        return characteristics

    def select_structure(self, analysis, component_pool):
        """Select optimal structure based on analysis."""

        # Simple rule-based selection
        if analysis["length"] < 50 and analysis["complexity"] < 0.3:
            return self.structure_patterns["simple"]
        elif analysis["type"] == "complex_reasoning":  # noqa: RET505 (the tutorial, as written)
            return self.structure_patterns["multi_approach"]
        else:
            return self.structure_patterns["complex"]

    def _compute_complexity(self, text):
        """Simple complexity metric."""

        # Factors: sentence length, punctuation, nested structures
        avg_word_length = np.mean([len(word) for word in text.split()])
        punctuation_ratio = text.count(".") + text.count(",") + text.count(";")
        nested_indicators = text.count("(") + text.count("[")

        complexity = avg_word_length * 0.2 + punctuation_ratio * 0.3 + nested_indicators * 0.5
        return min(complexity / 10, 1.0)

    def _classify_input_type(self, text):
        """Classify input type."""

        text_lower = text.lower()

        if any(word in text_lower for word in ["why", "how", "explain", "analyze"]):
            return "complex_reasoning"
        elif "?" in text:  # noqa: RET505 (the tutorial, as written)
            return "question"
        else:
            return "statement"


SHORT = "Paris is in France"
WHY = "Why " + " ".join(["do rivers flow toward the sea"] * 9)  # 55 words, a reasoning question
LONG = " ".join(["rivers carry water and sediment downstream"] * 9)  # 54 words, a statement
# Complex enough (punctuation, brackets) to reach the type rule; 'Show' contains 'how'.
SHOW = "Show the figures (all), the tables [both], the notes (three), and the maps."

SIMPLE = ["processor_a"]
COMPLEX = ["preprocessor", "processor_a", "postprocessor"]
MULTI = ["processor_a", "processor_b", "aggregator"]


@pytest.mark.parametrize(
    ("content", "structure", "kind"),
    [(SHORT, SIMPLE, "statement"), (WHY, MULTI, "complex_reasoning"), (LONG, COMPLEX, "statement")],
    ids=["simple", "multi_approach", "complex"],
)
async def test_the_default_adapter_picks_and_runs_a_structure(
    mode: str, content: str, structure: list[str], kind: str
) -> None:
    lm = pool_lm()
    pipeline = AdaptivePipeline(component_pool(), PipelineAdapter())
    with dspy.context(lm=lm):
        result = await call(pipeline, mode, content=content)
    assert list(result.used_structure) == structure
    assert set(result.input_analysis) == {"length", "complexity", "type"}
    assert result.input_analysis["length"] == len(content.split())
    assert result.input_analysis["type"] == kind
    assert [inputs["role"] for _, inputs in lm.log] == structure  # the components ran in order
    assert result.result.content == result.content
    for detail in ("used_structure", "input_analysis", "result"):
        assert detail not in result
    assert list(pipeline.current_structure) == structure  # the tutorial's attribute: the latest call's


def test_the_adapters_methods_answer_as_in_the_tutorial() -> None:
    adapter = PipelineAdapter()
    analysis = adapter.analyze_input({"content": WHY})
    assert analysis["length"] == 55
    assert 0.0 <= analysis["complexity"] <= 1.0
    assert analysis["type"] == "complex_reasoning"
    assert list(adapter.select_structure(analysis, component_pool())) == MULTI
    assert adapter.structure_patterns == {"simple": SIMPLE, "complex": COMPLEX, "multi_approach": MULTI}
    tutorial = TutorialAdapter()
    assert tutorial.analyze_input({"content": WHY})["complexity"] == pytest.approx(analysis["complexity"])


async def test_a_subclass_with_the_tutorials_methods_is_the_one_called(mode: str) -> None:
    # The tutorial's substring test finds 'how' in 'Show': multi_approach. stageflow's own adapter
    # matches whole words and picks complex, so the structure tells which methods ran.
    lm = pool_lm()
    with dspy.context(lm=lm):
        ours = await call(AdaptivePipeline(component_pool(), TutorialAdapter()), mode, content=SHOW)
        default = await call(AdaptivePipeline(component_pool(), PipelineAdapter()), mode, content=SHOW)
    assert ours.input_analysis["type"] == "complex_reasoning"
    assert list(ours.used_structure) == MULTI
    assert list(default.used_structure) == COMPLEX


async def test_any_object_with_the_two_methods_is_an_adapter(mode: str) -> None:
    class ByLength:
        def analyze_input(self, input_data):
            return {"length": len(input_data.get("content", "").split())}

        def select_structure(self, analysis, component_pool):
            assert set(component_pool) == {
                "preprocessor",
                "processor_a",
                "processor_b",
                "aggregator",
                "postprocessor",
            }
            return ["processor_b"] if analysis["length"] < 10 else ["preprocessor", "processor_b"]

    lm = pool_lm()
    pipeline = AdaptivePipeline(component_pool(), ByLength())
    with dspy.context(lm=lm):
        short = await call(pipeline, mode, content=SHORT)
        long = await call(pipeline, mode, content=LONG)
    assert (short.used_structure, short.input_analysis) == (["processor_b"], {"length": 4})
    assert long.used_structure == ["preprocessor", "processor_b"]
    assert [inputs["role"] for _, inputs in lm.log] == ["processor_b", "preprocessor", "processor_b"]
