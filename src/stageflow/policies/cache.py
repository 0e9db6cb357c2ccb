"""Stage-output caching: exact keys, private copies, a true LRU in memory, an optional SQLite store.

A cached stage skips the call entirely on a hit — no prompt formatting, no parsing — so a hit
costs microseconds, not the ~0.6 ms a DSPy LM-cache hit still spends. The key of a call is

    stage path + stageflow.fingerprint(stage) + the inputs, type-exact

- the **fingerprint** (:mod:`stageflow.fingerprinting`) covers what decides the stage's outputs:
  a predictor's signature, demos, LM and settings as they are at call time, a function's code,
  constants, defaults, closure values and the globals it reads. Re-compiling, re-prompting or
  editing a stage misses; changing another stage does not. For a stage that reads lists, dicts or
  sets, the key hashes their data as it is at call time (:mod:`stageflow._fp_calls`); a call during
  which that data changed is not stored (the stage's own log or counter: ``stageflow.untracked``);
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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stageflow._fp_calls import CallProbe, call_fingerprint
from stageflow._fp_dynamic import dynamic_reads, dynamic_text
from stageflow.policies.keys import NotDurable, Unkeyable, durable_text, freeze
from stageflow.policies.snapshot import Snapshot, Uncopyable

__all__ = [
    "CachePolicy",
    "CacheWarning",
    "CallKeys",
    "MemoryStore",
    "is_collecting_traces",
    "make_key",
    "output_problem",
]

#: Bumped when the key layout changes, so old persistent entries are never read as new ones.
KEY_VERSION = 3


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

    def lookup(
        self,
        key: Any,
        durable: Callable[[], str | None],
        fits: Callable[[Any], str | None] | None = None,
        stage: str = "",
    ) -> tuple[bool, Any]:
        """``(True, a fresh copy of the output)`` on a hit, ``(False, None)`` on a miss.

        ``fits(value)`` checks an entry read from the persistent store (another process wrote it,
        or someone edited the file): it returns why the entry cannot be the stage's output, or
        ``None``. An entry that does not fit is a miss with one :class:`CacheWarning` for ``stage``;
        the fresh output then overwrites it."""
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
        problem = None if fits is None else fits(value)
        if problem is not None:
            self._unfit(stage, problem)
            return False, None
        try:
            snap = Snapshot.take(value)
        except Uncopyable:
            return True, value  # a freshly decoded value is private already
        self.memory.set(key, snap)
        return True, snap.restore()

    def _unfit(self, stage: str, problem: str) -> None:
        reject = getattr(self.persistent, "reject", None)
        if reject is not None:
            reject()  # the store counted a hit: it is a miss (and a bad entry)
        where = getattr(self.persistent, "path", None)
        self.warn_once(
            stage,
            "unfit",
            f"Stage {stage}: an entry in the cache database {str(where)!r} cannot be this stage's "
            f"output ({problem}); it was treated as a miss and the stage ran — its output replaces "
            "the entry. A file written by another program or version, or edited by hand, causes this; "
            "delete the file if it keeps happening. (Warned once per stage.)",
        )

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


def output_problem(value: Any, fields: Sequence[str] | None, single: bool = False) -> str | None:
    """Why ``value`` cannot be the output of a stage that declares ``fields`` (``None``: it can).

    A stage's output is a record of fields (a dict, ``dspy.Prediction`` or pydantic model) that
    holds every declared field; a function stage with one declared output (``single``) may also
    return the bare value. With no declaration, any record of string-named fields fits.

    >>> output_problem({"y": 1}, ["y"]), output_problem(3, ["y"], single=True)
    (None, None)
    >>> output_problem({"z": 1}, ["y"])
    "it lacks the declared output 'y' (it has ['z'])"
    """
    names = _field_names(value)
    if names is None:
        if single:
            return None
        return f"it is a {type(value).__name__}, not a record of named fields"
    missing = [f for f in fields or () if f not in names]
    if missing:
        return f"it lacks the declared output {missing[0]!r} (it has {sorted(map(str, names))})"
    bad = [k for k in names if type(k) is not str]
    if bad:
        return f"it has the field name {bad[0]!r}, which is not a string"
    return None


def _field_names(value: Any) -> Collection[Any] | None:
    store = getattr(value, "_store", None)
    if type(store) is dict and _is_example(value):
        return store.keys()
    if isinstance(value, Mapping):
        return value.keys()
    fields = getattr(type(value), "model_fields", None)
    if isinstance(fields, dict) and hasattr(value, "model_dump"):
        return fields.keys()
    return None


def _is_example(value: Any) -> bool:
    dspy = sys.modules.get("dspy")
    return dspy is not None and isinstance(value, dspy.Example)


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


class CallKeys:
    """The keys of one cached call: ``memory`` (a tuple) and ``durable()`` (computed once, and only
    when a persistent store is consulted: the sha256 used there, or ``None`` when the key cannot be
    spelled the same way in another process)."""

    __slots__ = ("_durable", "_persistent", "_policy", "_probe", "_stage", "memory")

    def __init__(
        self,
        path: str,
        fp: str,
        frozen: Any,
        persistent: bool,
        probe: CallProbe | None,
        policy: CachePolicy | None = None,
        stage: str = "",
    ) -> None:
        self.memory = (path, fp, frozen)
        self._persistent, self._probe, self._policy, self._stage = persistent, probe, policy, stage
        self._durable: list[str | None] = []

    def durable(self) -> str | None:
        if not self._persistent:
            return None  # pragma: no cover - only persistent stores ask for it
        if not self._durable:
            path, fp, frozen = self.memory
            try:
                text = durable_text([KEY_VERSION, path, fp, frozen])
            except NotDurable:
                self._durable.append(None)
            else:
                self._durable.append(hashlib.sha256(text.encode()).hexdigest())
        return self._durable[0]

    def after_call(self) -> bool:
        """Whether the call's output may be stored under these keys: not when data the key covers
        changed while the call ran (see :mod:`stageflow._fp_calls`; the cache warns once for the
        stage)."""
        what = None if self._probe is None else self._probe.changed()
        if what is None:
            return True
        policy = self._policy
        if policy is not None:
            policy._uncached[0] += 1
            policy.warn_once(
                self._stage,
                "changed-while-running",
                f"Stage {self._stage} is not cached: {what}, and its cache key holds that data, so the "
                "output cannot be filed under what it was computed from. If that data does not change "
                "the stage's outputs (a call log, a counter), create it with stageflow.untracked(...), "
                "e.g. `calls = stageflow.untracked([])`, and the stage is cached again. (Warned once "
                "per stage.)",
            )
        return False


def make_key(
    path: str, target: Any, kw: dict[str, Any], policy: CachePolicy | None = None, label: str = ""
) -> CallKeys | None:
    """The :class:`CallKeys` of one call, or ``None`` when an input cannot be keyed.

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
        fp, probe = call_fingerprint(target)
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
    if policy is not None:
        dynamic = dynamic_reads(target)
        if dynamic:
            _warn_dynamic(policy, label or repr(path), dynamic)
    if len(items) > 1:  # keyword order is not part of the key: f(a=1, b=2) is f(b=2, a=1)
        items.sort(key=_by_name)
    persistent = policy is None or policy.persistent is not None
    return CallKeys(path, fp, tuple(items), persistent, probe, policy, label or repr(path))


def _warn_dynamic(policy: CachePolicy, stage: str, functions: list[str]) -> None:
    if (stage, "dynamic") in policy._warned:  # (said once already: no message built on every hit)
        return
    policy.warn_once(
        stage,
        "dynamic",
        f"Stage {stage} looks module-level names up at run time ({dynamic_text(functions)}), so "
        "its cache key cannot hold the values it reads that way: after one changes, the cache may "
        "still serve the output computed with the old value. Read the name directly (RATE, not "
        "globals()['RATE']), pass the value as an input, or clear the cache when it changes. "
        "(Warned once per stage.)",
    )


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
