"""Stage-output caching: content-addressed keys, a true LRU in memory, an optional SQLite store.

A cached stage skips the call entirely on a hit — no prompt formatting, no parsing — so a hit
costs microseconds, not the ~0.6 ms a DSPy LM-cache hit still spends. Keys are

    stage path + fingerprint of the stage's state + the inputs

where the fingerprint covers every predictor's signature (instructions, fields), demos and model
name/settings (or a function's code). Re-compiling or re-prompting a stage therefore misses;
changing another stage does not.

While a DSPy optimizer collects traces (``dspy.settings.trace`` is not the process default), a
cached stage runs anyway, so the optimizer still sees its predictors' traces.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CachePolicy", "MemoryStore", "fingerprint", "is_collecting_traces", "make_key"]


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

    def get(self, key: Any) -> tuple[bool, Any]:
        with self._lock:
            try:
                value = self._data[key]
            except KeyError:
                self.misses += 1
                return False, None
            self._data.move_to_end(key)
            self.hits += 1
            return True, value

    def set(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

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
        memory: The in-memory LRU (``MemoryStore(cache_size)``).
        persistent: An optional persistent store (:class:`~stageflow.policies.stores.SQLiteStore`),
            consulted on a memory miss and written in the background.
    """

    memory: MemoryStore = field(default_factory=MemoryStore)
    persistent: Any = None

    def stats(self) -> dict[str, Any]:
        """Hits, misses, hit rate and size (memory tier; persistent hits count as hits)."""
        s = self.memory.stats()
        if self.persistent is not None:
            p = self.persistent.stats()
            s["persistent"] = p
            s["hits"] += p["hits"]
            s["misses"] = s["misses"] - p["hits"]
            total = s["hits"] + s["misses"]
            s["hit_rate"] = s["hits"] / total if total else 0.0
        return s

    def lookup(self, key: Any, durable_key: Any) -> tuple[bool, Any]:
        found, value = self.memory.get(key)
        if found or self.persistent is None:
            return found, value
        found, value = self.persistent.get(durable_key())
        if found:
            self.memory.set(key, value)
        return found, value

    def store(self, key: Any, durable_key: Any, value: Any) -> None:
        self.memory.set(key, value)
        if self.persistent is not None:
            self.persistent.set(durable_key(), value)


def is_collecting_traces() -> bool:
    """Whether a DSPy optimizer (or anyone) is collecting traces in a ``dspy.context(trace=[])``."""
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None:
        return False
    main = settings_module.main_thread_config
    overrides = settings_module.thread_local_overrides.get()
    trace = overrides.get("trace", main.get("trace"))
    return trace is not None and trace is not main.get("trace")


# -- fingerprints ---------------------------------------------------------------------------------

_PREDICTORS: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()
# token -> (fingerprint, the objects the token's ids belong to). Holding the objects keeps them
# alive, so an id in a token can never be reused by a new object while the entry exists.
_FINGERPRINTS: dict[tuple[Any, ...], tuple[str, tuple[Any, ...]]] = {}
_FP_LOCK = threading.Lock()


def _predictors(target: Any) -> tuple[Any, ...]:
    try:
        cached = _PREDICTORS.get(target)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    named = target.named_predictors() if hasattr(target, "named_predictors") else []
    preds = tuple(p for _, p in named)
    with contextlib.suppress(TypeError):  # not weak-referenceable: recomputed next time
        _PREDICTORS[target] = preds
    return preds


def _current_lm() -> Any:
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None:
        return None
    overrides = settings_module.thread_local_overrides.get()
    return overrides.get("lm", settings_module.main_thread_config.get("lm"))


def _predictor_state(p: Any, default_lm: Any) -> dict[str, Any]:
    sig = p.signature
    lm = p.lm or default_lm
    demos = []
    for d in p.demos:
        demos.append(d.toDict() if hasattr(d, "toDict") else dict(d))
    return {
        "instructions": sig.instructions,
        "fields": [
            [name, str(f.annotation), f.json_schema_extra.get("desc") if f.json_schema_extra else None]
            for name, f in {**sig.input_fields, **sig.output_fields}.items()
        ],
        "demos": demos,
        "lm": None
        if lm is None
        else [
            getattr(lm, "model", type(lm).__name__),
            sorted((k, repr(v)) for k, v in getattr(lm, "kwargs", {}).items()),
        ],
    }


def _code(target: Any) -> Any:
    """The code object that computes ``target``'s outputs (a function's, or a module's ``forward``)."""
    code = getattr(target, "__code__", None)
    if code is None:
        forward = getattr(type(target), "forward", None)  # via the class: no DSPy forward warning
        code = getattr(forward, "__code__", None)
    if code is None:
        call = type(target).__dict__.get("__call__")
        code = getattr(call, "__code__", None)
    return code


def _token(d: dict[str, Any], default_lm: Any) -> tuple[Any, ...]:
    demos = d.get("demos", ())
    lm = d.get("lm") or default_lm
    return (id(d.get("signature")), id(demos), len(demos), id(lm)), (d.get("signature"), demos, lm)


def fingerprint(target: Any) -> str:
    """A content hash of what determines ``target``'s outputs besides its inputs.

    Cheap when nothing changed: recomputed only when a predictor's signature object, demos list,
    demo count or LM object changes (which is what compiling and re-prompting do). The LM is the
    predictor's own or, when it has none, the one ``dspy.context``/``dspy.configure`` provides.
    """
    fn_stage = getattr(target, "fn", None) if type(target).__name__ == "FunctionStage" else None
    if fn_stage is not None:
        target = fn_stage
    preds = _predictors(target)
    default_lm = _current_lm() if preds else None
    if preds:
        parts = [_token(p.__dict__, default_lm) for p in preds]
        token: tuple[Any, ...] = tuple(t for t, _ in parts)
        refs: tuple[Any, ...] = tuple(r for _, r in parts)
    else:
        code_obj = _code(target)
        token = ("code", id(code_obj), id(target))
        refs = (code_obj, target)
    hit = _FINGERPRINTS.get(token)
    if hit is not None:
        return hit[0]
    if preds:
        payload: Any = [_predictor_state(p, default_lm) for p in preds]
    else:
        code = _code(target)
        payload = [
            getattr(target, "__qualname__", type(target).__qualname__),
            hashlib.sha256(code.co_code).hexdigest() if code is not None else repr(target),
        ]
    fp = hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()[:24]
    with _FP_LOCK:
        if len(_FINGERPRINTS) > 10_000:
            _FINGERPRINTS.clear()
        _FINGERPRINTS[token] = (fp, refs)
    return fp


def _freeze(value: Any) -> Any:
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    return ("repr", repr(value))


def make_key(path: str, target: Any, kw: dict[str, Any]) -> tuple[Any, Any]:
    """``(memory_key, durable_key_factory)`` for one call: the memory key is a tuple; the durable
    key (a sha256 string, for persistent stores) is only computed when needed."""
    fp = fingerprint(target)
    frozen = tuple(sorted((k, _freeze(v)) for k, v in kw.items()))
    key = (path, fp, frozen)

    memo: list[str] = []

    def durable() -> str:  # computed once, and only when a persistent store is consulted
        if not memo:
            text = json.dumps([path, fp, frozen], sort_keys=True, default=repr)
            memo.append(hashlib.sha256(text.encode()).hexdigest())
        return memo[0]

    return key, durable
