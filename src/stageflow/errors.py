"""Errors raised by stageflow.

Every error stageflow raises derives from :class:`StageflowError` and carries
structured fields next to its message, so callers can branch on them instead of
parsing text::

    StageflowError                 root; .stage_path, .field, .code, .hint
    ├── ContractError              a stage's inputs/outputs do not line up (before any work, or at a boundary)
    ├── ConfigurationError         a constructor argument, option or definition is invalid
    ├── RoutingError               a router picked a branch that does not exist
    ├── StageError                 a stage raised; the original exception is ``__cause__``
    │   ├── StageTimeoutError      a stage ran past its TimeoutPolicy (also a ``TimeoutError``)
    │   └── LowConfidenceError     a stage declared its answer too unsure to use (non-critical)
    ├── PipelineError              a pipeline could not finish (e.g. every branch failed)
    └── LoopLimitError             an iterative pipeline hit ``max_iterations`` and was told to raise

Messages follow one recipe: what failed, where (stage path, field), what exists,
and the call that fixes it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "ContractError",
    "LoopLimitError",
    "LowConfidenceError",
    "PipelineError",
    "RoutingError",
    "StageError",
    "StageTimeoutError",
    "StageflowError",
]


class StageflowError(Exception):
    """Root of every error stageflow raises.

    Args:
        message: What failed and why, in one readable paragraph.
        stage_path: The DSPy-style path of the stage involved (``stages[1].predict``), if any.
        field: The state or signature field involved, if any.
        code: A stable machine-readable code; defaults to the class's ``default_code``.
        hint: How to fix it; appended to the message.
    """

    default_code = "stageflow_error"

    def __init__(
        self,
        message: str,
        *,
        stage_path: str | None = None,
        field: str | None = None,
        code: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.stage_path = stage_path
        self.field = field
        self.code = code or self.default_code
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        text = self.message
        if self.hint:
            text = f"{text}\nFix: {self.hint}"
        return text

    #: ``True`` once ``stage_path`` is relative to the outermost running pipeline.
    path_is_full = False
    #: What policies did in the failed run before the error (retries, timeouts...).
    events: list[Any] | None = None
    #: The run so far (a :class:`~stageflow.RunInfo`: the stages that ran, their outputs, details),
    #: set on an error that leaves a pipeline call.
    run: Any = None
    #: The exception a recovery strategy raised while handling this error, if one did.
    recovery_error: BaseException | None = None

    def with_path_prefix(self, prefix: str) -> StageflowError:
        """Prepend an enclosing stage path (used as errors bubble out of nested pipelines).

        Quoted stage paths in the message and hint that start with the old path are prefixed too,
        so the text names the same stages as ``stage_path``.
        """
        if not prefix:
            return self
        if self.stage_path:
            old = self.stage_path
            self.stage_path = f"{prefix}.{old}"
            self.message = self.message.replace(f"'{old}", f"'{prefix}.{old}")
            if self.hint:
                self.hint = self.hint.replace(f"'{old}", f"'{prefix}.{old}")
        else:
            self.stage_path = prefix
        self.args = (self.message,)
        return self


class ContractError(StageflowError):
    """A stage's declared inputs or outputs do not line up with what is available."""

    default_code = "contract"


class ConfigurationError(StageflowError):
    """An invalid constructor argument, option name or pipeline definition."""

    default_code = "configuration"


class RoutingError(StageflowError):
    """A router chose a branch that does not exist and no default was given."""

    default_code = "unknown_branch"


class StageError(StageflowError):
    """A stage raised an exception; the original is attached as ``__cause__``."""

    default_code = "stage_failed"


class PipelineError(StageflowError):
    """A pipeline could not finish.

    ``errors`` holds each branch's exception when a fan-out failed as a whole (by stage path for
    parallel groups and ensembles, in item order for ForEach).
    """

    default_code = "pipeline_failed"

    def __init__(self, message: str, *, errors: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.errors = errors


class LoopLimitError(StageflowError):
    """An iterative pipeline reached ``max_iterations`` without its stopping condition firing."""

    default_code = "loop_limit"


class StageTimeoutError(StageError, TimeoutError):
    """A stage ran longer than its :class:`~stageflow.TimeoutPolicy` allows.

    It is also a ``TimeoutError``, so ``except TimeoutError`` and the default retry and
    non-critical classifications treat it as a timeout.
    """

    default_code = "stage_timeout"


class LowConfidenceError(StageError):
    """Raise it from a stage whose answer is too unsure to use.

    :class:`~stageflow.ErrorHandlingPipeline` treats it as non-critical by default: the stage is
    skipped, the error is logged, and the run goes on.
    """

    default_code = "low_confidence"
