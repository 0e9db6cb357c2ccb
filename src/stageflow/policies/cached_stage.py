"""``CachedStage``: the tutorial's caching wrapper, on stageflow's cache policy."""

from __future__ import annotations

import os
from typing import Any

from stageflow.policies.cache import CachePolicy, MemoryStore, is_collecting_traces, make_key
from stageflow.stages import Stage

__all__ = ["CachedStage"]


class CachedStage(Stage):
    """Cache a stage's outputs by its inputs (a true LRU; thread-safe).

    Args:
        underlying_stage: Any stage (module or function).
        cache_size: Entries kept in memory (least recently *used* evicted first).
        persist_to: A SQLite file: hits survive across processes; writes happen in the background.
        **stage_options: Anything :class:`Stage` takes (renames, other policies).

    Examples:
        >>> import stageflow
        >>> calls = []
        >>> square = stageflow.CachedStage(stageflow.stage(lambda x: calls.append(x) or {"y": x * x},
        ...                                                writes=["y"]))
        >>> p = stageflow.SequentialPipeline([square])
        >>> [p(x=3).y, p(x=3).y, p(x=4).y], calls
        ([9, 9, 16], [3, 4])
        >>> square.get_cache_stats()["hits"]
        1
    """

    def __init__(
        self,
        underlying_stage: Any,
        cache_size: int = 1000,
        *,
        persist_to: str | os.PathLike[str] | None = None,
        **stage_options: Any,
    ) -> None:
        persistent = None
        if persist_to is not None:
            from stageflow.policies.stores import SQLiteStore

            persistent = SQLiteStore(persist_to)
        super().__init__(
            underlying_stage, cache=CachePolicy(MemoryStore(cache_size), persistent), **stage_options
        )

    @property
    def cache(self) -> CachePolicy:
        """The cache policy (memory LRU and optional persistent store)."""
        return self.policy.cache  # type: ignore[no-any-return]

    def get_cache_stats(self) -> dict[str, Any]:
        """``{"hits", "misses", "hit_rate", "size", ...}``."""
        return self.cache.stats()

    def clear_cache(self) -> None:
        """Drop every cached entry (memory and persistent)."""
        self.cache.memory.clear()
        if self.cache.persistent is not None:
            self.cache.persistent.clear()

    def forward(self, **kwargs: Any) -> Any:
        """Called on its own (outside a pipeline): the same cache, keyed under path ``""``."""
        if is_collecting_traces():
            return super().forward(**kwargs)
        key, durable = make_key("", self.module, kwargs)
        found, value = self.cache.lookup(key, durable)
        if found:
            return value
        out = super().forward(**kwargs)
        from stageflow.engine.guarded import outputs_of

        self.cache.store(key, durable, outputs_of(out))
        return out
