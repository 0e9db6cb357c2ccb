"""Errors raised by stageflow.

Every error stageflow raises derives from :class:`StageflowError` and carries
structured fields next to its message, so callers can branch on them instead of
parsing text::

    StageflowError                 root; .stage_path, .field, .code, .hint
    ├── ContractError              a stage's inputs/outputs do not line up (before any work, or at a boundary)
    ├── ConfigurationError         a constructor argument, option or definition is invalid
    ├── RoutingError               a router picked a branch that does not exist
    │                              (these three are also ValueErrors, as in the tutorial)
    ├── StageError                 a stage raised; the original exception is ``__cause__``
    │   ├── StageTimeoutError      a stage ran past its TimeoutPolicy (also a ``TimeoutError``)
    │   └── LowConfidenceError     a stage declared its answer too unsure to use (non-critical)
    ├── PipelineError              a pipeline could not finish (e.g. every branch failed)
    ├── LoopLimitError             an iterative pipeline hit ``max_iterations`` and was told to raise
    └── BudgetExceeded             an LM call was refused: a budget (calls, tokens, cost, time) is spent

Messages follow one recipe: what failed, where (stage path, field), what exists,
and the call that fixes it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BudgetExceeded",
    "ConfigurationError",
    "ContractError",
    "LoopLimitError",
    "LowConfidenceError",
    "PipelineError",
    "RoutingError",
    "StageError",
    "StageTimeoutError",
    "StageflowError",
    "error_text",
]


def error_text(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in naming the failure when the exception's own ``__str__`` raises
    (the error being reported must not be replaced by that one).

    >>> class Mute(Exception):
    ...     def __str__(self) -> str:
    ...         raise RuntimeError
    >>> error_text(ValueError("bad")), error_text(Mute())
    ('bad', '<Mute: its text could not be made (RuntimeError)>')
    """
    try:
        return str(exc)
    except Exception as failure:
        return f"<{type(exc).__name__}: its text could not be made ({type(failure).__name__})>"


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
    #: ``True`` for a contract error the run itself caused (a stage expected to write a field ran
    #: and did not, failed or was skipped), whatever the caller passed: the command line exits 1.
    run_failure = False
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


class ContractError(StageflowError, ValueError):
    """A stage's declared inputs or outputs do not line up with what is available.

    Also a ``ValueError``, as the pydantic validation errors of the tutorial's contracts are."""

    default_code = "contract"


class ConfigurationError(StageflowError, ValueError):
    """An invalid constructor argument, option name or pipeline definition (also a ``ValueError``,
    which the tutorial's classes raise for these)."""

    default_code = "configuration"


class RoutingError(StageflowError, ValueError):
    """A router chose a branch that does not exist and no default was given (also a ``ValueError``,
    as the tutorial's ``Unknown branch`` error is)."""

    default_code = "unknown_branch"


class StageError(StageflowError):
    """A stage raised an exception; the original is attached as ``__cause__``."""

    default_code = "stage_failed"
    #: Made by the engine around what a stage raised (not one a stage raised itself).
    wraps_stage_exception = False


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


class BudgetExceeded(StageflowError):  # noqa: N818 (the name the issue and users ask for)
    """An LM call was refused because a budget (:func:`stageflow.budget`, ``Stage(x, budget=...)``,
    ``pipeline.set_budget(...)``) cannot afford it.

    The message names the stage (once the error leaves it), the budget and which limit, what was
    spent against the limit, and the fix. Not retryable: a :class:`~stageflow.RetryPolicy` gives up
    at once, ``Stage(x, skip_on=[BudgetExceeded])`` skips an optional stage instead.

    Attributes:
        limit_name: ``"max_calls"``, ``"max_tokens"``, ``"max_cost"`` or ``"max_seconds"``.
        spent: What the budget had used when the call was refused (calls, tokens, dollars, seconds).
        limit: The limit.
        needed: What the refused call would have reserved (``0`` for ``max_seconds``).
        scope: Which budget refused (``"stageflow.budget()"``, ``"the run's budget"``, ...).
        ledger: The :class:`~stageflow.BudgetLedger` that refused (its spending so far).
        held: What the LM call this one was made inside holds of the limit (a router LM's call,
            which settles only after its inner calls): ``0`` for a call made outside any other.
        stuck: What other calls hold that are waiting, like this one, for calls made inside them
            (routers side by side at the end of a budget): refused so that they can go on.

    Examples:
        >>> err = BudgetExceeded.refused("max_calls", spent=3, limit=3, needed=1, scope="stageflow.budget()")
        >>> print(err.with_path_prefix("stages[1]"))  # doctest: +NORMALIZE_WHITESPACE
        Stage 'stages[1]' was refused an LM call: stageflow.budget() has spent its max_calls
        (3 of max_calls=3 LM calls used; this call needs 1 more).
        Fix: raise max_calls, declare a degradation (LMBudget(..., degrade=stageflow.Degrade(lm=...))),
        or let an optional stage be skipped: Stage(x, skip_on=[stageflow.BudgetExceeded])
    """

    default_code = "budget_exceeded"

    limit_name: str = ""
    spent: float = 0
    limit: float = 0
    needed: float = 0
    held: float = 0
    stuck: float = 0
    scope: str = ""
    ledger: Any = None

    @classmethod
    def refused(
        cls,
        limit_name: str,
        *,
        spent: float,
        limit: float,
        needed: float,
        scope: str,
        ledger: Any = None,
        stage_path: str | None = None,
        held: float = 0,
        stuck: float = 0,
    ) -> BudgetExceeded:
        """Build the error for a refused call (the message is composed from these fields)."""
        err = cls("", stage_path=stage_path, field=limit_name, hint=_budget_hint(limit_name))
        err.limit_name, err.spent, err.limit, err.needed, err.scope = limit_name, spent, limit, needed, scope
        err.ledger, err.held, err.stuck = ledger, held, stuck
        err._compose()
        return err

    def _compose(self) -> None:
        who = (
            f"Stage '{self.stage_path}' was refused an LM call"
            if self.stage_path
            else "An LM call was refused"
        )
        verb = "cannot hold it within" if self.limit_name == "max_tokens" else "has spent"
        inside = (
            f"; the LM call it was made inside holds {_amount(self.limit_name, self.held)} more until "
            "it returns, so this call cannot wait for it"
            if self.held
            else ""
        )
        if self.stuck:
            stuck = _amount(self.limit_name, self.stuck)
            inside += (
                f"; LM calls waiting inside other LM calls like it hold {stuck} more, and nothing "
                "else in flight could free room"
            )
        self.message = (
            f"{who}: {self.scope} {verb} its {self.limit_name} "
            f"({_spent_text(self.limit_name, self.spent, self.limit, self.needed)}{inside})."
        )
        self.args = (self.message,)

    def with_path_prefix(self, prefix: str) -> StageflowError:
        """Prepend an enclosing stage path and name it in the message."""
        super().with_path_prefix(prefix)
        self._compose()
        return self


def _budget_hint(limit_name: str) -> str:
    smaller = (
        "give the LM a smaller max_tokens (a call holds its prompt plus that until it reports), "
        if limit_name == "max_tokens"
        else ""
    )
    return (
        f"raise {limit_name}, {smaller}declare a degradation "
        "(LMBudget(..., degrade=stageflow.Degrade(lm=...))), "
        "or let an optional stage be skipped: Stage(x, skip_on=[stageflow.BudgetExceeded])"
    )


def _amount(limit_name: str, value: float) -> str:
    if limit_name == "max_cost":
        return f"{value:.4f}"
    if limit_name == "max_tokens":
        return f"{value:,.0f} tokens"
    return f"{value:,.0f} LM call" + ("" if value == 1 else "s")


def _spent_text(limit_name: str, spent: float, limit: float, needed: float) -> str:
    if limit_name == "max_seconds":
        return f"{spent:.1f} s of max_seconds={limit:g} have passed; no LM call starts after that"
    if limit_name == "max_cost":
        more = f"; this call may cost up to {needed:.4f} more" if needed else ""
        return f"{spent:.4f} of max_cost={limit:g} spent{more}"
    if limit_name == "max_tokens":
        return (
            f"{spent:,.0f} of max_tokens={limit:,.0f} tokens used; this call would hold {needed:,.0f} "
            "until it reports its usage: its prompt (estimated) plus room for the answer — the LM's "
            "max_tokens when the model stops there, else LMBudget's default_max_tokens (4,096 unless "
            "set), more once the model's answers have been seen to use more"
        )
    return f"{spent:,.0f} of {limit_name}={limit:,.0f} LM calls used; this call needs {needed:,.0f} more"
