"""A module-level function decorated with ``@stageflow.stage(...)`` pickles with plain ``pickle``.

Reproducer (user-style verification): ``pickle.dumps(SequentialPipeline([mystages.wrap]))`` raised
``PicklingError: Can't pickle <function wrap>: it's not the same object as mystages.wrap`` — the
module holds the stage under the function's name.
"""

from __future__ import annotations

import copy
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stageflow

MODULE = """
import stageflow


@stageflow.stage(writes=["final"])
def wrap(answer: str) -> dict:
    return {"final": answer + "!"}
"""


@pytest.fixture
def mystages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    (tmp_path / "sf_pickled_stages.py").write_text(MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sf_pickled_stages

    yield sf_pickled_stages
    sys.modules.pop("sf_pickled_stages", None)


def test_a_decorated_module_level_stage_pickles_by_name(mystages: Any) -> None:
    wrap = mystages.wrap
    program = stageflow.SequentialPipeline([stageflow.SequentialPipeline([wrap])])
    again = pickle.loads(pickle.dumps(program))
    assert again(answer="a").final == "a!"
    assert again.stages[0].stages[0] is wrap


def test_copies_are_still_copies(mystages: Any) -> None:
    wrap = mystages.wrap
    for twin in (copy.deepcopy(wrap), copy.copy(wrap)):
        assert twin is not wrap
        assert type(twin) is stageflow.FunctionStage
        assert stageflow.SequentialPipeline([twin])(answer="b").final == "b!"
        assert twin.history == []
        assert twin.callbacks == []
    local = stageflow.stage(lambda answer: {"final": answer}, writes=["final"])
    assert copy.deepcopy(local) is not local
