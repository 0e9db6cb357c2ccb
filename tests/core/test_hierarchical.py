"""HierarchicalPipeline: nodes by name and inline, shared nodes, errors, checks, saved programs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dspy
import pytest

from stageflow import (
    BranchingPipeline,
    ConfigurationError,
    ContractError,
    HierarchicalPipeline,
    IterativePipeline,
    SequentialPipeline,
    Stage,
    stage,
)
from stageflow.testing import FakeLM, call


def lm() -> FakeLM:
    return FakeLM(
        {
            "draft": lambda i: "draft:" + i["question"],
            "answer": lambda i: "answer:" + i.get("draft", i["question"]),
        }
    )


def structure() -> tuple[dict[str, Any], dict[str, Any]]:
    drafter = dspy.Predict("question -> draft")
    writer = dspy.Predict("question, draft -> answer")
    chat = dspy.Predict("question -> answer")

    @stage(writes=["quality_score"])
    def score(answer: str) -> dict[str, float]:
        return {"quality_score": 1.0 if answer.startswith("answer:") else 0.0}

    struct: dict[str, Any] = {
        "root": {"type": "pipeline", "stages": ["classify", "respond"]},
        "classify": {
            "type": "module",
            "module": lambda question: "math" if any(c.isdigit() for c in question) else "chat",
            "writes": ["branch"],
        },
        "respond": {
            "type": "conditional",
            "router": lambda branch: branch,
            "branches": {"math": "solve", "chat": {"type": "module", "module": chat}},
        },
        "solve": {"type": "pipeline", "stages": ["drafter", {"type": "module", "module": writer}, "polish"]},
        "drafter": {"type": "module", "module": drafter},
        "polish": {
            "type": "iterative",
            "stages": ["drafter", score],
            "stopping_condition": lambda s: s["quality_score"] >= 1.0,
            "max_iterations": 3,
        },
    }
    return struct, {"drafter": drafter, "writer": writer, "chat": chat}


def test_node_types_are_built() -> None:
    struct, _ = structure()
    h = HierarchicalPipeline(struct)
    assert isinstance(h.nodes["root"], SequentialPipeline)
    assert isinstance(h.nodes["respond"], BranchingPipeline)
    assert isinstance(h.nodes["polish"], IterativePipeline)
    assert isinstance(h.nodes["classify"], Stage)
    assert list(h.nodes) == list(struct)


def test_named_node_is_shared_and_built_once() -> None:
    struct, mods = structure()
    h = HierarchicalPipeline(struct)
    assert h.nodes["drafter"] is mods["drafter"]
    assert h.nodes["solve"].stages[0] is h.nodes["drafter"]
    assert h.nodes["polish"].stages[0] is h.nodes["drafter"]
    assert h.nodes["respond"].branches["math"] is h.nodes["solve"]
    assert h.nodes["root"].stages[1] is h.nodes["respond"]


def test_each_predictor_listed_exactly_once() -> None:
    struct, mods = structure()
    h = HierarchicalPipeline(struct)
    named = h.named_predictors()
    ids = [id(p) for _, p in named]
    assert len(ids) == len(set(ids)) == 3
    assert {id(m) for m in mods.values()} == set(ids)
    assert [n for n, _ in named] == [
        "nodes['root'].stages[1].branches['math'].stages[0]",
        "nodes['root'].stages[1].branches['math'].stages[1]",
        "nodes['root'].stages[1].branches['chat']",
    ]
    # Stable: a second build of the same structure names them the same way.
    assert [n for n, _ in HierarchicalPipeline(structure()[0]).named_predictors()] == [n for n, _ in named]


async def test_runs_root_through_all_node_types(mode: str) -> None:
    fake = lm()
    h = HierarchicalPipeline(structure()[0])
    with dspy.context(lm=fake):
        math = await call(h, mode, question="1+1")
        chat = await call(h, mode, question="hello")
    assert math.branch == "math"
    assert math.draft == "draft:1+1"
    assert math.answer == "answer:draft:1+1"
    assert math.quality_score == 1.0
    assert chat.branch == "chat"
    assert chat.answer == "answer:hello"
    assert "draft" not in list(chat.keys())
    paths = [r.path for r in math.trace]
    assert "nodes['root'].stages[1].branches['math'].stages[2].stages[0]" in paths
    assert paths[0] == "nodes['root']"
    # drafter twice (solve + polish), writer once, chat once
    assert fake.calls == 4


async def test_stage_name_picks_a_node(mode: str) -> None:
    fake = lm()
    h = HierarchicalPipeline(structure()[0])
    with dspy.context(lm=fake):
        result = await call(h, mode, stage_name="drafter", question="Q")
    assert result.toDict() == {"question": "Q", "draft": "draft:Q"}
    assert [r.path for r in result.trace] == ["nodes['drafter']"]
    assert fake.calls == 1


async def test_unknown_stage_name(mode: str) -> None:
    h = HierarchicalPipeline(structure()[0])
    with pytest.raises(ConfigurationError) as ei:
        await call(h, mode, stage_name="nope", question="Q")
    assert ei.value.code == "unknown_node"
    assert "'nope'" in str(ei.value)
    assert "'drafter'" in str(ei.value)


def test_inputs_checked_at_construction() -> None:
    struct, _ = structure()
    fake = lm()
    with dspy.context(lm=fake):
        h = HierarchicalPipeline(struct, inputs=["question"])
    assert h.check(["question"]) == ("answer", "branch", "question")
    assert fake.calls == 0


def test_missing_input_raises_at_construction() -> None:
    fake = lm()
    with dspy.context(lm=fake), pytest.raises(ContractError) as ei:
        HierarchicalPipeline(
            {
                "root": {
                    "type": "pipeline",
                    "stages": [{"type": "module", "module": dspy.Predict("context -> answer")}],
                }
            },
            inputs=["question"],
        )
    assert ei.value.field == "context"
    assert ei.value.code == "missing_input"
    assert "nodes['root']" in str(ei.value)
    assert fake.calls == 0


def test_check_per_node() -> None:
    h = HierarchicalPipeline(structure()[0])
    assert h.check(["question"], "drafter") == ("draft", "question")
    with pytest.raises(ContractError):
        h.check([], "drafter")


@pytest.mark.parametrize(
    ("struct", "code", "text"),
    [
        ({"root": {"type": "pipeline", "stages": ["missing"]}}, "unknown_node", "'missing'"),
        (
            {"root": {"type": "pipeline", "stages": ["a"]}, "a": {"type": "pipeline", "stages": ["root"]}},
            "cycle",
            "root -> a -> root",
        ),
        ({"root": {"type": "pipeline", "stages": ["root"]}}, "cycle", "root -> root"),
        ({"root": 42}, "not_a_stage", "42"),
        ({"root": {"type": "weird"}}, "bad_node", "'weird'"),
        ({"root": {"stages": []}}, "bad_node", "None"),
        ({"root": {"type": "module"}}, "bad_node", "'module'"),
        ({"root": {"type": "pipeline", "stages": []}}, "bad_node", "'stages'"),
        ({"root": {"type": "conditional", "branches": {"a": "x"}}}, "bad_node", "'router'"),
        ({}, "bad_structure", "non-empty"),
    ],
)
def test_bad_structures_are_configuration_errors(struct: dict[str, Any], code: str, text: str) -> None:
    with pytest.raises(ConfigurationError) as ei:
        HierarchicalPipeline(struct)
    assert ei.value.code == code
    assert text in str(ei.value)


def test_iterative_node_without_condition_is_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        HierarchicalPipeline({"root": {"type": "iterative", "stages": [lambda x: {"y": x}]}})
    assert ei.value.field == "stopping_condition"


def test_module_node_with_renames() -> None:
    fake = FakeLM({"answer": lambda i: i["question"].upper()})
    h = HierarchicalPipeline(
        {
            "root": {
                "type": "module",
                "module": dspy.Predict("question -> answer"),
                "inputs": {"question": "query"},
                "outputs": {"answer": "reply"},
            },
        }
    )
    with dspy.context(lm=fake):
        assert h(query="hi").toDict() == {"query": "hi", "reply": "HI"}


async def test_module_node_from_saved_program(tmp_path: Path, mode: str) -> None:
    prog = dspy.Predict("question -> answer")
    prog.demos = [dspy.Example(question="q0", answer="a0")]
    prog.save(str(tmp_path / "prog"), save_program=True)
    h = HierarchicalPipeline(
        {
            "root": {"type": "pipeline", "stages": ["saved"]},
            "saved": {"type": "module", "module": str(tmp_path / "prog")},
        },
        allow_pickle=True,  # a save_program=True directory is a cloudpickle file: opt-in only
    )
    loaded = h.nodes["saved"]
    assert isinstance(loaded, dspy.Predict)
    assert loaded is not prog
    assert len(loaded.demos) == 1
    assert [n for n, _ in h.named_predictors()] == ["nodes['root'].stages[0]"]
    fake = FakeLM({"answer": "from saved"})
    with dspy.context(lm=fake):
        result = await call(h, mode, question="Q")
    assert result.answer == "from saved"
    assert fake.calls == 1


def test_module_node_with_missing_saved_program(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as ei:
        HierarchicalPipeline({"root": {"type": "module", "module": str(tmp_path / "nothing")}})
    assert ei.value.code == "missing_program"


async def test_conditional_node_with_default_name(mode: str) -> None:
    h = HierarchicalPipeline(
        {
            "root": {
                "type": "conditional",
                "router": lambda q: "unknown",
                "default": "b",
                "branches": {"a": stage(lambda q: 1, writes=["v"]), "b": stage(lambda q: 2, writes=["v"])},
            },
        }
    )
    result = await call(h, mode, q="x")
    assert result.v == 2
    assert result.branch == "b"


async def test_iterative_node_options(mode: str) -> None:
    h = HierarchicalPipeline(
        {
            "root": {
                "type": "iterative",
                "stages": [stage(lambda n=0: n + 1, writes=["n"])],
                "stopping_condition": lambda s: False,
                "max_iterations": 2,
            },
        }
    )
    assert (await call(h, mode)).n == 2


def test_positional_call_is_configuration_error() -> None:
    h = HierarchicalPipeline(structure()[0])
    with pytest.raises(ConfigurationError) as ei:
        h("Q")
    assert ei.value.code == "positional_args"
