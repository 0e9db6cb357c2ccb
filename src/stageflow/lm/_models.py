"""The process-wide registry of loaded llama.cpp models, and the thread-count default.

Weights load once per process, path, context size and thread count; every engine (and every copy of
an LM or program) on those settings shares the :class:`LoadedModel`, its lock and its prefix cache.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError
from stageflow.lm.prefix import PrefixCache, supports_snapshots

__all__ = ["THREADS_ENV", "LoadedModel", "default_threads", "load_model"]

logger = logging.getLogger(__name__)

THREADS_ENV = "STAGEFLOW_LM_THREADS"


def default_threads() -> int:
    """Threads for llama.cpp: ``$STAGEFLOW_LM_THREADS``, else one fewer than the usable cores (1..4)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigurationError(
                f"${THREADS_ENV} must be a positive integer, got {raw!r}.",
                code="bad_setting",
                hint=f"set e.g. {THREADS_ENV}=1, or unset it to use cores - 1",
            )
        return value
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, min(4, cores - 1))


@dataclass
class LoadedModel:
    """One llama.cpp context. ``lock`` must be held for every use of ``llama`` and ``prefix``.

    ``snapshots`` says whether ``prefix`` can snapshot this context (a real llama-cpp-python
    ``Llama`` of the pinned version); without it every call runs as plain llama.cpp would.
    """

    llama: Any
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    prefix: PrefixCache = field(default_factory=PrefixCache)
    snapshots: bool = False


# Keyed by process id too: a forked child must not reuse its parent's llama context (or a lock the
# parent held at fork time).
_MODELS: dict[tuple[int, str, int, int], LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


@atexit.register
def _close_models() -> None:
    """Free every llama.cpp context before the interpreter tears modules down (llama-cpp-python's
    own finaliser fails once its globals are gone, printing a stray traceback at exit)."""
    with _MODELS_LOCK:
        models = list(_MODELS.values())
        _MODELS.clear()
    for loaded in models:
        with loaded.lock, contextlib.suppress(Exception):
            loaded.llama.close()


def load_model(path: Path, n_ctx: int, n_threads: int) -> LoadedModel:
    """The loaded model for these settings, loading it on first use.

    Raises:
        ConfigurationError: llama.cpp cannot load the file.
    """
    key = (os.getpid(), str(path), n_ctx, n_threads)
    with _MODELS_LOCK:
        loaded = _MODELS.get(key)
        if loaded is not None:
            return loaded
        from llama_cpp import Llama

        started = time.perf_counter()
        try:
            llama = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigurationError(
                f"llama.cpp could not load the model {path}: {exc}",
                code="bad_model_file",
                hint="check that the file is a complete GGUF model supported by llama-cpp-python 0.3.36",
            ) from exc
        snapshots = supports_snapshots(llama)
        if not snapshots:
            logger.warning("this llama-cpp-python has no sequence snapshots: the prefix cache is off")
        loaded = LoadedModel(llama=llama, load_seconds=time.perf_counter() - started, snapshots=snapshots)
        _MODELS[key] = loaded
        return loaded
