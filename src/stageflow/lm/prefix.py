"""One prompt-prefix cache per predictor for an in-process llama.cpp context.

llama.cpp reuses the key/value cache only for the prompt prefix shared with the *previous* call on
the same context. A program whose predictors alternate (decompose, extract, extract, synthesize)
therefore re-processes each predictor's system prompt and demos on every call: measured with
SmolLM2-135M on 2 cores, 4-8 ms per prompt token instead of about 1.

:class:`PrefixCache` keeps a snapshot of the context's sequence (its KV cells and the tokens they
hold) for each recently used *prefix key*, i.e. each distinct chat history before the final user
message (system prompt + demos: one key per predictor). Before a call whose key differs from the
live one, the live sequence is saved under its key and the new key's snapshot, if any, is restored;
llama-cpp-python's own longest-prefix match then re-uses it. Snapshots are the sequence's exact
bytes (``llama_state_seq_get_data``), so outputs are byte for byte those of a context that kept the
prefix all along (checked by ``tests/lm/test_lm_prefix_integration.py``).

Measured alternatives on the same machine: ``Llama.save_state`` copies the whole context including
a 100 MB logits buffer (~110 ms per switch), and one ``Llama`` per predictor costs a model load and
~200 MB per context for the same prompt speed. A sequence snapshot costs a few ms and about 23 KB
per token for SmolLM2-135M.

The caller must hold the model's lock around :meth:`PrefixCache.activate` and the generation that
follows: a llama context is not thread-safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_PREFIX_SLOTS",
    "PrefixCache",
    "Snapshot",
    "prefix_key",
    "restore_sequence",
    "save_sequence",
    "supports_snapshots",
]

logger = logging.getLogger(__name__)

#: Snapshots kept per loaded model (least recently used dropped first). A snapshot of a 400-token
#: prompt of SmolLM2-135M takes about 9 MB.
DEFAULT_PREFIX_SLOTS = 8

_SEQ = 0  # llama-cpp-python runs every generation on sequence 0


@dataclass(frozen=True)
class Snapshot:
    """The saved state of sequence 0: the tokens it holds and their KV cells (opaque bytes)."""

    tokens: Sequence[int]
    data: Any
    size: int

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def prefix_key(messages: Sequence[dict[str, str]]) -> str | None:
    """The cache key of a chat request: a digest of every message but the last, or ``None`` for a
    single-message request (nothing stable to keep).

    Examples:
        >>> system = {"role": "system", "content": "Be terse."}
        >>> a = prefix_key([system, {"role": "user", "content": "Q1"}])
        >>> a == prefix_key([system, {"role": "user", "content": "Q2"}])
        True
        >>> prefix_key([{"role": "user", "content": "Q1"}]) is None
        True
    """
    if len(messages) < 2:
        return None
    text = json.dumps(list(messages[:-1]), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def supports_snapshots(llama: Any) -> bool:
    """``True`` for a llama-cpp-python ``Llama`` with the internals snapshots rely on (0.3.36).

    ``_requires_eval`` matters most: it makes llama-cpp-python re-decode one token after a restore
    instead of sampling from logits left by another prompt.
    """
    return all(hasattr(llama, name) for name in ("_ctx", "input_ids", "n_tokens", "_requires_eval"))


def save_sequence(llama: Any) -> Snapshot:
    """Copy sequence 0 of ``llama``'s context (KV cells + token ids).

    Raises:
        RuntimeError: llama.cpp copied nothing.
    """
    import llama_cpp

    ctx = llama._ctx.ctx
    size = int(llama_cpp.llama_state_seq_get_size(ctx, _SEQ))
    buffer = (ctypes.c_uint8 * size)()
    written = int(llama_cpp.llama_state_seq_get_data(ctx, buffer, size, _SEQ))
    if written <= 0 or written > size:
        raise RuntimeError(f"llama_state_seq_get_data copied {written} of {size} bytes")
    return Snapshot(tokens=llama.input_ids[: llama.n_tokens].copy(), data=buffer, size=written)


def restore_sequence(llama: Any, snapshot: Snapshot) -> None:
    """Replace sequence 0 of ``llama``'s context with ``snapshot``.

    Raises:
        RuntimeError: llama.cpp refused the data; the context is then left empty (a correct, cold
            state: the next call processes its whole prompt).
    """
    import llama_cpp

    llama._ctx.kv_cache_seq_rm(_SEQ, 0, -1)
    llama.n_tokens = 0
    llama._requires_eval = True
    loaded = int(llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, snapshot.data, snapshot.size, _SEQ))
    if loaded != snapshot.size:
        llama._ctx.kv_cache_seq_rm(_SEQ, 0, -1)
        raise RuntimeError(f"llama_state_seq_set_data loaded {loaded} of {snapshot.size} bytes")
    n = snapshot.n_tokens
    llama.input_ids[:n] = snapshot.tokens
    llama.n_tokens = n


class PrefixCache:
    """Snapshots of a llama context, one per prefix key, least recently used dropped first.

    Args:
        save, restore: How to snapshot and restore a context (the llama.cpp functions by default;
            tests pass fakes).

    Attributes:
        current: The key whose prompt the live context holds (``None``: unknown).
        saves, restores, failures: Counters, for benchmarks and tests.
    """

    def __init__(
        self,
        save: Callable[[Any], Snapshot] = save_sequence,
        restore: Callable[[Any, Snapshot], None] = restore_sequence,
    ) -> None:
        self._save = save
        self._restore = restore
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self.current: str | None = None
        self.saves = 0
        self.restores = 0
        self.failures = 0

    def __len__(self) -> int:
        return len(self._snapshots)

    def keys(self) -> list[str]:
        """Keys with a stored snapshot, least recently used first."""
        return list(self._snapshots)

    def activate(self, llama: Any, key: str | None, slots: int) -> None:
        """Prepare ``llama`` for a call whose prompt has prefix ``key``.

        With ``slots <= 0`` or no key the context is left alone (plain llama.cpp behaviour: reuse of
        the previous call's prefix only) and the live key becomes unknown.
        """
        if slots <= 0 or key is None:
            self.current = None
            return
        if key == self.current:
            return
        if self.current is not None and llama.n_tokens > 0:
            try:
                self._snapshots[self.current] = self._save(llama)
                self._snapshots.move_to_end(self.current)
                self.saves += 1
            except RuntimeError as exc:  # the live context is still intact: just don't keep it
                self.failures += 1
                logger.debug("prefix cache: could not save a snapshot (%s)", exc)
        snapshot = self._snapshots.pop(key, None)
        if snapshot is not None:
            try:
                self._restore(llama, snapshot)
                self.restores += 1
            except RuntimeError as exc:
                self.failures += 1
                logger.debug("prefix cache: could not restore a snapshot (%s); prompt runs cold", exc)
        while len(self._snapshots) > slots:
            self._snapshots.popitem(last=False)
        self.current = key

    def clear(self) -> None:
        """Drop every snapshot (the live context is left as it is)."""
        self._snapshots.clear()
        self.current = None
