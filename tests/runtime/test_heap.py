"""A batch keeps the heap it started with out of full collections and collects its young objects
less often; both are given back afterwards."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stageflow
from stageflow.runtime.heap import YOUNG_THRESHOLD, batch_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


seen_thresholds: list[int] = []


def _seen_pipeline(seen: list[int]) -> Any:
    def look(text: str) -> dict[str, int]:
        seen.append(gc.get_freeze_count())
        seen_thresholds.append(gc.get_threshold()[0])
        return {"n": len(text)}

    return stageflow.SequentialPipeline([stageflow.stage(look, writes=["n"])])


def test_the_heap_is_frozen_while_records_run_and_released_after(tmp_path: Path, unfrozen: None) -> None:
    seen: list[int] = []
    summary = stageflow.run_batch(
        _seen_pipeline(seen), [{"text": "ab"}, {"text": "c"}], journal=tmp_path / "j.sqlite", progress=False
    )
    assert summary.ok
    assert len(seen) == 2
    assert min(seen) > 0
    assert gc.get_freeze_count() == 0


def test_a_heap_the_process_froze_itself_stays_frozen(tmp_path: Path, unfrozen: None) -> None:
    gc.freeze()
    seen: list[int] = []
    stageflow.run_batch(_seen_pipeline(seen), [{"text": "ab"}], journal=tmp_path / "j.sqlite", progress=False)
    assert len(seen) == 1
    assert seen[0] > 0
    assert gc.get_freeze_count() > 0  # not unfrozen by the batch


def test_an_error_in_the_block_still_unfreezes(unfrozen: None) -> None:
    seen: list[int] = []

    def fail() -> None:
        with batch_heap():
            seen.append(gc.get_freeze_count())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail()
    assert seen[0] > 0
    assert gc.get_freeze_count() == 0


def test_cyclic_garbage_from_before_the_batch_is_collected_after_it(unfrozen: None) -> None:
    class Node:
        other: Any = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    del a, b
    with batch_heap():
        gc.collect()  # the frozen cycle is not looked at
        assert alive() is not None
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("young", [700, 2000, 10_000, 0])
def test_the_young_threshold_is_raised_for_the_batch_only_when_lower(
    tmp_path: Path, unfrozen: None, young: int
) -> None:
    gc.set_threshold(young, 7, 9)
    seen_thresholds.clear()
    stageflow.run_batch(_seen_pipeline([]), [{"text": "ab"}], journal=tmp_path / "j.sqlite", progress=False)
    expected = YOUNG_THRESHOLD if 0 < young < YOUNG_THRESHOLD else young
    assert seen_thresholds == [expected]
    assert gc.get_threshold() == (young, 7, 9)


def test_a_threshold_changed_during_the_batch_is_kept(unfrozen: None) -> None:
    gc.set_threshold(700, 10, 10)
    with batch_heap():
        gc.set_threshold(1234, 10, 10)
    assert gc.get_threshold() == (1234, 10, 10)
