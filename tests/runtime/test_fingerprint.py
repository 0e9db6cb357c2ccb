"""The program fingerprint a batch journal stores: every predictor and function stage, and the
structure, count; rebuilding the same program gives the same fingerprint."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import pytest

import stageflow
from stageflow.runtime import program_fingerprint
from stageflow.testing import FakeLM


def build(
    instructions: str = "Answer.",
    scale: int = 2,
    demos: int = 0,
    extra: bool = False,
    second: str = "answer -> summary",
) -> stageflow.SequentialPipeline:
    first = dspy.Predict(dspy.Signature("question -> answer", instructions))
    first.demos = [dspy.Example(question=f"q{i}", answer=f"a{i}") for i in range(demos)]
    stages: list[Any] = [first, stageflow.stage(lambda answer: {"n": scale * len(answer)}, writes=["n"])]
    stages.append(stageflow.ForEach(dspy.Predict("item -> fact"), over="items", collect="facts"))
    stages.append(dspy.ChainOfThought(second))
    if extra:
        stages.append(stageflow.stage(lambda summary: {"done": True}, writes=["done"]))
    return stageflow.SequentialPipeline(stages)


def test_rebuilding_the_same_program_gives_the_same_fingerprint() -> None:
    with dspy.context(lm=FakeLM()):
        assert program_fingerprint(build()) == program_fingerprint(build())


@pytest.mark.parametrize(
    "change",
    [
        lambda: build(instructions="Answer briefly."),
        lambda: build(scale=3),
        lambda: build(demos=2),
        lambda: build(extra=True),
        lambda: build(second="answer -> abstract"),
    ],
    ids=["instructions", "function-constant", "demos", "added-stage", "nested-signature"],
)
def test_any_stage_change_changes_the_fingerprint(change: Callable[[], Any]) -> None:
    with dspy.context(lm=FakeLM()):
        assert program_fingerprint(change()) != program_fingerprint(build())


def test_the_model_is_part_of_the_fingerprint() -> None:
    program = build()
    with dspy.context(lm=FakeLM()):
        a = program_fingerprint(program)
    with dspy.context(lm=FakeLM(model="other/model")):
        b = program_fingerprint(program)
    assert a != b


def test_function_code_is_covered() -> None:
    def count(answer: str) -> dict[str, int]:
        return {"n": len(answer)}

    def words(answer: str) -> dict[str, int]:
        return {"n": len(answer.split())}

    a = stageflow.SequentialPipeline([stageflow.stage(count, writes=["n"])])
    b = stageflow.SequentialPipeline([stageflow.stage(words, writes=["n"])])
    assert program_fingerprint(a) != program_fingerprint(b)


_SKIP: set[int] = {3}


def test_a_value_a_stage_reads_from_its_module_changed_in_place_is_seen_on_resume(tmp_path: Path) -> None:
    from stageflow.runtime import JournalError

    def work(x: int) -> dict[str, int]:
        if x in _SKIP:
            raise ValueError("skipped")
        return {"out": 2 * x}

    program = stageflow.SequentialPipeline([stageflow.stage(work, writes=["out"])])
    records = [{"id": str(i), "x": i} for i in range(5)]
    journal = tmp_path / "j"
    first = stageflow.run_batch(program, records, journal=journal)
    assert first.failed == 1
    _SKIP.clear()  # the same objects; what `work` does has changed
    try:
        with pytest.raises(JournalError) as info:
            stageflow.run_batch(program, records, journal=journal, retry_failed=True)
    finally:
        _SKIP.add(3)
    assert info.value.code == "changed_since_planned"
    assert "changed stages: stages[0]" in info.value.message


_LOG: list[int] = []
_OWN_LOG: list[int] = stageflow.untracked([])
_FACTOR = {"k": 2}


def _logged(x: int) -> dict[str, int]:
    _LOG.append(x)  # a plain list: data the program reads, changed while the batch runs
    return {"out": x * _FACTOR["k"]}


def _own_logged(x: int) -> dict[str, int]:
    _OWN_LOG.append(x)  # marked as the stage's own: left out of fingerprints
    return {"out": x * _FACTOR["k"]}


def test_a_plain_log_refuses_a_same_process_resume_and_says_how_to_mark_it(tmp_path: Path) -> None:
    """stageflow cannot tell a stage's log from a setting another thread edited during the run: the
    resume is refused, loudly, and the message points at stageflow.untracked."""
    from stageflow.runtime import JournalError

    program = stageflow.SequentialPipeline([stageflow.stage(_logged, writes=["out"])])
    records = [{"id": str(i), "x": i} for i in range(3)]
    _LOG.clear()
    stageflow.run_batch(program, records, journal=tmp_path / "j")
    with pytest.raises(JournalError) as info:
        stageflow.run_batch(program, records, journal=tmp_path / "j")
    assert (
        "changed during the last run (the list '_LOG' (3 items) of stage 'stages[0]')" in info.value.message
    )
    assert "stageflow.untracked" in info.value.message
    assert stageflow.run_batch(program, records, journal=tmp_path / "j", allow_changed=True).ran == 0


def test_an_untracked_log_resumes_in_the_same_process(tmp_path: Path) -> None:
    program = stageflow.SequentialPipeline([stageflow.stage(_own_logged, writes=["out"])])
    records = [{"id": str(i), "x": i} for i in range(4)]
    _OWN_LOG.clear()
    first = stageflow.run_batch(program, records[:2], journal=tmp_path / "j")
    assert first.succeeded == 2
    program(x=9)  # called by hand in between: its own log grows
    again = stageflow.run_batch(program, records[:2], journal=tmp_path / "j")
    assert (again.succeeded, again.ran) == (2, 0)


def test_a_setting_changed_between_runs_is_still_refused_when_the_stage_also_logs(tmp_path: Path) -> None:
    from stageflow.runtime import JournalError

    program = stageflow.SequentialPipeline([stageflow.stage(_own_logged, writes=["out"])])
    records = [{"id": str(i), "x": i} for i in range(3)]
    stageflow.run_batch(program, records, journal=tmp_path / "j")
    _FACTOR["k"] = 3
    try:
        with pytest.raises(JournalError) as info:
            stageflow.run_batch(program, records, journal=tmp_path / "j")
    finally:
        _FACTOR["k"] = 2
    assert info.value.code == "changed_since_planned"
    assert "changed stages: stages[0]" in info.value.message


_CFG: dict[str, Any] = {"factor": 2, "stats": stageflow.untracked({"seen": 0})}


def _counting(x: int) -> dict[str, int]:
    _CFG["stats"]["seen"] += 1  # its own counter, kept inside the dict that holds its setting
    if x >= 10 and os.environ.get("SF_TEST_FAIL_BIG"):  # (outside what a fingerprint covers)
        raise RuntimeError("transient")
    return {"y": x * _CFG["factor"]}


def test_a_setting_beside_an_untracked_counter_changed_between_runs_is_refused(tmp_path: Path) -> None:
    """A dict a stage counts in was taken for the stage's own data as a whole: the setting in it,
    changed between the runs, was not seen, and the output mixed factor 2 and factor 5."""
    from stageflow.runtime import JournalError

    program = stageflow.SequentialPipeline([stageflow.stage(_counting, writes=["y"])])
    records = [{"id": f"r{i}", "x": i} for i in (1, 2, 10, 20)]
    os.environ["SF_TEST_FAIL_BIG"] = "1"
    try:
        first = stageflow.run_batch(program, records, journal=tmp_path / "j")
        assert (first.succeeded, first.failed) == (2, 2)
        del os.environ["SF_TEST_FAIL_BIG"]
        again = stageflow.run_batch(program, records, journal=tmp_path / "j", retry_failed=True)
        assert again.succeeded == 4  # the counter alone changed: resumed
        _CFG["factor"] = 5
        with pytest.raises(JournalError) as info:
            stageflow.run_batch(program, records, journal=tmp_path / "j", retry_failed=True)
    finally:
        _CFG["factor"] = 2
        os.environ.pop("SF_TEST_FAIL_BIG", None)
    assert info.value.code == "changed_since_planned"


_ODICT = __import__("collections").OrderedDict(factor=2)


def test_an_ordered_dict_setting_changed_between_runs_is_refused(tmp_path: Path) -> None:
    from stageflow.runtime import JournalError

    def scale(x: int) -> dict[str, int]:
        return {"y": x * _ODICT["factor"]}

    program = stageflow.SequentialPipeline([stageflow.stage(scale, writes=["y"])])
    records = [{"id": str(i), "x": i} for i in range(3)]
    stageflow.run_batch(program, records, journal=tmp_path / "j")
    _ODICT["factor"] = 5
    try:
        with pytest.raises(JournalError):
            stageflow.run_batch(program, records, journal=tmp_path / "j")
    finally:
        _ODICT["factor"] = 2


_TABLE = {f"k{i}": i for i in range(5000)}


def test_a_big_table_edited_between_runs_is_refused(tmp_path: Path) -> None:
    """Beyond the walk budget a table was described by its length and a sample: an edit outside the
    sample resumed and mixed old and new results."""
    from stageflow.runtime import JournalError

    def look(key: str) -> dict[str, int]:
        return {"v": _TABLE[key]}

    program = stageflow.SequentialPipeline([stageflow.stage(look, writes=["v"])])
    records = [{"id": "a", "key": "k1234"}]
    stageflow.run_batch(program, records, journal=tmp_path / "j")
    _TABLE["k1234"] = -1
    try:
        with pytest.raises(JournalError):
            stageflow.run_batch(program, records, journal=tmp_path / "j")
    finally:
        _TABLE["k1234"] = 1234
