"""Issue 9: ``HierarchicalPipeline`` loads saved programs as JSON state; pickles need an explicit opt-in.

A program saved with ``save_program=True`` is a cloudpickle file: loading it runs whatever code it
holds. A ``module`` node given such a path is refused unless the caller passes ``allow_pickle=True``;
the safe form is a JSON state file loaded into a module (or class) the caller provides.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import dspy
import pytest

from stageflow import HierarchicalPipeline
from stageflow.errors import ConfigurationError
from stageflow.testing import FakeLM, call

MARK: list[str] = []


def mark(what: str) -> None:
    MARK.append(what)


class _Payload:
    """Unpickling this calls mark(): it stands for arbitrary code in a crafted program.pkl."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (mark, ("unpickled",))


def _crafted_program_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "program"
    dspy.Predict("question -> answer").save(str(folder), save_program=True)
    (folder / "program.pkl").write_bytes(pickle.dumps(_Payload()))
    return folder


def test_a_pickled_program_is_refused_without_opt_in(tmp_path: Path) -> None:
    folder = _crafted_program_dir(tmp_path)
    MARK.clear()
    with pytest.raises(ConfigurationError) as info:
        HierarchicalPipeline({"root": {"type": "module", "module": str(folder)}})
    err = info.value
    assert err.code == "pickle_not_allowed"
    assert "allow_pickle=True" in str(err)
    assert "state" in str(err)
    assert MARK == [], "the pickle was loaded"
    with pytest.raises(ConfigurationError) as info:  # opting in loads it (and runs what it holds)
        HierarchicalPipeline({"root": {"type": "module", "module": str(folder)}}, allow_pickle=True)
    assert MARK == ["unpickled"]
    assert info.value.code == "bad_program"  # what it unpickled to is not a module


class QA(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.predict(question=question)


@pytest.mark.parametrize("given", ["object", "class"])
async def test_a_json_state_loads_into_the_given_module(tmp_path: Path, mode: str, given: str) -> None:
    trained = QA()
    trained.predict.demos = [dspy.Example(question="q0", answer="a0")]
    trained.save(str(tmp_path / "qa.json"))
    blank = QA()
    node = {
        "type": "module",
        "module": blank if given == "object" else QA,
        "state": str(tmp_path / "qa.json"),
    }
    h = HierarchicalPipeline({"root": node})
    loaded = h.nodes["root"]
    assert isinstance(loaded, QA)
    assert loaded is not blank
    assert [dict(d)["answer"] for d in loaded.predict.demos] == ["a0"]
    assert blank.predict.demos == [], "the caller's module is not changed"
    with dspy.context(lm=FakeLM({"answer": "from state"})):
        assert (await call(h, mode, question="Q")).answer == "from state"


def test_state_files_in_pickle_format_and_bare_json_paths(tmp_path: Path) -> None:
    dspy.Predict("question -> answer").save(str(tmp_path / "qa.json"))
    with pytest.raises(ConfigurationError) as info:
        HierarchicalPipeline({"root": {"type": "module", "module": str(tmp_path / "qa.json")}})
    assert info.value.code == "bad_program"
    assert "'state'" in str(info.value)
    dspy.Predict("question -> answer").save(str(tmp_path / "qa.pkl"))
    node = {"type": "module", "module": dspy.Predict("question -> answer"), "state": str(tmp_path / "qa.pkl")}
    with pytest.raises(ConfigurationError) as info:
        HierarchicalPipeline({"root": node})
    assert info.value.code == "pickle_not_allowed"
    assert len(HierarchicalPipeline({"root": node}, allow_pickle=True).nodes["root"].demos) == 0
