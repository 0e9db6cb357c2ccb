"""``CachedStage``: the tutorial's caching wrapper, on stageflow's cache policy."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from stageflow.policies.cache import CachePolicy, MemoryStore, is_collecting_traces, make_key, output_problem
from stageflow.stages import (
    FunctionStage,
    Stage,
    _sync_only,
    _unapplied,
    applied_call_memo,
    declared_types,
    describe,
    end_watch,
    stage_label,
    watch_degraded,
)

__all__ = ["CachedStage"]


class CachedStage(Stage):
    """Cache a stage's outputs by its inputs (a true LRU; thread-safe; sync and async).

    Works inside a pipeline and called on its own (``cached(**inputs)`` /
    ``await cached.acall(**inputs)``). A hit returns a fresh object of the type the miss returned
    (a ``dspy.Prediction``, a dict, a pydantic model, a single value...), sharing nothing mutable
    with earlier results. See :mod:`stageflow.policies.cache` for what the key covers.

    Args:
        underlying_stage: Any stage (module or function).
        cache_size: Entries kept in memory (least recently *used* evicted first).
        persist_to: A SQLite file: hits survive across processes; writes happen in the background.
        persist_types: Classes (pydantic models, dataclasses, enums) a fresh process may read
            back from ``persist_to`` before it has produced one itself
            (see :func:`~stageflow.policies.codec.allow`).
        **stage_options: Anything :class:`Stage` takes (renames, other policies).

    Examples:
        >>> import stageflow
        >>> calls = stageflow.untracked([])  # the stage's call log: not part of its cache key
        >>> square = stageflow.CachedStage(stageflow.stage(lambda x: calls.append(x) or {"y": x * x},
        ...                                                writes=["y"]))
        >>> p = stageflow.SequentialPipeline([square])
        >>> [p(x=3).y, p(x=3).y, p(x=4).y], calls
        ([9, 9, 16], [3, 4])
        >>> square.cache_hits, square.cache_misses, square.get_cache_stats()["cache_size"]
        (1, 2, 2)
    """

    #: The policies this class's own ``forward`` / ``aforward`` apply (a subclass that calls them
    #: through ``super()`` gets them there; the engine does not apply them around it again).
    stageflow_applies: ClassVar[tuple[str, ...]] = ("cache",)

    def __init__(
        self,
        underlying_stage: Any,
        cache_size: int = 1000,
        *,
        persist_to: str | os.PathLike[str] | None = None,
        persist_types: Sequence[type] = (),
        **stage_options: Any,
    ) -> None:
        persistent = None
        if persist_to is not None:
            from stageflow.policies.stores import SQLiteStore

            declared = declared_types(underlying_stage)
            persistent = SQLiteStore(persist_to, types=[*persist_types, *declared])
        policy = CachePolicy(MemoryStore(cache_size), persistent)
        underlying_stage, stage_options = _flatten(underlying_stage, stage_options)
        super().__init__(underlying_stage, cache=policy, **stage_options)
        self._label = f"CachedStage({stage_label(self.module)})"

    @property
    def cache(self) -> CachePolicy:
        """The cache policy (memory LRU and optional persistent store)."""
        policy = self.policy
        if policy is None or policy.cache is None:  # never: __init__ always sets one
            raise AttributeError("this CachedStage has no cache policy")
        return policy.cache

    @property
    def underlying_stage(self) -> Any:
        """The wrapped stage (the tutorial's name for it)."""
        return self.module

    @property
    def cache_size(self) -> int:
        """How many entries the memory tier keeps."""
        return self.cache.memory.maxsize

    @property
    def cache_hits(self) -> int:
        """Calls answered from the cache (memory or persistent)."""
        return int(self.cache.stats()["hits"])

    @property
    def cache_misses(self) -> int:
        """Calls that ran the stage."""
        return int(self.cache.stats()["misses"])

    def get_cache_stats(self) -> dict[str, Any]:
        """``{"hits", "misses", "hit_rate", "cache_size", ...}`` (``cache_size``: entries in memory)."""
        stats = self.cache.stats()
        stats["cache_size"] = stats["size"]
        return stats

    def clear_cache(self) -> None:
        """Drop every cached entry (memory and persistent)."""
        self.cache.memory.clear()
        if self.cache.persistent is not None:
            self.cache.persistent.clear()

    def _begin(self, kwargs: dict[str, Any]) -> tuple[bool, Any, Callable[[Any], None] | None]:
        """``(True, value, None)`` on a hit, ``(False, None, store)`` on a miss, ``(False, None, None)``
        when this call is not cached (traces are being collected, or an input cannot be keyed)."""
        if is_collecting_traces():
            return False, None, None
        keys = make_key("", self.module, kwargs, self.cache, self._label)
        if keys is None:
            return False, None, None
        memo = applied_call_memo()  # (inside a call whose policies the engine applies: retries)
        mark = ("looked_up", id(self))
        if memo is None or memo.get(mark) != keys.memory:
            # One lookup per call, as the engine's cache makes: a retried attempt missed already.
            found, value = self.cache.lookup(keys.memory, keys.durable, self._fits, self._label)
            if found:
                _note_hit()
                return True, value, None
            if memo is not None:
                memo[mark] = keys.memory

        def store(out: Any) -> None:
            if memo is not None:
                memo.pop(mark, None)  # (stored: a next call of the same inputs looks it up)
            if keys.after_call():
                self.cache.store(keys.memory, keys.durable, out, "", self._label)

        return False, None, store

    def _storable(self, out: Any) -> bool:
        """Not an output that reports an error in its error field (a ``StandardStage``'s ``error``)."""
        from stageflow.engine.guarded import reported_error

        module = self.module
        while isinstance(module, Stage):
            module = module.module
        field = getattr(module, "stageflow_error_field", None)
        return not (isinstance(field, str) and reported_error(out, field))

    def _fits(self, value: Any) -> str | None:
        """Why a persistent entry cannot be this stage's output (``None``: it can)."""
        outputs = self.ports.outputs
        single = outputs is not None and len(outputs) == 1 and isinstance(self.module, FunctionStage)
        return output_problem(value, outputs, single)

    def forward(self, **kwargs: Any) -> Any:
        """Called on its own (outside a pipeline): the same cache, keyed under path ``""``."""
        if self.policy is not None and _unapplied(self):  # (other policies too: the engine's cache
            from stageflow.patterns.solo import call_alone  # never keeps a fallback's output)

            return call_alone(self, kwargs, how="cached")
        hit, value, store = self._begin(kwargs)
        if hit:
            return value
        flags, token = watch_degraded()
        try:
            out = super().forward(**kwargs)
        finally:
            end_watch(flags, token)
        if store is not None and not flags and self._storable(out):  # (never a fallback's, a
            store(out)  # recovery's or a skip's output, nor one that reports an error)
        return out

    async def aforward(self, **kwargs: Any) -> Any:
        """Async twin of :meth:`forward` (the same cache)."""
        if _sync_only(type(self)):  # (a subclass of yours with its own forward only: it runs)
            from stageflow.engine.concurrency import to_thread

            return await to_thread(type(self).forward, self, **kwargs)
        if self.policy is not None and _unapplied(self):
            from stageflow.patterns.solo import acall_alone

            return await acall_alone(self, kwargs, how="cached")
        hit, value, store = self._begin(kwargs)
        if hit:
            return value
        flags, token = watch_degraded()
        try:
            out = await super().aforward(**kwargs)
        finally:
            end_watch(flags, token)
        if store is not None and not flags and self._storable(out):
            store(out)
        return out


def _note_hit() -> None:
    """A hit of a ``CachedStage`` called from a stage's code joins that pipeline run's events, as
    the engine's cache hits do (``result.run.events``, the stage's usage)."""
    from stageflow.policies.recovery import PolicyEvent
    from stageflow.usage import calling_stage, note_policy_event

    caller = calling_stage()
    if caller is None:
        return
    table, local = caller[0], caller[1]
    if table.events is not None:
        table.events.append(PolicyEvent(f"{table.prefix}.{local}" if table.prefix else local, "cache_hit"))
    note_policy_event("cache_hit")


def _flatten(underlying: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``CachedStage(Stage(x, inputs=..., writes=...))`` caches ``x`` with the same renames and
    declarations, so a pipeline calls it once, under one cache, instead of a wrapper in a wrapper."""
    if type(underlying) is not Stage or underlying.policy is not None or options:
        return underlying, options
    inner = underlying.module
    base, declared = describe(inner), underlying.inner_ports
    flat: dict[str, Any] = {"inputs": underlying.input_map, "outputs": underlying.output_map}
    if (declared.required, declared.optional, declared.accepts_any) != (
        base.required,
        base.optional,
        base.accepts_any,
    ):
        flat["reads"] = list(declared.required)
    if declared.outputs is not None and declared.outputs != base.outputs:
        flat["writes"] = list(declared.outputs)
    return inner, flat
