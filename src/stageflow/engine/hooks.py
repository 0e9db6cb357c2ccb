"""Engine hooks: the one place observers (profiling, tracing, policies) attach.

A hook is an object with any of these methods; all arguments are keyword-only and every
method accepts ``**future`` so new arguments can be added without breaking hooks:

- ``on_run_start(*, path, pipeline, inputs)`` / ``on_run_end(*, path, pipeline, outputs, error, elapsed)``
- ``before_stage(*, path, stage, inputs)``
- ``after_stage(*, path, stage, inputs, outputs, elapsed)``
- ``on_stage_error(*, path, stage, inputs, error, elapsed)`` — also for a stage stopped from
  outside (its task cancelled by a fail-fast fan-out, an ensemble's quorum or a timeout, an
  interrupt, or an LM call of it refused because its caller gave up), then with ``cancelled=True``
  and the ``CancelledError`` / ``KeyboardInterrupt`` as ``error`` (observers count it by that
  flag). A sync branch on a thread cannot be stopped: when a fan-out abandons it, its stage reports
  its end (``after_stage`` / ``on_stage_error``) when its thread finishes.

``path`` is the full DSPy-style stage path from the outermost running pipeline
(``stages[1].branches['math']``); a pipeline's own run has the path of the stage that holds it
(``""`` for the outermost). Hooks are active for every pipeline that runs inside
:func:`attach_hooks`, across threads and tasks that copy the context, or in the whole process once
installed with :func:`install_hook`. A hook that raises is
logged and ignored: an observer never breaks a run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from stageflow.engine.carry import carried, publish

__all__ = [
    "Hook",
    "active_hooks",
    "attach_hooks",
    "context_hooks",
    "current_path",
    "global_hooks",
    "install_hook",
    "uninstall_hook",
]

logger = logging.getLogger("stageflow")


class Hook:
    """Base class with no-op methods; subclass and override what you need."""

    def on_run_start(self, *, path: str, pipeline: Any, inputs: dict[str, Any], **future: Any) -> None:
        """A pipeline call starts."""

    def on_run_end(
        self,
        *,
        path: str,
        pipeline: Any,
        outputs: dict[str, Any] | None,
        error: BaseException | None,
        elapsed: float,
        **future: Any,
    ) -> None:
        """A pipeline call ends (``error`` is set when it raised)."""

    def before_stage(self, *, path: str, stage: Any, inputs: dict[str, Any], **future: Any) -> None:
        """A stage is about to run with ``inputs``."""

    def after_stage(
        self, *, path: str, stage: Any, inputs: dict[str, Any], outputs: Any, elapsed: float, **future: Any
    ) -> None:
        """A stage returned ``outputs`` after ``elapsed`` seconds."""

    def on_stage_error(
        self,
        *,
        path: str,
        stage: Any,
        inputs: dict[str, Any],
        error: BaseException,
        elapsed: float,
        **future: Any,
    ) -> None:
        """A stage raised ``error`` (``future["cancelled"]`` is ``True`` when it was stopped from
        outside)."""


_HOOKS: ContextVar[tuple[Any, ...]] = carried(ContextVar("stageflow_hooks", default=()))
_PATH: ContextVar[str] = ContextVar("stageflow_path", default="")


class _EnginePath(str):
    """The full path of a nested pipeline as the engine sets it in ``_PATH`` just before calling that
    pipeline (``target``), with the usage table in force then (``table``): a call of ``target`` that
    finds both is the engine's; one made from inside ``target``'s own run (a stage of it calling it
    again) finds that run's table instead, and is the stage's own call."""

    target: Any
    table: Any

    def __reduce__(self) -> Any:  # (copied or pickled, it is the path only)
        return (str, (str(self),))


def _engine_path(path: str, target: Any, table: Any) -> _EnginePath:
    marked = _EnginePath(path)
    marked.target = target
    marked.table = table
    return marked


# Hooks installed for the whole process (instrumentation), before the context's own.
_GLOBAL: list[tuple[Any, ...]] = [()]
_GLOBAL_LOCK = threading.Lock()


def active_hooks() -> tuple[Any, ...]:
    """The hooks active in the current context (process-wide ones first)."""
    return _GLOBAL[0] + _HOOKS.get()


def context_hooks() -> tuple[Any, ...]:
    """The hooks active in the current context, without the process-wide ones."""
    return _HOOKS.get()


def global_hooks() -> tuple[Any, ...]:
    """The hooks installed for the whole process with :func:`install_hook`."""
    return _GLOBAL[0]


def install_hook(hook: Any) -> None:
    """Activate ``hook`` for every pipeline run in the process, in every thread (instrumentation
    such as OpenTelemetry). Installing the same hook twice has no further effect."""
    with _GLOBAL_LOCK:
        if not any(h is hook for h in _GLOBAL[0]):
            _GLOBAL[0] = (*_GLOBAL[0], hook)


def uninstall_hook(hook: Any) -> None:
    """Remove a hook installed with :func:`install_hook` (no error if it was not)."""
    with _GLOBAL_LOCK:
        _GLOBAL[0] = tuple(h for h in _GLOBAL[0] if h is not hook)


def current_path() -> str:
    """The full path of the stage being run, when hooks are active (else ``""``)."""
    return _PATH.get()


@contextlib.contextmanager
def attach_hooks(*hooks: Any) -> Iterator[None]:
    """Activate ``hooks`` for every pipeline run inside the block (nested runs included)."""
    token = _HOOKS.set(_HOOKS.get() + hooks)
    try:
        with publish():  # pipelines that DSPy's worker threads run (dspy.Evaluate...) see them too
            yield
    finally:
        _HOOKS.reset(token)


def notify(hooks: tuple[Any, ...], method: str, **kwargs: Any) -> None:
    """Call ``method`` on every hook that has it; log and swallow hook failures."""
    for hook in hooks:
        fn = getattr(hook, method, None)
        if fn is None:
            continue
        try:
            fn(**kwargs)
        except Exception:
            logger.warning("stageflow hook %r failed in %s", hook, method, exc_info=True)
