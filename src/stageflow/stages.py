"""Stages: any ``dspy.Module`` or plain function, with declared inputs and outputs.

A stage is the unit a pipeline runs. stageflow reads what a stage needs and what it
produces from, in order of precedence:

1. ``reads=`` / ``writes=`` given to :class:`Stage` or :func:`stage`;
2. the DSPy signature of a ``dspy.Predict`` (or ``ChainOfThought``, which adds ``reasoning``);
3. the parameters of a module's ``forward`` or of a function (no default = required), and a
   function's return annotation when it is a ``TypedDict`` or a pydantic model.

:class:`Stage` renames fields at the boundary: ``inputs={"stage_field": "state_field"}`` and
``outputs={"stage_field": "state_field"}``.

Examples:
    >>> import stageflow
    >>> @stageflow.stage(writes=["shout"])
    ... def upper(text: str) -> dict:
    ...     return {"shout": text.upper()}
    >>> upper.ports.required, upper.ports.outputs
    (('text',), ('shout',))
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import importlib
import inspect
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, overload

import dspy

from stageflow._returns import none_is_wrong
from stageflow.errors import ConfigurationError, ContractError, StageError

if TYPE_CHECKING:
    import os

    from stageflow.budgets.spec import LMBudget
    from stageflow.policies.cache import CachePolicy
    from stageflow.policies.recovery import (
        Fallback,
        Recover,
        RepairPolicy,
        RetryPolicy,
        StagePolicy,
        TimeoutPolicy,
    )

__all__ = [
    "DEGRADED_KEY",
    "DeferredField",
    "ENGINE_CALLS",
    "FunctionStage",
    "POLICY_APPLIED",
    "applied_call_memo",
    "enter_applied",
    "end_watch",
    "leave_applied",
    "note_degraded",
    "watch_attempt",
    "watch_degraded",
    "left_to_engine",
    "own_call",
    "own_call_code",
    "bad_output_error",
    "check_given",
    "function_stage_in",
    "positional_error",
    "none_returned_error",
    "refuse_none",
    "held_to_outputs",
    "missing_output_error",
    "Ports",
    "RESERVED_FIELD_NAMES",
    "Stage",
    "declared_types",
    "degraded_watch",
    "describe",
    "stage",
    "wraps_function",
]

#: Field names that cannot be result fields: they collide with ``dspy.Prediction`` methods and
#: stageflow's result attributes, so ``result.<name>`` would not return the field.
RESERVED_FIELD_NAMES: frozenset[str] = frozenset(
    n for n in dir(dspy.Prediction) if not n.startswith("_")
) | frozenset({"run", "stage_outputs", "trace", "details"})


#: The :class:`Stage` whose policies the engine is applying around the current call (a subclass of
#: yours, called as a module): its ``forward`` then runs the stage as it is.
POLICY_APPLIED: contextvars.ContextVar[Any] = contextvars.ContextVar("stageflow_policy_applied", default=None)

#: The stage object a pipeline's engine is calling as one of its stages right now (a ``Stage``
#: subclass of yours, a ``Stage`` around a ``Stage``), handed down to the module it wraps while that
#: runs: the engine checks what they return when it merges it, so their own checks of their outputs
#: (:func:`held_to_outputs`, made when a stage is called on its own) stand aside.
ENGINE_CALLS: contextvars.ContextVar[Any] = contextvars.ContextVar("stageflow_engine_calls", default=None)

#: What stages keep for the length of a policy-applied call, whatever its attempts: a
#: ``CachedStage``'s cache lookup (its own call, or inside a ``Stage`` with ``retry=``), made on the
#: first attempt only.
_CALL_MEMO: contextvars.ContextVar[dict[Any, Any] | None] = contextvars.ContextVar(
    "stageflow_policy_call_memo", default=None
)


def enter_applied(stage: Any) -> tuple[contextvars.Token[Any], contextvars.Token[dict[Any, Any] | None]]:
    """The engine starts applying ``stage``'s policies around one call of it (see
    :data:`POLICY_APPLIED`); give the tokens to :func:`leave_applied` when the call ends."""
    return POLICY_APPLIED.set(stage), _CALL_MEMO.set({})


def leave_applied(tokens: tuple[contextvars.Token[Any], contextvars.Token[dict[Any, Any] | None]]) -> None:
    _CALL_MEMO.reset(tokens[1])
    POLICY_APPLIED.reset(tokens[0])


#: Set while a cache waits for a stage's output: whether a policy replaced a failure inside that
#: call (a fallback, a recovery, a skip), in the stage itself or in one it runs. Such an output
#: is never cached: it is not the answer the stage would have given.
_DEGRADED: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "stageflow_degraded", default=None
)


#: The key under which a cache's watch travels in DSPy's settings overrides, which DSPy copies into
#: the worker threads of ``dspy.Parallel`` (stageflow's context variables do not go there).
DEGRADED_KEY = "stageflow_degraded"


def degraded_watch() -> list[bool] | None:
    """The watch of the innermost cache waiting for a stage's output here (``None``: none is);
    in a ``dspy.Parallel`` worker thread, the one carried from the thread that started it."""
    flags = _DEGRADED.get()
    if flags is not None:
        return flags
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None:
        return None
    carried = settings_module.thread_local_overrides.get().get(DEGRADED_KEY)
    return carried if type(carried) is list else None


def note_degraded() -> None:
    """A policy replaced a failure with another output (fallback, recovery, skip) here."""
    flags = degraded_watch()
    if flags is not None:
        flags.append(True)


def watch_degraded() -> tuple[list[bool], contextvars.Token[list[bool] | None]]:
    """Start watching for :func:`note_degraded` in the call that follows; give both to
    :func:`end_watch`, then test the list (empty: nothing was replaced)."""
    from stageflow.usage import carry_into_parallel

    carry_into_parallel()  # (a fallback in a dspy.Parallel thread inside the call is seen too)
    flags: list[bool] = []
    return flags, _DEGRADED.set(flags)


def end_watch(flags: list[bool], token: contextvars.Token[list[bool] | None], used: bool = True) -> None:
    """End a watch. What was replaced inside counts for the caches around it only when the watched
    output is the one ``used`` (a failed attempt's output is dropped, and with it what was replaced
    inside it)."""
    _DEGRADED.reset(token)
    if used and flags:  # (a cache around this one must not keep it either)
        note_degraded()


def watch_attempt() -> tuple[list[bool], contextvars.Token[list[bool] | None]] | None:
    """Under a cache's watch, one attempt of a retried call watches on its own (end it with
    :func:`end_watch`, ``used`` or not); ``None`` when no cache is watching (nothing to do)."""
    if _DEGRADED.get() is None:
        return None
    flags: list[bool] = []
    return flags, _DEGRADED.set(flags)


def _module_runs(stage: Any) -> tuple[Any, Any]:
    """``stage``'s wrapped module starts running: what the engine applies is the stage's, so a call
    of the stage from inside its module (recursion) has its policies applied again; and when the
    engine is calling ``stage``, it checks the module's output too (:data:`ENGINE_CALLS`). Give the
    tokens to :func:`_module_done`."""
    applied = POLICY_APPLIED.set(None) if POLICY_APPLIED.get() is not None else None
    handed = ENGINE_CALLS.set(stage.module) if ENGINE_CALLS.get() is stage else None
    return applied, handed


def _module_done(tokens: tuple[Any, Any]) -> None:
    if tokens[0] is not None:
        POLICY_APPLIED.reset(tokens[0])
    if tokens[1] is not None:
        ENGINE_CALLS.reset(tokens[1])


def applied_call_memo() -> dict[Any, Any] | None:
    """The memo of the innermost policy-applied call running now (``None``: none is): what a stage
    inside it keeps across that call's attempts."""
    return _CALL_MEMO.get()


_CALLS = ("forward", "aforward", "__call__", "acall")


def own_call_code(cls: type) -> bool:
    """Whether a ``Stage`` class has call methods of its own (``forward``, ``aforward``,
    ``__call__``, ``acall`` from outside stageflow and DSPy): a subclass of yours."""
    for name in _CALLS:
        owner = next((c for c in cls.__mro__ if name in c.__dict__), None)
        module = getattr(owner, "__module__", "") or ""
        if not module.startswith(("stageflow.", "dspy.")) and owner is not object:
            return True
    return False


def _policies_around(own: Callable[..., Any]) -> Callable[..., Any]:
    """A ``__call__`` of yours on a ``Stage`` subclass, with the stage's policies applied around it
    when nothing else applies them (called on its own): a retry runs it again, as a pipeline does."""

    @functools.wraps(own)
    def call(self: Stage, *args: Any, **kwargs: Any) -> Any:
        if self.policy is not None and not args and _unapplied(self):
            from stageflow.patterns.solo import call_alone

            return call_alone(self, kwargs, how="call")
        out = own(self, *args, **kwargs)
        if inspect.iscoroutine(out):  # (an ``async def __call__``: run to its result, as acall awaits it)
            out = _to_result(out, f"{type(self).__name__}.__call__")
        return self.held(out)

    call.stageflow_own = own  # type: ignore[attr-defined]
    return call


def _apolicies_around(own: Callable[..., Any]) -> Callable[..., Any]:
    """Async twin of :func:`_policies_around`, for an ``acall`` of yours."""

    @functools.wraps(own)
    async def acall(self: Stage, *args: Any, **kwargs: Any) -> Any:
        if self.policy is not None and not args and _unapplied(self):
            from stageflow.patterns.solo import acall_alone

            return await acall_alone(self, kwargs, how="call")
        return self.held(await own(self, *args, **kwargs))

    acall.stageflow_own = own  # type: ignore[attr-defined]
    return acall


def own_call(cls: type, name: str) -> Callable[..., Any] | None:
    """The ``__call__`` / ``acall`` (``name``) of yours a ``Stage`` class runs, if it has one."""
    return getattr(getattr(cls, name, None), "stageflow_own", None)


def _sync_only(cls: type) -> bool:
    """Whether a ``Stage`` class has a ``forward`` of its own but takes ``aforward`` from stageflow:
    ``acall`` then runs that ``forward`` (on a worker thread), as it does for pipelines."""
    forward = next(c for c in cls.__mro__ if "forward" in c.__dict__)
    aforward = next(c for c in cls.__mro__ if "aforward" in c.__dict__)
    return not (forward.__module__ or "").startswith("stageflow.") and (aforward.__module__ or "").startswith(
        "stageflow."
    )


def _library(owner: type) -> bool:
    return (owner.__module__ or "").startswith(("stageflow.", "dspy.")) or owner is object


def _call_only(cls: type) -> bool:
    """Whether a ``Stage`` class has a ``__call__`` of yours (a function, or any callable a decorator
    put there) but takes ``acall`` and ``aforward`` from stageflow: ``acall`` then runs that
    ``__call__`` (on a worker thread; awaited, when it is ``async def``), since DSPy's ``acall`` would
    go to ``aforward`` and skip it (a different result under ``acall``)."""
    for name in ("__call__", "acall", "aforward"):
        owner = next(c for c in cls.__mro__ if name in c.__dict__)
        if _library(owner) != (name != "__call__"):
            return False
    return True


#: The stages whose ``__call__`` of yours ``acall`` is running now (on this thread or task): an
#: ``acall`` that code makes in turn (``asyncio.run(super().acall(...))``) takes stageflow's path.
_IN_OWN_CALL: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "stageflow_in_own_call", default=frozenset()
)


def _run_own_call(stage: Stage, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    token = _IN_OWN_CALL.set(_IN_OWN_CALL.get() | {id(stage)})
    try:
        return stage(*args, **kwargs)
    except StopIteration as e:  # (an asyncio future cannot hold it: the caller would wait forever)
        raise RuntimeError(f"{type(stage).__name__}.__call__ raised StopIteration") from e
    finally:
        _IN_OWN_CALL.reset(token)


def _to_result(awaitable: Any, what: str) -> Any:
    """An awaitable a sync call got from async code of yours (``what``), run to its result on
    stageflow's background event loop; refused on that loop itself, which would wait on itself."""
    from stageflow.engine.concurrency import on_background_loop, run_on_background_loop

    if on_background_loop():
        if inspect.iscoroutine(awaitable):
            awaitable.close()
        raise ConfigurationError(
            f"{what} is an async function called synchronously from stageflow's own event loop; "
            "call it with `await stage.acall(...)` instead.",
            code="async_in_sync",
        )
    return run_on_background_loop(awaitable)


def _signature_now(module: Any) -> Any:
    """The signature object a predictor (or a module around one) holds now; ``None`` for others."""
    if isinstance(module, dspy.Predict):
        return module.signature
    inner = getattr(module, "predict", None)
    return inner.signature if isinstance(inner, dspy.Predict) else None


def _own_code(call: Any) -> Any:
    """The function of yours behind ``__call__`` (through stageflow's policy wrapper)."""
    return getattr(call, "stageflow_own", call)


def _skipped_inside(stage: Stage) -> None:
    """The ``Stage`` that ``stage`` wraps gave ``None``: when its skip policy may have skipped it,
    say that the wrapper cannot be left out for it (a pipeline would only see ``None``)."""
    inner = stage.module
    policy = inner.policy
    if policy is None or not (policy.skip_on or policy.skip_if):
        return
    raise StageError(
        f"Stage({stage_label(inner.module)}) gave no result (its skip policy may have skipped it) "
        "inside the Stage that wraps it, which cannot be left out for it: only a pipeline that runs "
        "a stage can leave it out.",
        code="skipped_inside",
        hint="give skip_on to the outer Stage, or put the inner stage in the pipeline itself",
    )


def missing_output_error(where: str, name: str, returned: Any, stage_path: str) -> ContractError:
    """The :class:`~stageflow.ContractError` for a stage (``where``: how the message names it) that
    declares output ``name`` and returned only the fields ``returned``: one wording for a pipeline's
    checks and a stage's own."""
    return ContractError(
        f"{where} declares output '{name}' but did not return it. It returned: "
        f"{sorted(str(k) for k in returned)}.",
        stage_path=stage_path,
        field=name,
        code="missing_output",
        hint=f"return '{name}' from the stage, or fix its writes=[...] declaration",
    )


def bad_output_error(where: str, out: Any, fields: Sequence[str], stage_path: str) -> StageError:
    """The :class:`~stageflow.StageError` for a stage that declares ``fields`` and returned a value
    with no named fields."""
    return StageError(
        f"{where} returned {type(out).__name__}; expected fields {list(fields)}.",
        stage_path=stage_path,
        code="bad_output",
        hint="return a dict or dspy.Prediction with those fields",
    )


def none_returned_error(where: str, name: str, reason: str, stage_path: str) -> StageError:
    """The :class:`~stageflow.StageError` for a function stage with the single output ``name`` that
    returned ``None`` where ``None`` cannot be meant (``reason``, from
    :func:`stageflow._returns.none_is_wrong`): a forgotten ``return`` is not written as the output."""
    return StageError(
        f"{where} returned None for its output '{name}', but {reason} (a forgotten `return`?).",
        stage_path=stage_path,
        field=name,
        code="bad_output",
        hint=f"return the value; to write None on purpose, return {{{name!r}: None}} or annotate "
        "the function's return type with `| None`",
    )


def refuse_none(where: str, name: str, fn: Callable[..., Any], stage_path: str) -> None:
    """A function stage (``where``) with the single output ``name`` returned ``None``: raise
    :func:`none_returned_error` when its function ``fn`` cannot mean it
    (:func:`stageflow._returns.none_is_wrong`); return when it may."""
    reason = none_is_wrong(fn)
    if reason is not None:
        raise none_returned_error(where, name, reason, stage_path)


def function_stage_in(obj: Any) -> FunctionStage | None:
    """The function stage ``obj`` runs, through ``Stage`` wrappers (``None``: it runs none)."""
    while isinstance(obj, Stage):
        obj = obj.module
    return obj if isinstance(obj, FunctionStage) else None


def positional_error(where: str, name: str, ports: Ports, args: tuple[Any, ...]) -> ConfigurationError:
    """A stage (``where``) called with positional arguments: stages take their inputs by name."""
    example = ", ".join(f"{n}=..." for n in ports.required) or "field=..."
    return ConfigurationError(
        f"{where} takes keyword arguments only (its inputs by name); got {len(args)} positional.",
        stage_path=where,
        code="positional_args",
        hint=f"call it as {name}({example})",
    )


def check_given(
    where: str,
    required: Sequence[str],
    call: Mapping[str, Any],
    given: Mapping[str, Any],
    renamed: Mapping[str, str],
) -> None:
    """A stage called on its own (``where``: how the message names it) without one of its
    ``required`` inputs (in its own names; ``call`` holds what it would get): the
    :class:`~stageflow.ContractError` a pipeline raises before it runs (``code="missing_input"``),
    naming the field as the caller passes it (``renamed``: own name -> state name), rather than a
    bare ``TypeError`` from the call, or an LM prompt without the field."""
    for f in required:
        if f not in call:
            name = renamed.get(f, f)
            raise ContractError(
                f"{where} needs input '{name}', which was not given. Given: {sorted(given)}.",
                stage_path=where,
                field=name,
                code="missing_input",
                hint=f"pass {name}=... (in a pipeline, a field of that name feeds it)",
            )


def held_to_outputs(label: str, outputs: tuple[str, ...] | None, out: Any, bare_ok: bool = True) -> Any:
    """``out``, returned on its own by the stage ``label`` that declares ``outputs``, checked as a
    pipeline checks it: a record (a dict, a ``dspy.Prediction``, a pydantic model) missing one of
    them is a :class:`~stageflow.ContractError` naming the stage and the field; a value with no named
    fields is returned as it is where it is the stage's single output (``bare_ok``: a function
    stage's), and is a :class:`~stageflow.StageError` elsewhere. A pending lazy result is left as it
    is (a pipeline checks it once resolved)."""
    if outputs is None or hasattr(type(out), "stageflow_resolve"):  # (a lazy result stays pending)
        return out
    if isinstance(out, dspy.Example):
        have: Any = out._store
    elif isinstance(out, Mapping):
        have = out
    elif hasattr(out, "model_dump") and hasattr(type(out), "model_fields"):
        have = type(out).model_fields
    elif bare_ok and len(outputs) == 1:
        return out
    else:
        raise bad_output_error(label, out, outputs, label)
    for name in outputs:
        if name not in have:
            raise missing_output_error(label, name, have, label)
    return out


def left_to_engine(cls: type, policy: StagePolicy | None) -> StagePolicy | None:
    """``policy`` less the kinds a ``Stage`` class applies in its own ``forward``
    (``stageflow_applies``: ``CachedStage``'s cache); ``None`` when nothing is left."""
    applies = getattr(cls, "stageflow_applies", ())
    if policy is None or not applies:
        return policy
    cleared: dict[str, Any] = dict.fromkeys(applies)
    left = dataclasses.replace(policy, **cleared)
    return None if left.is_empty() else left


def _unapplied(stage: Stage) -> bool:
    """Whether ``stage`` has policies nothing applies to this call: no pipeline runs it, and its class
    does not apply them in its own ``forward``."""
    policy = stage.policy
    if policy is None or POLICY_APPLIED.get() is stage:
        return False
    return left_to_engine(type(stage), policy) is not None


@dataclass(frozen=True)
class DeferredField:
    """A field a stage reads that only a stage with undeclared outputs may produce.

    It cannot be checked before the run, so it is checked at the boundary of the stage that reads
    it, just before that stage runs (a :class:`~stageflow.ContractError` if it is missing then).

    Attributes:
        stage: Full path of the stage that reads the field.
        field: The field.
        candidates: Paths of the upstream stages with undeclared outputs that may produce it.
    """

    stage: str
    field: str
    candidates: tuple[str, ...]

    def message(self) -> str:
        """One line for ``stageflow validate`` and ``check()`` warnings."""
        who = ", ".join(f"'{c}'" for c in self.candidates)
        return (
            f"'{self.stage}' reads '{self.field}', which only {who} (undeclared outputs) may produce; "
            f"it is checked when the pipeline runs. Declare it to check it now: "
            f"Stage(<stage>, writes=['{self.field}', ...])."
        )


@dataclass(frozen=True)
class Ports:
    """What a stage reads and writes.

    Attributes:
        required: Input fields the stage cannot run without.
        optional: Input fields passed when available (parameters with defaults).
        outputs: Output fields, or ``None`` when they are only known at run time.
        accepts_any: The stage takes ``**kwargs``; with no ``reads=`` it receives the whole state.
        types: Annotations of known fields (inputs and outputs), for list-vs-scalar checks.
        required_by: For composite stages, which inner stage needs each required field.
        partial: For composite stages, fields produced on some inner paths only, and where.
        opaque: For composite stages, paths of inner stages with undeclared outputs: the stage may
            output more fields than ``outputs`` lists.
        deferred: For composite stages, inner reads checked only at run time.
        hints: For composite stages, a fix to offer first when a required field is missing.
    """

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    outputs: tuple[str, ...] | None = None
    accepts_any: bool = False
    types: Mapping[str, Any] = field(default_factory=dict)
    required_by: Mapping[str, str] = field(default_factory=dict)
    partial: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    opaque: tuple[str, ...] = ()
    deferred: tuple[DeferredField, ...] = ()
    hints: Mapping[str, str] = field(default_factory=dict)
    #: For composite stages, the predictors inside as ``(owner, entry, path)``: a signature replaced
    #: in place with other fields since the check makes it stale (see ``Pipeline._is_checked``).
    watched: tuple[Any, ...] = field(default=(), compare=False, repr=False)


def _signature_ports(signature: Any) -> Ports:
    # Only output annotations are recorded: an untyped DSPy input defaults to ``str`` and
    # formats lists fine, so input annotations of signatures are not used for type checks.
    types = {name: f.annotation for name, f in signature.output_fields.items()}
    # An input DSPy runs without — one with a default (DSPy fills it in) or one whose type allows
    # None (DSPy leaves it out, without a warning) — is optional, as a parameter with a default is.
    required: list[str] = []
    optional: list[str] = []
    for name, f in signature.input_fields.items():
        (optional if may_be_left_out(f) else required).append(name)
    return Ports(
        required=tuple(required),
        optional=tuple(optional),
        outputs=tuple(signature.output_fields),
        types=types,
    )


def may_be_left_out(info: Any) -> bool:
    """Whether ``dspy.Predict`` runs without this input field, and without a warning."""
    from dspy.adapters.utils import annotation_allows_none
    from pydantic_core import PydanticUndefined

    if getattr(info, "default", PydanticUndefined) is not PydanticUndefined:
        return True
    try:
        return bool(annotation_allows_none(info.annotation))
    except Exception:  # (an annotation DSPy's check cannot read: required, as before)
        return False


def _fields_of(annotation: Any) -> tuple[tuple[str, ...], dict[str, Any]] | None:
    """Output fields from a return annotation that is a TypedDict or a pydantic model."""
    if isinstance(annotation, type):
        model_fields = getattr(annotation, "model_fields", None)
        if isinstance(model_fields, dict):
            return tuple(model_fields), {k: v.annotation for k, v in model_fields.items()}
        if typing.is_typeddict(annotation):
            hints = typing.get_type_hints(annotation)
            return tuple(hints), dict(hints)
    return None


def _callable_ports(fn: Callable[..., Any], *, skip_first: bool = False) -> Ports:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return Ports(accepts_any=True)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    params = list(sig.parameters.values())
    if skip_first and params:
        params = params[1:]
    required: list[str] = []
    optional: list[str] = []
    accepts_any = False
    types: dict[str, Any] = {}
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            accepts_any = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.POSITIONAL_ONLY:
            continue
        (required if p.default is p.empty else optional).append(p.name)
        if p.name in hints:
            types[p.name] = hints[p.name]
    outputs: tuple[str, ...] | None = None
    returned = _fields_of(hints.get("return"))
    if returned is not None:
        outputs, out_types = returned
        types.update(out_types)
    return Ports(tuple(required), tuple(optional), outputs, accepts_any, types)


def _single_output_type(fn: Callable[..., Any], ports: Ports) -> Ports:
    """A function declared with one output (``writes=["docs"]``) and annotated to return a list
    (``-> list[str]``) returns that output itself: its type is the annotation (a mapping annotation
    would be the outputs' container, so only list-like ones are taken)."""
    if ports.outputs is None or len(ports.outputs) != 1 or ports.outputs[0] in ports.types:
        return ports
    try:
        returned = typing.get_type_hints(fn).get("return")
    except Exception:
        return ports
    origin = typing.get_origin(returned) or returned
    if origin not in (list, tuple, set, frozenset):
        return ports
    return replace(ports, types={**ports.types, ports.outputs[0]: returned})


def _apply_declarations(
    ports: Ports, reads: Sequence[str] | None, writes: Sequence[str] | None, owner: str
) -> Ports:
    if isinstance(reads, str) or isinstance(writes, str):
        raise ConfigurationError(
            f"{owner}: reads=/writes= take a list of field names, not a string.",
            code="bad_declaration",
            hint="write reads=['question'] rather than reads='question'",
        )
    if reads is not None:
        _check_field_names(reads, owner, "reads")
        known = set(ports.required) | set(ports.optional)
        if known and not ports.accepts_any:
            unknown = [r for r in reads if r not in known]
            if unknown:
                raise ConfigurationError(
                    f"{owner}: reads={list(reads)} names {unknown}, which the stage does not accept. "
                    f"It accepts: {sorted(known)}.",
                    field=unknown[0],
                    code="bad_declaration",
                )
        left_out = [r for r in ports.required if r not in reads]
        if left_out and not ports.accepts_any:
            # (the stage would run without it: a TypeError from a function, a prompt without the
            # field from a predictor)
            raise ConfigurationError(
                f"{owner}: reads={list(reads)} leaves out {left_out}, which the stage cannot run "
                f"without. It requires: {list(ports.required)}.",
                field=left_out[0],
                code="bad_declaration",
                hint=f"add {left_out[0]!r} to reads=, or rename where it comes from with "
                f"inputs={{{left_out[0]!r}: '<state field>'}}",
            )
        opt = tuple(o for o in ports.optional if o not in reads)
        ports = replace(ports, required=tuple(reads), optional=opt, accepts_any=False)
    if writes is not None:
        _check_field_names(writes, owner, "writes")
        # Declared outputs close the stage: only these fields leave it.
        ports = replace(ports, outputs=tuple(writes), opaque=())
    return ports


def _check_field_names(names: Sequence[Any], owner: str, what: str) -> None:
    bad = [n for n in names if not isinstance(n, str) or not n.isidentifier()]
    if bad:
        raise ConfigurationError(
            f"{owner}: {what}={list(names)} contains {bad[0]!r}, which is not a field name "
            "(field names are Python identifiers given as strings).",
            field=str(bad[0]),
            code="bad_declaration",
        )


def _field_map(mapping: Mapping[str, str] | None, what: str, module: Any) -> dict[str, str]:
    """A rename map ``{stage_field: state_field}``, refused unless every key and value is a field name."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ConfigurationError(
            f"Stage({stage_label(module)}): {what}= takes a mapping {{stage_field: state_field}}, "
            f"got {type(mapping).__name__}.",
            code="bad_rename",
        )
    for k, v in mapping.items():
        for name in (k, v):
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigurationError(
                    f"Stage({stage_label(module)}): {what}={dict(mapping)!r} contains {name!r}, which is not "
                    "a field name (field names are Python identifiers given as strings).",
                    field=str(name),
                    code="bad_rename",
                )
    return dict(mapping)


def _method_of(module: Any, name: str = "forward") -> Any:
    """``module.forward`` (or ``name``) as ``Module.__call__`` reads it — a property, one set on
    the instance, a method (bound: its parameters are the inputs), a ``staticmethod``, a
    ``functools.partial``, one a ``__getattr__`` of the class gives — without ``dspy.Module``'s
    "called directly" warning; ``None`` when there is none."""
    try:
        return object.__getattribute__(module, name)
    except AttributeError:
        pass
    except Exception:  # (a property that fails here fails the call too: read as taking anything)
        return None
    hook = getattr(type(module), "__getattr__", None)
    if hook is None:
        return None
    try:
        return hook(module, name)
    except Exception:
        return None


def describe(obj: Any) -> Ports:
    """Return the :class:`Ports` (inputs and outputs) stageflow sees for ``obj``.

    Works for stageflow stages and pipelines, ``dspy.Predict`` and its subclasses,
    ``dspy.ChainOfThought``, any other ``dspy.Module`` (from ``forward``'s parameters) and
    plain callables.
    """
    own = getattr(obj, "stageflow_ports", None)
    if own is not None and callable(own):
        return typing.cast(Ports, own())
    if isinstance(obj, dspy.Predict):
        return _signature_ports(obj.signature)
    inner = getattr(obj, "predict", None)
    if isinstance(obj, dspy.ChainOfThought) and isinstance(inner, dspy.Predict):
        return _signature_ports(inner.signature)
    if isinstance(obj, dspy.Module):
        forward = _method_of(obj)
        if forward is None:  # (a module with only an aforward: its parameters are the inputs)
            forward = _method_of(obj, "aforward")
        if forward is None or not callable(forward):
            return Ports(accepts_any=True)
        return _callable_ports(forward)
    if callable(obj):
        return _callable_ports(obj)
    raise ConfigurationError(
        f"{obj!r} is not a stage: expected a dspy.Module, a stageflow pipeline or a function.",
        code="not_a_stage",
        hint="wrap plain functions with stageflow.stage(fn); pass module instances, not classes",
    )


def stage_label(obj: Any) -> str:
    """A short human description of a stage, for messages: ``Predict(question -> answer)``."""
    while isinstance(obj, Stage):
        if type(obj).stageflow_own_code:  # (a subclass of yours: its code is what runs)
            return type(obj).__name__
        obj = obj.module
    if isinstance(obj, FunctionStage):
        return f"function {obj.stage_name}()"
    sig = getattr(obj, "signature", None)
    if sig is None and isinstance(getattr(obj, "predict", None), dspy.Predict):
        sig = obj.predict.signature
    if sig is not None and hasattr(sig, "signature"):
        return f"{type(obj).__name__}({sig.signature})"
    return type(obj).__name__


def _is_async_callable(fn: Any) -> bool:
    """An ``async def`` function (or a partial of one), or an object whose ``__call__`` is ``async def``."""
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or isinstance(fn, type):
        return False
    return inspect.iscoroutinefunction(type(fn).__call__)


class FunctionStage(dspy.Module):  # type: ignore[misc]
    """A plain function as a stage. Build it with :func:`stage`.

    The function receives its declared inputs as keyword arguments and returns a mapping
    (or a ``dspy.Prediction`` / pydantic model) of outputs, or a single value when exactly one
    output is declared with ``writes=[...]``. ``async def`` functions run natively under
    ``acall``; a plain function runs on a worker thread under ``acall`` so it cannot block the event
    loop (pass ``blocking=False`` for quick, CPU-light functions to run them inline).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        reads: Sequence[str] | None = None,
        writes: Sequence[str] | None = None,
        name: str | None = None,
        blocking: bool = True,
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise ConfigurationError(f"stage() needs a callable, got {fn!r}.", code="not_a_stage")
        self.fn = fn
        self.stage_name = name or getattr(fn, "__name__", type(fn).__name__)
        self.is_async = _is_async_callable(fn)
        self.blocking = blocking and not self.is_async
        self.ports = _single_output_type(
            fn, _apply_declarations(_callable_ports(fn), reads, writes, f"stage {self.stage_name!r}")
        )

    def stageflow_ports(self) -> Ports:
        return self.ports

    # -- pickling and copying ------------------------------------------------------------------
    # ``@stage(...)`` on a module-level function puts the stage where the function was, so pickle's
    # lookup of the function by name finds the stage instead ("not the same object"). Such a stage
    # is pickled by that name, as a module-level function is; copies are made as before.
    def __reduce_ex__(self, protocol: Any) -> Any:
        where = _module_level_name(self)
        if where is not None:
            return (_named_stage, where)
        return super().__reduce_ex__(protocol)

    def __copy__(self) -> FunctionStage:
        new = type(self).__new__(type(self))
        new.__setstate__(self.__getstate__())
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> FunctionStage:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function (an ``async def`` one runs to its result on stageflow's background
        event loop, as a sync pipeline runs it)."""
        self._check_call(args, kwargs)
        out = self.fn(**kwargs)
        if inspect.iscoroutine(out) or (self.is_async and inspect.isawaitable(out)):
            out = _to_result(out, f"stage {self.stage_name!r}")
        return self._held(out)

    async def aforward(self, *args: Any, **kwargs: Any) -> Any:
        """Await the function; a plain one runs on a worker thread unless ``blocking=False``."""
        self._check_call(args, kwargs)
        if self.blocking:
            from stageflow.engine.concurrency import to_thread

            out = await to_thread(self.fn, **kwargs)
            if inspect.iscoroutine(out):  # (an async function behind a plain wrapper)
                out = await out
        else:
            out = self.fn(**kwargs)
            if inspect.isawaitable(out):
                out = await out
        return self._held(out)

    def _check_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Called on its own: inputs by name only, the required ones given (as a pipeline checks)."""
        where = f"stage {self.stage_name!r}"
        if args:
            raise positional_error(where, str(self.stage_name), self.ports, args)
        if self.ports.required:
            check_given(where, self.ports.required, kwargs, kwargs, {})

    def _held(self, out: Any) -> Any:
        """What the function returned, held to the outputs it declares (:func:`held_to_outputs`),
        unless a pipeline's engine is calling it (it checks the output on merge)."""
        if ENGINE_CALLS.get() is self:
            return out
        outputs = self.ports.outputs
        if out is None and outputs is not None and len(outputs) == 1:
            refuse_none(f"stage {self.stage_name!r}", outputs[0], self.fn, str(self.stage_name))
        return held_to_outputs(f"stage {self.stage_name!r}", outputs, out, bare_ok=True)

    def __repr__(self) -> str:
        return f"FunctionStage({self.stage_name})"


@overload
def stage(
    fn: Callable[..., Any],
    /,
    *,
    reads: Sequence[str] | None = None,
    writes: Sequence[str] | None = None,
    name: str | None = None,
    blocking: bool = True,
) -> FunctionStage: ...
@overload
def stage(
    *,
    reads: Sequence[str] | None = None,
    writes: Sequence[str] | None = None,
    name: str | None = None,
    blocking: bool = True,
) -> Callable[[Callable[..., Any]], FunctionStage]: ...
def stage(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    reads: Sequence[str] | None = None,
    writes: Sequence[str] | None = None,
    name: str | None = None,
    blocking: bool = True,
) -> FunctionStage | Callable[[Callable[..., Any]], FunctionStage]:
    """Make a plain function a stage; usable as ``stage(fn)`` or as a decorator.

    Args:
        fn: The function. Its parameters are the stage's inputs (no default = required).
        reads: Override the input names.
        writes: The output names. Needed when the function returns a plain dict whose keys
            later stages read (a ``TypedDict`` or pydantic return annotation also declares them).
        name: A label for messages and traces (defaults to the function's name).
        blocking: Under ``acall``, run a plain function on a worker thread (default) so slow or
            I/O-bound work cannot block the event loop; ``False`` runs it inline (cheaper).
    """
    if fn is not None:
        return FunctionStage(fn, reads=reads, writes=writes, name=name, blocking=blocking)

    def decorate(f: Callable[..., Any]) -> FunctionStage:
        return FunctionStage(f, reads=reads, writes=writes, name=name, blocking=blocking)

    return decorate


class Stage(dspy.Module):  # type: ignore[misc]
    """Wrap a module or function to rename fields at the boundary or declare its ports.

    Args:
        module: A ``dspy.Module`` (Predict, ChainOfThought, a custom module, a stageflow
            pipeline) or a plain function.
        inputs: ``{"stage_field": "state_field"}``: the stage's ``stage_field`` is fed from the
            pipeline state's ``state_field``.
        outputs: ``{"stage_field": "state_field"}``: the stage's ``stage_field`` is stored in
            the state as ``state_field``.
        reads: Declare the stage's input names (before renaming).
        writes: Declare the stage's output names (before renaming); needed for modules whose
            ``forward`` returns fields that later stages read.
        budget: An :class:`~stageflow.LMBudget` (or a dict of its fields) each call of the stage
            runs under, retries included (nested in the budgets around it).

    Examples:
        >>> import dspy, stageflow
        >>> s = stageflow.Stage(dspy.Predict("context, question -> answer"),
        ...                     inputs={"context": "passages"}, outputs={"answer": "draft"})
        >>> s.ports.required, s.ports.outputs
        (('passages', 'question'), ('draft',))
    """

    def __init__(
        self,
        module: Any,
        *,
        inputs: Mapping[str, str] | None = None,
        outputs: Mapping[str, str] | None = None,
        reads: Sequence[str] | None = None,
        writes: Sequence[str] | None = None,
        retry: RetryPolicy | int | None = None,
        timeout: TimeoutPolicy | float | None = None,
        repair: RepairPolicy | int | bool | None = None,
        fallback: Fallback | Mapping[str, Any] | Callable[..., Any] | None = None,
        recover: Recover | None = None,
        skip_on: Sequence[type[BaseException]] = (),
        cache: CachePolicy | bool | int | str | os.PathLike[str] | None = None,
        budget: LMBudget | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(module, type):
            raise ConfigurationError(
                f"Stage() got the class {module.__name__}, not an instance.",
                code="not_a_stage",
                hint=f"pass an instance: Stage({module.__name__}(...))",
            )
        if not isinstance(module, dspy.Module):
            module = FunctionStage(module)
        self.module = module
        self.input_map = _field_map(inputs, "inputs", module)
        self.output_map = _field_map(outputs, "outputs", module)
        inner = _apply_declarations(describe(module), reads, writes, f"Stage({stage_label(module)})")
        self.inner_ports = inner
        self._reads_declared = reads is not None
        self._writes = None if writes is None else tuple(writes)
        self._seen_signature = _signature_now(module)
        self.declares_outputs = writes is not None
        self.ports = self.renamed_ports(inner)
        self.policy = self._policy(retry, timeout, repair, fallback, recover, skip_on, cache, budget)
        store = getattr(getattr(self.policy, "cache", None), "persistent", None)
        if store is not None and hasattr(store, "allow_types"):  # a fresh process reads them back
            store.allow_types(declared_types(module))

    #: Whether the class has call code of yours (``own_call_code``): called on its own, what that
    #: code returns is held to the declared outputs, as a pipeline holds it.
    stageflow_own_code: bool = False
    #: Whether the class has a ``__call__`` of yours and no ``acall`` / ``aforward`` of yours:
    #: ``acall`` runs that ``__call__`` on a worker thread, so both calls give the same result.
    stageflow_call_only: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.stageflow_own_code = own_call_code(cls)
        # A __call__ / acall of yours runs inside the stage's policies, called on its own as in a
        # pipeline (where the engine calls it once per attempt).
        for name, around in (("__call__", _policies_around), ("acall", _apolicies_around)):
            # (its own, or a mixin's: the first class of its MRO that defines it)
            owner = next(c for c in cls.__mro__ if name in c.__dict__)
            own = owner.__dict__[name]
            if not _library(owner) and inspect.isfunction(own) and not hasattr(own, "stageflow_own"):
                setattr(cls, name, around(own))
        cls.stageflow_call_only = _call_only(cls)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "module" and "inner_ports" in self.__dict__ and value is not self.__dict__.get("module"):
            # The contract (inputs, outputs, renames, declarations) was computed from the old module
            # and the pipelines holding this Stage planned with it: a new module would run under a
            # contract that is not its own (its extra outputs silently dropped, say).
            raise ConfigurationError(
                f"Stage({stage_label(self.__dict__['module'])}): its module cannot be replaced once the "
                "Stage is built; its contract was computed from the old module.",
                field="module",
                code="structure_changed",
                hint="build a new Stage(new_module, ...) and put it where the old one was "
                "(pipeline.stages[i] = Stage(...))",
            )
        super().__setattr__(name, value)

    def _policy(
        self,
        retry: RetryPolicy | int | None,
        timeout: TimeoutPolicy | float | None,
        repair: RepairPolicy | int | bool | None,
        fallback: Fallback | Mapping[str, Any] | Callable[..., Any] | None,
        recover: Recover | None,
        skip_on: Sequence[type[BaseException]],
        cache: CachePolicy | bool | int | str | os.PathLike[str] | None,
        budget: LMBudget | Mapping[str, Any] | None = None,
    ) -> StagePolicy | None:
        from stageflow.policies.recovery import HELD, Fallback, StagePolicy, make_policy

        held: Fallback | None = None
        given: object = fallback
        if isinstance(fallback, Fallback) and fallback.stage is not None:
            given = fallback.stage  # the wrapper holds the stage itself (so DSPy sees it)
        if isinstance(given, Fallback):
            held = given
        elif isinstance(given, Mapping):
            held = Fallback(default=given)
        elif callable(given):
            self.fallback_stage = given if isinstance(given, dspy.Module) else FunctionStage(given)
            held = Fallback(stage=HELD)
        elif given is not None:
            raise ConfigurationError(
                f"fallback= takes a stage, a default output mapping or a Fallback, got {given!r}.",
                field="fallback",
                code="bad_option",
            )
        policy = make_policy(
            retry=retry,
            timeout=timeout,
            repair=repair,
            fallback=held,
            recover=recover,
            skip_on=skip_on,
            cache=cache,
            budget=budget,
        )
        return None if policy == StagePolicy() else policy

    def renamed_ports(self, inner: Ports) -> Ports:
        """The ports of the wrapped stage (``inner``) as seen through this wrapper's renames."""
        label = f"Stage({stage_label(self.module)})"
        accepted = set(inner.required) | set(inner.optional)
        bad_in = [k for k in self.input_map if k not in accepted]
        if bad_in and not inner.accepts_any:
            raise ConfigurationError(
                f"{label}: inputs={self.input_map} renames {bad_in}, but the stage's inputs are "
                f"{sorted(accepted)}.",
                field=bad_in[0],
                code="bad_rename",
                hint="keys of inputs= are the stage's own field names; values are state field names",
            )
        if inner.outputs is not None:
            bad_out = [k for k in self.output_map if k not in inner.outputs]
            if bad_out:
                raise ConfigurationError(
                    f"{label}: outputs={self.output_map} renames {bad_out}, but the stage's outputs are "
                    f"{list(inner.outputs)}.",
                    field=bad_out[0],
                    code="bad_rename",
                    hint="keys of outputs= are the stage's own field names; values are state field names",
                )
        extra_in = tuple(k for k in self.input_map if k not in accepted)
        ren_in = self.input_map.get
        ren_out = self.output_map.get
        types: dict[str, Any] = {}
        for k, v in inner.types.items():
            if inner.outputs is not None and k in inner.outputs:
                types[ren_out(k, k)] = v
            else:
                types[ren_in(k, k)] = v
        outputs = None if inner.outputs is None else tuple(ren_out(o, o) for o in inner.outputs)
        if inner.outputs is None and self.output_map:
            outputs = None
        if outputs is not None and len(set(outputs)) < len(outputs):
            clash = sorted({o for o in outputs if outputs.count(o) > 1})
            raise ConfigurationError(
                f"{label}: outputs={self.output_map} gives two of the stage's outputs the same name "
                f"{clash}: one of them would be lost.",
                field=clash[0],
                code="bad_rename",
                hint="give each output its own state field name",
            )
        required = tuple(dict.fromkeys(ren_in(r, r) for r in (*inner.required, *extra_in)))
        optional = dict.fromkeys(ren_in(o, o) for o in inner.optional)
        return Ports(
            required=required,
            optional=tuple(n for n in optional if n not in required),
            outputs=outputs,
            accepts_any=inner.accepts_any and not self.input_map,
            types=types,
            required_by={ren_in(k, k): v for k, v in inner.required_by.items()},
            partial=inner.partial,
            opaque=inner.opaque,
            deferred=inner.deferred,
        )

    def stageflow_ports(self) -> Ports:
        self.refresh_ports()
        return self.ports

    def refresh_ports(self) -> None:
        """Work the ports out again when the wrapped predictor's signature was replaced in place
        since (an optimizer's, or yours): a pipeline then plans with the fields it has now."""
        attrs = self.__dict__  # (a Stage unpickled from an older release may lack these: left as it is)
        if attrs.get("_reads_declared", True):
            return
        now = _signature_now(self.module)  # (None: not a predictor, nothing to follow)
        if now is attrs.get("_seen_signature"):
            return
        inner = _apply_declarations(describe(self.module), None, attrs.get("_writes"), self._where())
        self.__dict__["inner_ports"] = inner
        self.__dict__["ports"] = self.renamed_ports(inner)
        self.__dict__["_seen_signature"] = now

    def stage_inputs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The wrapped stage's keyword arguments for a call given ``kwargs``, as a pipeline feeds it:
        a renamed input from its state name (given both names, the state name wins, whatever the
        order), or from its own name when the state name is not given; a state name that is also
        an input of the stage feeds both."""
        renamed = self.input_map  # {stage field: state field}
        if not renamed:
            return dict(kwargs)
        state_names = set(renamed.values())
        call: dict[str, Any] = {}
        for k, v in kwargs.items():
            if k in renamed:
                if renamed[k] not in kwargs:  # (its own name, its state name not given)
                    call[k] = v
            elif k not in state_names or k in self.inner_ports.required or k in self.inner_ports.optional:
                call[k] = v
        for own, state_name in renamed.items():
            if state_name in kwargs:
                call[own] = kwargs[state_name]
        return call

    def _rename_outputs(self, out: Any) -> Any:
        if not self.output_map:
            return out
        if hasattr(out, "items"):
            items: dict[str, Any] = dict(out.items())
        elif hasattr(out, "model_dump"):
            items = dict(out)
        else:
            return self._bare_output(out)
        return dspy.Prediction(**{self.output_map.get(k, k): v for k, v in items.items()})

    def _returned(self, out: Any) -> Any:
        """What the stage returns on its own: the module's result renamed, held to the outputs the
        stage declares (:meth:`held`)."""
        return self.held(self._rename_outputs(out))

    def _where(self) -> str:
        return f"Stage({stage_label(self.module)})"

    def check_inputs(self, call: dict[str, Any], kwargs: Mapping[str, Any]) -> None:
        """Called on its own without a required input: a ``ContractError`` naming it (a pipeline's
        engine checked it before the run)."""
        if ENGINE_CALLS.get() is self:
            return
        # (around another Stage too: checked here first, the field named as this Stage's caller
        # passes it)
        self.refresh_ports()  # (a predictor's signature may have been replaced in place since)
        required = self.inner_ports.required
        if required:
            check_given(self._where(), required, call, kwargs, self.input_map)

    def held(self, out: Any) -> Any:
        """``out`` (in the stage's output names) held to the outputs it declares, as a pipeline
        holds it (:func:`held_to_outputs`); fields some paths of a composite leave out are required
        only when ``writes=`` names them."""
        outputs = self.ports.outputs
        if outputs is None or ENGINE_CALLS.get() is self:
            return out
        if self.inner_ports.partial and not self.declares_outputs:
            partial = {self.output_map.get(k, k) for k in self.inner_ports.partial}
            outputs = tuple(o for o in outputs if o not in partial)
        bare_ok = wraps_function(self)
        if out is None and bare_ok and len(outputs) == 1:
            inner = function_stage_in(self)
            if inner is not None:
                refuse_none(self._where(), outputs[0], inner.fn, self._where())
        return held_to_outputs(self._where(), outputs, out, bare_ok)

    def _bare_output(self, out: Any) -> Any:
        """A value with no named fields, returned where ``outputs=`` renames: as in a pipeline, a
        function stage with one declared output returns it as it is (a pipeline stores it under the
        renamed name); anything else has nothing to rename, and says so."""
        outputs = self.inner_ports.outputs
        if outputs is not None and len(outputs) == 1 and wraps_function(self):
            return out
        label = f"Stage({stage_label(self.module)})"
        raise StageError(
            f"{label} returned {type(out).__name__}, which has no named fields for "
            f"outputs={self.output_map} to rename. Return a dict or dspy.Prediction, or declare the "
            "single output it produces.",
            stage_path=label,
            code="bad_output",
            hint=f"Stage(<stage>, writes=[{next(iter(self.output_map))!r}], outputs=...) names a single "
            "returned value",
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A subclass of yours called where no pipeline runs it: its whole call under its policies,
        # as a pipeline runs it (stageflow's own classes apply them in forward, below).
        if self.policy is not None and not args and _unapplied(self) and own_call_code(type(self)):
            from stageflow.patterns.solo import call_alone

            return call_alone(self, kwargs, how="call")
        out = super().__call__(*args, **kwargs)
        return self.held(out) if type(self).stageflow_own_code else out

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        if type(self).stageflow_call_only and id(self) not in _IN_OWN_CALL.get():
            # (your __call__, as a sync call runs it; not again from inside it)
            own = _own_code(type(self).__call__)
            if inspect.iscoroutinefunction(own):
                token = _IN_OWN_CALL.set(_IN_OWN_CALL.get() | {id(self)})
                try:
                    return self.held(await own(self, *args, **kwargs))
                finally:
                    _IN_OWN_CALL.reset(token)
            from stageflow.engine.concurrency import to_thread

            return await to_thread(_run_own_call, self, args, kwargs)
        if self.policy is not None and not args and _unapplied(self) and own_call_code(type(self)):
            from stageflow.patterns.solo import acall_alone

            return await acall_alone(self, kwargs, how="call")
        out = await super().acall(*args, **kwargs)
        return self.held(out) if type(self).stageflow_own_code else out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise positional_error(self._where(), "stage", self.ports, args)
        if self.policy is not None and _unapplied(self):  # (stage.forward(...) called directly)
            from stageflow.patterns.solo import call_alone

            return call_alone(self, kwargs)
        call = self.stage_inputs(kwargs)
        self.check_inputs(call, kwargs)
        tokens = _module_runs(self)
        try:
            out = self.module(**call)
        finally:
            _module_done(tokens)
        if out is None and isinstance(self.module, Stage):
            _skipped_inside(self)
        return self._returned(out)

    async def aforward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise positional_error(self._where(), "stage", self.ports, args)
        if _sync_only(type(self)):  # (a subclass of yours with its own forward only)
            from stageflow.engine.concurrency import to_thread

            return await to_thread(type(self).forward, self, **kwargs)
        if self.policy is not None and _unapplied(self):
            from stageflow.patterns.solo import acall_alone

            return await acall_alone(self, kwargs)
        call = self.stage_inputs(kwargs)
        self.check_inputs(call, kwargs)
        tokens = _module_runs(self)
        try:
            if hasattr(self.module, "aforward"):
                out = await self.module.acall(**call)
            else:
                from stageflow.engine.concurrency import to_thread

                out = await to_thread(self.module, **call)
        finally:
            _module_done(tokens)
        if out is None and isinstance(self.module, Stage):
            _skipped_inside(self)
        return self._returned(out)

    def __repr__(self) -> str:
        return f"Stage({stage_label(self.module)}, inputs={self.input_map}, outputs={self.output_map})"


def wraps_function(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`Stage` around a function stage, through any ``Stage`` layers:
    called as a module, it returns what the function returns."""
    inner = getattr(obj, "module", None) if isinstance(obj, Stage) else None
    while isinstance(inner, Stage):
        inner = inner.module
    return isinstance(inner, FunctionStage)


def declared_types(stage: Any) -> list[type]:
    """Classes the stage declares it returns (a pydantic/dataclass return annotation, typed
    signature fields): a fresh process may read them back from the cache file."""
    found: list[type] = []
    stack = list(describe(stage).types.values())
    while isinstance(stage, Stage):
        stage = stage.module
    for name in ("output_schema", "output_model"):  # a StandardStage's declared output class
        stack.append(getattr(stage, name, None))
    fn = getattr(stage, "fn", None) or getattr(type(stage), "forward", None)
    with contextlib.suppress(Exception):  # no annotations, or ones that do not resolve
        stack.append(typing.get_type_hints(fn).get("return"))
    while stack:
        t = stack.pop()
        if isinstance(t, type):
            if "<locals>" not in t.__qualname__ and (
                isinstance(getattr(t, "model_fields", None), dict) or dataclasses.is_dataclass(t)
            ):
                found.append(t)
        else:
            stack.extend(a for a in typing.get_args(t) if a is not Ellipsis)
    return found


def _module_level_name(stage: FunctionStage) -> tuple[str, str] | None:
    """``(module, qualified name)`` when ``stage`` is what that module holds under its function's
    name (``@stage(...)`` on a module-level function of an importable module), else ``None``."""
    fn = stage.__dict__.get("fn")
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None)
    if not module or module == "__main__" or not isinstance(name, str) or "<" in name:
        return None
    obj: Any = sys.modules.get(module)
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return (module, name) if obj is stage else None


def _named_stage(module: str, name: str) -> Any:
    """The stage ``module`` holds under ``name`` (unpickling a stage pickled by name)."""
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj
