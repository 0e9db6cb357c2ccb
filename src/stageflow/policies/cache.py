"""Stage-output caching: exact keys, private copies, a true LRU in memory, an optional SQLite store.

A cached stage skips the call entirely on a hit — no prompt formatting, no parsing — so a hit
costs microseconds, not the ~0.6 ms a DSPy LM-cache hit still spends. The key of a call is

    stage path + stageflow.fingerprint(stage) + the inputs, type-exact

- the **fingerprint** (:mod:`stageflow.fingerprinting`) covers what decides the stage's outputs:
  a predictor's signature, demos, LM and settings as they are at call time, a function's code,
  constants, defaults, closure values and the globals it reads. Re-compiling, re-prompting or
  editing a stage misses; changing another stage does not;
- the **inputs** are keyed by :func:`~stageflow.policies.keys.freeze`: ``1``, ``True`` and
  ``1.0`` are different inputs, objects are keyed by content, never by ``repr``. An input with no
  canonical encoding makes that call uncached, with one :class:`CacheWarning` per stage and field.

A hit returns a fresh object of the type the miss returned (:mod:`~stageflow.policies.snapshot`),
sharing nothing mutable with the caller or with other hits. A persistent store keeps values in a
data format that cannot run code when read (:mod:`~stageflow.policies.codec`); what that format
cannot encode stays in memory, with one warning per stage.

While a DSPy optimizer collects traces (``dspy.settings.trace`` is not the process default), a
cached stage runs anyway, so the optimizer still sees its predictors' traces.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stageflow.fingerprinting import fingerprint
from stageflow.policies.keys import NotDurable, Unkeyable, durable_text, freeze
from stageflow.policies.snapshot import Snapshot, Uncopyable

__all__ = ["CachePolicy", "CacheWarning", "MemoryStore", "is_collecting_traces", "make_key"]

#: Bumped when the key layout changes, so old persistent entries are never read as new ones.
KEY_VERSION = 2


_ABSENT = object()


class CacheWarning(UserWarning):
    """A stage's call could not be cached (or not persisted), or a cache file is unusable."""


def hit_stats(hits: int, misses: int, **extra: Any) -> dict[str, Any]:
    """``{"hits", "misses", "hit_rate", ...}`` for a cache tier."""
    total = hits + misses
    return {"hits": hits, "misses": misses, "hit_rate": hits / total if total else 0.0, **extra}


class MemoryStore:
    """A thread-safe least-recently-used store (a hit moves the entry to the front)."""

    def __init__(self, maxsize: int = 1000) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            from stageflow.errors import ConfigurationError

            raise ConfigurationError(
                f"cache_size must be a positive int, got {maxsize!r}.", field="cache_size", code="bad_option"
            )
        self.maxsize = maxsize
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> MemoryStore:
        return self  # a copied program shares its cache (like DSPy's LM cache)

    def __getstate__(self) -> dict[str, Any]:
        return {"maxsize": self.maxsize}  # a pickled program (Ray, cloudpickle) starts with an empty cache

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["maxsize"])  # type: ignore[misc]

    def get(self, key: Any) -> tuple[bool, Any]:
        with self._lock:
            value = self._data.get(key, _ABSENT)
            if value is _ABSENT:  # (no KeyError: raising one on every miss costs more than the lookup)
                self.misses += 1
                return False, None
            self._data.move_to_end(key)
            self.hits += 1
            return True, value

    def set(self, key: Any, value: Any) -> None:
        data = self._data
        with self._lock:
            if key in data:
                data.move_to_end(key)
            data[key] = value
            if len(data) > self.maxsize:
                data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def stats(self) -> dict[str, Any]:
        return hit_stats(self.hits, self.misses, size=len(self._data), maxsize=self.maxsize)


@dataclass(frozen=True)
class CachePolicy:
    """Cache a stage's outputs.

    Attributes:
        memory: The in-memory LRU (``MemoryStore(cache_size)``); it holds private copies.
        persistent: An optional persistent store (:class:`~stageflow.policies.stores.SQLiteStore`),
            consulted on a memory miss and written in the background.
    """

    memory: MemoryStore = field(default_factory=MemoryStore)
    persistent: Any = None
    _warned: set[tuple[str, str]] = field(default_factory=set, init=False, compare=False, repr=False)
    _uncached: list[int] = field(default_factory=lambda: [0], init=False, compare=False, repr=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> CachePolicy:
        return self

    def __len__(self) -> int:
        """Entries in memory (``len(cached.cache)``, as the tutorial reads its dict)."""
        return len(self.memory)

    def stats(self) -> dict[str, Any]:
        """Hits, misses, hit rate and size (memory tier; persistent hits count as hits), and
        ``uncached``: calls that could not be cached (an input without a canonical encoding)."""
        s = self.memory.stats()
        if self.persistent is not None:
            p = self.persistent.stats()
            s["persistent"] = p
            s["hits"] += p["hits"]
            s["misses"] = s["misses"] - p["hits"]
            total = s["hits"] + s["misses"]
            s["hit_rate"] = s["hits"] / total if total else 0.0
        s["uncached"] = self._uncached[0]
        return s

    def warn_once(self, stage: str, topic: str, message: str) -> None:
        """One :class:`CacheWarning` per stage and topic."""
        if (stage, topic) in self._warned:
            return
        self._warned.add((stage, topic))
        warnings.warn(message, CacheWarning, stacklevel=4)

    def lookup(self, key: Any, durable: Callable[[], str | None]) -> tuple[bool, Any]:
        """``(True, a fresh copy of the output)`` on a hit, ``(False, None)`` on a miss."""
        found, snap = self.memory.get(key)
        if found:
            return True, snap.restore()
        if self.persistent is None:
            return False, None
        dkey = durable()
        if dkey is None:
            return False, None
        found, value = self.persistent.get(dkey)
        if not found:
            return False, None
        try:
            snap = Snapshot.take(value)
        except Uncopyable:
            return True, value  # a freshly decoded value is private already
        self.memory.set(key, snap)
        return True, snap.restore()

    def store(
        self, key: Any, durable: Callable[[], str | None], out: Any, path: str, label: str = ""
    ) -> None:
        """Keep a private copy of ``out``; persist it when it can be encoded (else warn once).

        Warnings name the stage by ``label``, or else by its ``path``."""
        try:
            snap = Snapshot.take(out)
        except Uncopyable as e:
            stage = label or repr(path)
            self.warn_once(
                stage,
                "copy",
                f"Stage {stage} is not cached: its output cannot be copied ({e}), and handing the "
                "same object to every hit would let one caller change another's result. Return "
                "plain data (dicts, lists, strings, pydantic models) from the stage, or remove its cache.",
            )
            return
        self.memory.set(key, snap)
        if self.persistent is None:
            return
        dkey = durable()
        if dkey is None:
            return
        from stageflow.policies.codec import Unencodable

        try:
            self.persistent.set(dkey, out)
        except Unencodable as e:
            stage = label or repr(path)
            self.warn_once(
                stage,
                "encode",
                f"Stage {stage}: outputs of type {e.type_name} are cached in memory only — the cache "
                f"file format cannot store them ({e.reason}). Return plain data, dspy.Prediction, "
                "pydantic models, dataclasses or numpy arrays to persist them.",
            )


def is_collecting_traces() -> bool:
    """Whether a DSPy optimizer (or anyone) is collecting traces in a ``dspy.context(trace=[])``."""
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None:
        return False
    main = settings_module.main_thread_config
    overrides = settings_module.thread_local_overrides.get()
    trace = overrides.get("trace", main.get("trace"))
    return trace is not None and trace is not main.get("trace")


def _by_name(item: tuple[str, Any]) -> str:
    return item[0]


def make_key(
    path: str, target: Any, kw: dict[str, Any], policy: CachePolicy | None = None, label: str = ""
) -> tuple[Any, Callable[[], str | None]] | None:
    """``(memory_key, durable_key)`` for one call, or ``None`` when an input cannot be keyed.

    The memory key is a tuple; ``durable_key()`` computes (once) the sha256 used by persistent
    stores, or returns ``None`` when the key cannot be spelled the same way in another process.
    When an input has no canonical encoding, or the stage cannot be fingerprinted (reading its
    state raised), ``policy`` (if given) warns once for the stage and ``None`` is returned: the call
    runs uncached. A cache never fails a stage.
    """
    items = []
    for name, value in kw.items():
        try:
            items.append((name, value if type(value) is str else freeze(value)))
        except Unkeyable as e:
            if policy is not None:
                _warn_unkeyable(policy, label or repr(path), name, e)
            return None
        except Exception as e:  # an object whose fields raise when read
            if policy is not None:
                _warn_unkeyable(policy, label or repr(path), name, Unkeyable(type(value).__name__, repr(e)))
            return None
    try:
        fp = fingerprint(target)
    except Exception as e:  # a stage object whose attributes raise when read
        if policy is not None:
            stage = label or repr(path)
            policy._uncached[0] += 1
            policy.warn_once(
                stage,
                "fingerprint",
                f"Stage {stage} is not cached: stageflow could not fingerprint it "
                f"({type(e).__name__}: {e}), so it cannot tell whether the stage changed. "
                "Report this with the stage's type; meanwhile remove its cache.",
            )
        return None
    if len(items) > 1:  # keyword order is not part of the key: f(a=1, b=2) is f(b=2, a=1)
        items.sort(key=_by_name)
    frozen = tuple(items)
    if policy is not None and policy.persistent is None:
        return (path, fp, frozen), _no_durable_key
    memo: list[str | None] = []

    def durable() -> str | None:  # computed once, and only when a persistent store is consulted
        if not memo:
            try:
                text = durable_text([KEY_VERSION, path, fp, frozen])
            except NotDurable:
                memo.append(None)
            else:
                memo.append(hashlib.sha256(text.encode()).hexdigest())
        return memo[0]

    return (path, fp, frozen), durable


def _no_durable_key() -> str | None:
    return None  # pragma: no cover - only persistent stores ask for it


def _warn_unkeyable(policy: CachePolicy, stage: str, name: str, e: Unkeyable) -> None:
    policy._uncached[0] += 1
    policy.warn_once(
        stage,
        f"key:{name}",
        f"Stage {stage} is not cached for calls like this one: input {name!r}{e.where} is a "
        f"{e.type_name}, which has {e.reason}, so stageflow cannot tell two such inputs apart "
        "safely (a repr can be truncated or equal for different values). Pass plain data (str, "
        "int, float, bool, None, lists, tuples, dicts, sets, bytes), numpy arrays, pydantic models, "
        "dataclasses or dspy.Example, or remove the cache from this stage. (Warned once per stage "
        "and input.)",
    )
