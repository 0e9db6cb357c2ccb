"""Tutorial §4 "Hierarchical Architecture": ``HierarchicalPipeline(structure)``.

The tutorial builds a structure from a dict of named nodes of type ``module`` (a saved program,
loaded with ``dspy.Module.load(config['module'])``), ``pipeline`` (``config['stages']``) and
``conditional``, and runs one node with ``forward(stage_name='root', **kwargs)``; an unknown node
name is an error. Its ``_build_pipeline``, ``_build_conditional`` and ``_execute_conditional`` are
not shown; stageflow's node formats fill them in (``stages``: node names or inline nodes;
``router`` + ``branches``).
"""

from __future__ import annotations

import dspy
import pytest

from stageflow import ConfigurationError, HierarchicalPipeline
from stageflow.testing import FakeLM, call


class Classify(dspy.Module):
    def __init__(self):
        super().__init__()
        self.classify = dspy.Predict("question -> kind")

    def forward(self, question):
        return dspy.Prediction(branch=self.classify(question=question).kind)


def structure() -> dict[str, dict[str, object]]:
    return {
        "root": {"type": "pipeline", "stages": ["route", "summarize"]},
        "route": {
            "type": "conditional",
            "router": Classify(),
            "branches": {
                "math": "solve",
                "chat": {"type": "module", "module": dspy.Predict("question -> answer")},
            },
        },
        "solve": {"type": "module", "module": dspy.ChainOfThought("question -> answer")},
        "summarize": {"type": "module", "module": dspy.Predict("answer -> summary")},
    }


def tree_lm(kind: str) -> FakeLM:
    return FakeLM(
        {"kind": kind, "answer": lambda i: f"{kind} answer", "summary": lambda i: f"summary of {i['answer']}"}
    )


@pytest.mark.parametrize("kind", ["math", "chat"])
async def test_the_structure_runs_from_root(mode: str, kind: str) -> None:
    lm = tree_lm(kind)
    pipeline = HierarchicalPipeline(structure())
    with dspy.context(lm=lm):
        result = await call(pipeline, mode, stage_name="root", question="What is 2+2?")
        default = await call(pipeline, mode, question="What is 2+2?")  # stage_name='root' is the default
    assert result.branch == kind
    assert result.summary == f"summary of {kind} answer"
    assert default.summary == result.summary
    route = result.details["nodes['root'].stages[0]"]["route_decision"]  # the nested branch, by path
    assert route.chosen == kind


async def test_stage_name_runs_one_node(mode: str) -> None:
    lm = tree_lm("chat")
    pipeline = HierarchicalPipeline(structure())
    with dspy.context(lm=lm):
        result = await call(pipeline, mode, stage_name="summarize", answer="forty-two")
    assert result.summary == "summary of forty-two"
    assert lm.calls == 1


async def test_an_unknown_stage_name_is_an_error(mode: str) -> None:
    pipeline = HierarchicalPipeline(structure())
    # The tutorial: ValueError(f"Unknown stage: {stage_name}"); stageflow's error lists the nodes.
    with pytest.raises(ConfigurationError) as info:
        await call(pipeline, mode, stage_name="nope", question="Q")
    assert "nope" in str(info.value)
    assert "summarize" in str(info.value)


def test_the_tutorials_module_loader_is_not_a_dspy_api(tmp_path) -> None:
    # Why the module nodes below are adapted: `dspy.Module.load` is an instance method that loads
    # state into an existing program; called on the class with a path it raises TypeError.
    program = dspy.ChainOfThought("question -> answer")
    program.save(str(tmp_path / "qa.json"))
    with pytest.raises(TypeError):
        dspy.Module.load(str(tmp_path / "qa.json"))


async def test_module_nodes_load_saved_programs(mode: str, tmp_path) -> None:
    saved = dspy.ChainOfThought("question -> answer")
    saved.predict.demos = [dspy.Example(question="1+1?", reasoning="add", answer="2")]
    saved.save(str(tmp_path / "qa.json"))  # state (JSON)
    saved.save(str(tmp_path / "qa_program"), save_program=True)  # the whole program (cloudpickle)

    # ADAPTED: the tutorial's `'module': <path>` node went through `dspy.Module.load(path)`, which
    # does not exist as a loader (above). A JSON state is loaded into a fresh program with 'state':
    by_state = {
        "root": {
            "type": "module",
            "module": dspy.ChainOfThought("question -> answer"),
            "state": str(tmp_path / "qa.json"),
        }
    }
    pipeline = HierarchicalPipeline(by_state)
    assert pipeline.nodes["root"].predict.demos[0]["answer"] == "2"
    with dspy.context(lm=tree_lm("math")):
        assert (await call(pipeline, mode, question="2+2?")).answer == "math answer"

    # A program saved whole is a pickle: it loads only when the caller opts in (unpickling runs code).
    by_path = {"root": {"type": "module", "module": str(tmp_path / "qa_program")}}
    with pytest.raises(ConfigurationError) as info:
        HierarchicalPipeline(by_path)
    assert "allow_pickle=True" in str(info.value)
    pipeline = HierarchicalPipeline(by_path, allow_pickle=True)
    with dspy.context(lm=tree_lm("math")):
        assert (await call(pipeline, mode, question="2+2?")).answer == "math answer"


def test_every_node_is_built_once_and_visible_to_optimizers() -> None:
    pipeline = HierarchicalPipeline(structure())
    names = [name for name, _ in pipeline.named_predictors()]
    assert len(names) == len(set(names)) == 4  # classify, solve, chat, summarize: each exactly once


def test_the_built_structure_is_an_attribute() -> None:
    pipeline = HierarchicalPipeline(structure())
    assert set(pipeline.structure) == {"root", "route", "solve", "summarize"}
