"""A batch keeps the heap it started with out of full collections, and gives it back afterwards."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stageflow
from stageflow.runtime.heap import frozen_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def _seen_pipeline(seen: list[int]) -> Any:
    def look(text: str) -> dict[str, int]:
        seen.append(gc.get_freeze_count())
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
        with frozen_heap():
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
    with frozen_heap():
        gc.collect()  # the frozen cycle is not looked at
        assert alive() is not None
    gc.collect()
    assert alive() is None
