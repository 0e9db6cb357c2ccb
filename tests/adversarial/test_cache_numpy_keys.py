"""Issue 9, caching (follow-up): numpy arrays of every kind are keyed by class, dtype, shape and
elements — a masked array also by its mask and fill value — or not cached (one warning).

Before the fix, ``np.matrix`` and ``np.memmap`` inputs were keyed like numpy *scalars* (dtype and
bytes, no shape): a 1×4 matrix and a 2×2 matrix with the same numbers shared an entry, and the
second call got the first call's output.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stageflow
from stageflow import CachedStage, SequentialPipeline, stage
from stageflow.policies import codec
from stageflow.policies.cache import CacheWarning
from stageflow.policies.keys import Unkeyable, durable_text, freeze
from stageflow.testing import call

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")


def shape_echo() -> tuple[SequentialPipeline, list[Any]]:
    """A cached stage whose output depends on everything an array is."""
    seen: list[Any] = stageflow.untracked([])

    def describe(m: Any) -> dict[str, Any]:
        seen.append(m)
        mask = np.ma.getmaskarray(m).tolist() if isinstance(m, np.ma.MaskedArray) else None
        filled = np.ma.filled(m).tolist() if isinstance(m, np.ma.MaskedArray) else None
        elements = repr(np.asarray(m).tolist())
        return {"y": (type(m).__name__, np.shape(m), str(np.asarray(m).dtype), elements, mask, filled)}

    return SequentialPipeline([CachedStage(stage(describe, writes=["y"]))]), seen


def memmaps(tmp_path: Path) -> tuple[Any, Any]:
    path = tmp_path / "m.bin"
    flat = np.memmap(path, dtype="int64", mode="w+", shape=(4,))
    flat[:] = [1, 2, 3, 4]
    flat.flush()
    return flat, np.memmap(path, dtype="int64", mode="r", shape=(2, 2))


PAIRS = [
    pytest.param(lambda _: (np.matrix([[1, 2, 3, 4]]), np.matrix([[1, 2], [3, 4]])), id="matrix-shape"),
    pytest.param(memmaps, id="memmap-shape"),
    pytest.param(lambda _: (np.array([[1, 2]]), np.matrix([[1, 2]])), id="ndarray-matrix"),
    pytest.param(
        lambda _: (
            np.ma.masked_array([1, 2, 3], mask=[0, 1, 0]),
            np.ma.masked_array([1, 2, 3], mask=[0, 0, 1]),
        ),
        id="masked-mask",
    ),
    pytest.param(
        lambda _: (
            np.ma.masked_array([1, 2], mask=[0, 1], fill_value=0),
            np.ma.masked_array([1, 2], mask=[0, 1], fill_value=9),
        ),
        id="masked-fill-value",
    ),
    pytest.param(
        lambda _: (np.rec.fromrecords([(1, 2.0)], names="a,b"), np.rec.fromrecords([(1, 2.0)], names="x,y")),
        id="recarray-field-names",
    ),
    pytest.param(
        lambda _: (np.array([1, "a"], dtype=object), np.array([True, "a"], dtype=object)),
        id="object-elements",
    ),
    pytest.param(lambda _: (np.array([1, 2, 3, 4]), np.array([[1, 2], [3, 4]])), id="ndarray-shape"),
]


@pytest.mark.parametrize("make", PAIRS)
async def test_different_arrays_never_share_an_entry(mode: str, tmp_path: Path, make: Any) -> None:
    first, second = make(tmp_path)
    p, seen = shape_echo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # keyed exactly: no "not cached" warning
        a = await call(p, mode, m=first)
        b = await call(p, mode, m=second)
        again = await call(p, mode, m=second)
    assert a.y != b.y
    assert len(seen) == 2  # the second array ran; the repeat hit
    assert [e.kind for e in again.run.events] == ["cache_hit"]


def test_equal_arrays_share_an_entry_whatever_their_memory_layout() -> None:
    c = np.arange(6).reshape(2, 3)
    assert freeze(np.asfortranarray(c)) == freeze(c.copy())
    assert freeze(np.ma.masked_array([1, 2], mask=[0, 1])) == freeze(np.ma.masked_array([1, 2], mask=[0, 1]))
    assert durable_text(freeze(np.matrix([[1, 2]])))  # spelled the same in every process


class Quantity(np.ndarray):
    """An ndarray subclass with meaning beyond its elements (a unit), as astropy's has."""

    unit = "m"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(np.zeros(2).view(Quantity), id="unknown-subclass"),
        pytest.param(np.array([object()], dtype=object), id="object-without-encoding"),
    ],
)
async def test_arrays_that_cannot_be_keyed_exactly_run_uncached_with_one_warning(
    mode: str, value: Any
) -> None:
    p, seen = shape_echo()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        await call(p, mode, m=value)
        await call(p, mode, m=value)
    assert len(seen) == 2
    cache_warnings = [str(w.message) for w in record if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == 1
    assert "not cached" in cache_warnings[0]
    with pytest.raises(Unkeyable):
        freeze(value)


def test_an_ndarray_subclass_output_is_not_persisted_as_a_scalar() -> None:
    """The persistent format wrote an ``np.matrix`` output as a numpy scalar (its first element)."""
    with pytest.raises(codec.Unencodable, match="ndarray subclass"):
        codec.dumps(np.matrix([[1, 2], [3, 4]]))
    assert codec.loads(codec.dumps(np.float32(2.5))) == np.float32(2.5)
    assert codec.loads(codec.dumps(np.array([[1, 2]]))).shape == (1, 2)
