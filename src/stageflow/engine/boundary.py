"""The stage boundary: pick a stage's inputs from the state, merge its outputs back.

Errors raised here name the stage by its full path (``prefix`` + the stage's own path).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from types import CoroutineType
from typing import Any, TypeVar

import dspy

from stageflow.engine.plan import StageEntry, join_path
from stageflow.errors import ContractError, StageError, StageflowError, error_text
from stageflow.policies.lazy import LazyResult
from stageflow.stages import bad_output_error, missing_output_error, refuse_none
from stageflow.state import Result, RunInfo

__all__ = [
    "FAILED_OUTPUTS",
    "failed_outputs_of",
    "gather_inputs",
    "merge_outputs",
    "missing_at_run_time",
    "note_run_failure",
    "port_inputs",
    "private_copy",
    "private_state",
    "stage_failure",
]

#: The run detail (``result.failed_outputs``) naming, for each field a failed stage was to write, that
#: stage and its error (``on_error="collect"``/``"skip"`` fan-outs drop such a field from the state).
FAILED_OUTPUTS = "failed_outputs"


_E = TypeVar("_E", bound=StageflowError)


def _full(error: _E) -> _E:
    error.path_is_full = True
    return error


def port_inputs(ports: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``state`` a nested pipeline's ports read (required, then optional); all of
    them when a stage inside takes the whole state (``**kwargs``)."""
    if ports.accepts_any:
        return dict(state)
    kw = {}
    for f in ports.required:
        if f in state:
            kw[f] = state[f]
    for f in ports.optional:
        if f in state:
            kw[f] = state[f]
    return kw


def gather_inputs(
    entry: StageEntry,
    state: dict[str, Any],
    prefix: str,
    target: Any = None,
    owner: Any = None,
    run: RunInfo | None = None,
) -> dict[str, Any]:
    """The keyword arguments for one call of the stage: its declared inputs, renamed.

    This is also where reads that could not be checked before the run (fields only a stage with
    undeclared outputs may produce) are checked: a missing one is a :class:`ContractError` raised
    before the stage runs. A nested pipeline held directly (``target``) is asked for its inputs now,
    so a stage added to it after it was nested is fed too.
    """
    if entry.pass_state:
        return dict(state)
    if entry.composite and target is not None and not entry.chain:
        try:
            ports = target.stageflow_ports()
        except StageflowError as e:  # (its re-made plan's error names its own stages)
            raise _full(e.with_path_prefix(join_path(prefix, entry.path))) from e.__cause__
        return port_inputs(ports, state)
    try:
        kw = {sf: state[st] for sf, st in entry.in_pairs}
    except KeyError as e:
        raise missing_at_run_time(entry, str(e.args[0]), state, prefix, owner, run) from None
    if entry.opt_pairs:
        for sf, st in entry.opt_pairs:
            if st in state:
                kw[sf] = state[st]
    return kw


def missing_at_run_time(
    entry: StageEntry, f: str, state: dict[str, Any], prefix: str, owner: Any, run: RunInfo | None
) -> ContractError:
    """The error for a read that is not in the state when the stage is about to run.

    Same shape as the check before the run: the stage path, the field, what is available, which
    stages with undeclared outputs were expected to produce it (and what they returned), the fix.
    """
    path = join_path(prefix, entry.path)
    candidates = owner.stageflow_deferred(entry.path, f) if owner is not None else ()
    returned = []
    for c in candidates:
        out = run.stage_outputs.get(c) if run is not None else None
        if out is not None:
            fields = sorted(dict(_items(out))) if _is_record(out) else [f"a {type(out).__name__}"]
            returned.append(f"'{join_path(prefix, c)}' returned {fields}")
        else:
            returned.append(f"'{join_path(prefix, c)}' did not run")
    expected = ""
    if candidates:
        expected = (
            f" It was expected from stages with undeclared outputs, which did not produce it: "
            f"{'; '.join(returned)}."
        )
    failed = _failed_writer(run, f)
    if failed:
        expected += f" It was to be written by {failed}."
    skipped = [e for e in run.events if e.kind == "skipped"] if run is not None and not failed else []
    if skipped:  # (a skipped stage writes nothing: the likely writer)
        named = "; ".join(f"'{e.stage}' ({e.error})" for e in skipped[:3])
        expected += f" Skipped earlier in this run, writing nothing: {named}."
    close = difflib.get_close_matches(f, list(state), n=1, cutoff=0.5)
    fixes = []
    if failed:
        fixes.append(
            "fix that stage's failure, give it a Fallback, or use on_error='fail_fast' to stop at the failure"
        )
    elif skipped:
        fixes.append(f"give the skipped stage a fallback= that writes '{f}', or make '{f}' optional here")
    elif candidates:
        fixes.append(f"return '{f}' from {', '.join(repr(join_path(prefix, c)) for c in candidates)}")
        fixes.append(
            f"declare outputs with Stage(<stage>, writes=['{f}', ...]) to have this checked before the run"
        )
    else:
        fixes.append(f"pass {f}=... when calling the pipeline, or produce '{f}' in an earlier stage")
    if close:
        fixes.append(f"feed it from an existing field: Stage(<stage>, inputs={{'{f}': '{close[0]}'}})")
    err = _full(
        ContractError(
            f"Stage '{path}' ({entry.label}) needs input '{f}', which is not available there at run time. "
            f"Available: {sorted(state)}.{expected}",
            stage_path=path,
            field=f,
            code="missing_input",
            hint="; or ".join(fixes),
        )
    )
    # A stage expected to write it ran and did not, failed or was skipped: the run failed, whatever
    # the caller passed (the command line exits 1 for it, not 2).
    err.run_failure = bool(candidates or failed or skipped)
    return err


def note_run_failure(error: StageflowError, given: tuple[tuple[str, Any], ...]) -> None:
    """A ForEach found no list where it iterates (``not_a_list``): bad input when the value is one
    the outermost call's caller gave (``given``: its inputs as the stages saw them), else the run's
    own doing — a stage, the model, gave the wrong shape — and the command line exits 1 for it, not
    2. By identity; a value CPython keeps one object of for everyone (``None``, a bool, a small int,
    an empty or one-character string) counts as the caller's only under the field's own name, and so
    does a container the caller gave that a fan-out branch iterated as its private copy (recognised
    by its equal content)."""
    if getattr(error, "code", None) != "not_a_list" or not hasattr(error, "given"):
        return
    value = error.given
    if _everyones(value):
        names = [name for name, v in given if name == error.field and v is value]
    else:
        names = [name for name, v in given if v is value]
        if not names and type(value) not in _SHARED:  # (a branch's private copy, under its own name)
            names = [name for name, v in given if name == error.field and _same(v, value)]
    error.run_failure = not names
    if names:
        error.hint = f"pass a list as '{names[0]}'"


def _everyones(value: Any) -> bool:
    """Whether CPython keeps one object of ``value`` for every use of it (identity says nothing)."""
    if value is None or type(value) is bool:
        return True
    if type(value) is int:
        return -5 <= value <= 256
    return type(value) in (str, bytes) and len(value) <= 1


def _same(value: Any, given: Any) -> bool:
    """An equal value of the same type (an ``__eq__`` that refuses, or answers with an array, says no)."""
    if type(value) is not type(given):
        return False
    try:
        return bool(value == given)
    except Exception:
        return False


#: Types whose equal values a stage makes anew (never a copy of the caller's): identity decides.
_SHARED = (int, float, str, bytes)


def failed_outputs_of(run: RunInfo) -> list[dict[str, str]]:
    """The ``failed_outputs`` records of this run and of the pipelines nested in it."""
    return [e[FAILED_OUTPUTS] for e in (run.extras, *run.details.values()) if e.get(FAILED_OUTPUTS)]


def _failed_writer(run: RunInfo | None, f: str) -> str | None:
    """The failed stage that was to write ``f`` in this run (or a nested one), if any."""
    for failed in failed_outputs_of(run) if run is not None else ():
        if f in failed:
            return str(failed[f])
    return None


def _is_record(out: Any) -> bool:
    return isinstance(out, Mapping | dspy.Example) or hasattr(out, "model_dump")


def _items(out: Any) -> list[tuple[str, Any]]:
    if isinstance(out, dspy.Example):
        return list(out._store.items())
    if isinstance(out, Mapping):
        return list(out.items())
    return [(k, getattr(out, k)) for k in type(out).model_fields]


def merge_outputs(entry: StageEntry, out: Any, state: dict[str, Any], run: RunInfo, prefix: str) -> None:
    """Merge a stage's outputs into ``state`` (renamed), and a nested run's records into ``run``."""
    if type(out) is dspy.Prediction and entry.merge_whole:  # (the common case, first)
        state.update(out._store)
        return
    if type(out) is not dict:
        if type(out) is CoroutineType:  # (never awaited: a sync call of an async function behind a wrapper)
            from stageflow.engine.concurrency import on_background_loop, run_on_background_loop

            if not on_background_loop():  # (run to its result, as FunctionStage does for one)
                try:
                    awaited = run_on_background_loop(out)
                except Exception as e:  # (the stage failed: said as any stage's failure is)
                    cause = e.__cause__ if isinstance(e, StageflowError) else e
                    raise stage_failure(entry, e, prefix) from cause
                merge_outputs(entry, awaited, state, run, prefix)
                return
            out.close()
            path = join_path(prefix, entry.path)
            raise _full(
                StageError(
                    f"Stage '{path}' ({entry.label}) returned a coroutine that nothing awaited: an async "
                    "function behind a plain (sync) wrapper.",
                    stage_path=path,
                    code="bad_output",
                    hint="make the wrapper `async def` (and await the function), or call the pipeline "
                    "with `await pipeline.acall(...)`",
                )
            )
        if type(out) is LazyResult:  # merging its fields resolves it, and the stage runs now
            try:
                out = out.stageflow_resolve()
            except Exception as e:  # (the stage failed: said as any stage's failure is)
                cause = e.__cause__ if isinstance(e, StageflowError) else e
                raise stage_failure(entry, e, prefix) from cause
    if isinstance(out, Result):
        # A nested stageflow pipeline: its records, outputs and details join this run under its path.
        run.absorb(entry.path, out._run)
        if entry.merge_all:
            # Its whole final state merges, except inputs it only received under another name.
            skip = entry.merge_skip
            for k, v in out._store.items():
                if k not in skip:
                    state[k] = v
            inner = out.run
            if inner.details or FAILED_OUTPUTS in inner.extras:
                # A failed inner stage (at any depth) was to write these: the old values are stale.
                for failed in failed_outputs_of(inner):
                    for k in failed:
                        if k not in out._store:
                            state.pop(k, None)
            return
    if entry.merge_all and _is_record(out):
        # A nested pipeline that returned something else than its run's result: a ``forward`` set
        # on it or defined by its class. What it returned is its final state, and all of it merges;
        # the outputs its stages declare must be there (as the contract check promised them).
        items = _items(out)
        pairs = entry.out_pairs
        if pairs:
            given = {k for k, _ in items}
            if any(sf not in given for sf, _ in pairs):
                _merge_slow(entry, out, state, pairs, prefix)
        skip = entry.merge_skip
        for k, v in items:
            if type(k) is not str:
                raise _bad_key(entry, k, prefix)
            if k not in skip:
                state[k] = v
        return
    pairs = entry.out_pairs
    if pairs is not None:
        if entry.single_output is not None and type(out) is not dict and not _is_record(out):
            if out is None and entry.function_stage is not None:
                _none_returned(entry, prefix)
            state[entry.single_output] = out
            return
        try:
            for sf, st in pairs:
                state[st] = out[sf]
        except (KeyError, TypeError, IndexError, AttributeError):
            _merge_slow(entry, out, state, pairs, prefix)
        return
    if not entry.out_rename:
        if isinstance(out, dspy.Example):
            state.update(out._store)
            return
        if type(out) is dict:
            for k in out:
                if type(k) is not str:
                    raise _bad_key(entry, k, prefix)
            state.update(out)
            return
    if not _is_record(out):
        path = join_path(prefix, entry.path)
        raise _full(
            StageError(
                f"Stage '{path}' ({entry.label}) returned "
                + ("None (a forgotten `return`?)" if out is None else type(out).__name__)
                + ", which has no named fields. Return a dict or dspy.Prediction, or declare the "
                "single output it produces.",
                stage_path=path,
                code="bad_output",
                hint="Stage(<stage>, writes=['<field>']) stores a single returned value as '<field>'",
            )
        )
    rename = dict(entry.out_rename)
    for k, v in _items(out):
        if type(k) is not str:
            raise _bad_key(entry, k, prefix)
        state[rename.get(k, k)] = v


def _none_returned(entry: StageEntry, prefix: str) -> None:
    """A function stage returned ``None`` as its single output: refused where its function cannot
    mean it (``stages.refuse_none``), said with the stage's path in the pipeline."""
    path = join_path(prefix, entry.path)
    name = entry.out_pairs[0][0] if entry.out_pairs else str(entry.single_output)
    try:
        refuse_none(f"Stage '{path}' ({entry.label})", name, entry.function_stage.fn, path)
    except StageError as e:
        raise _full(e) from None


def _bad_key(entry: StageEntry, key: Any, prefix: str) -> StageError:
    path = join_path(prefix, entry.path)
    return _full(
        StageError(
            f"Stage '{path}' ({entry.label}) returned the field name {key!r}, which is not a string; "
            "state fields are named by strings.",
            stage_path=path,
            field=str(key),
            code="bad_output",
            hint="return a dict with string keys, e.g. {'answer': ...}",
        )
    )


_IMMUTABLE = frozenset({str, int, float, bool, type(None), bytes, complex, frozenset, range})


def private_copy(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """A copy of ``value`` that shares no mutable container with it (immutable values are shared).

    Lists, dicts, sets and tuples are copied element by element (a container that holds itself is
    copied once, like :func:`copy.deepcopy` does); other mutable objects are deep-copied (shared as
    they are when they cannot be copied: clients, locks, models).

    >>> loop: list = [1]
    >>> loop.append(loop)
    >>> twin = private_copy(loop)
    >>> twin is not loop and twin[1] is twin
    True
    """
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if memo is None:
        memo = {}
    key = id(value)
    if key in memo:
        return memo[key]
    if kind is list:
        out: list[Any] = []
        memo[key] = out
        out.extend(private_copy(v, memo) for v in value)
        return out
    if kind is dict:
        new: dict[Any, Any] = {}
        memo[key] = new
        for k, v in value.items():
            new[k] = private_copy(v, memo)
        return new
    if kind is tuple:
        copied = tuple(private_copy(v, memo) for v in value)
        memo[key] = copied
        return copied
    if kind is set:
        copied_set = {private_copy(v, memo) for v in value}
        memo[key] = copied_set
        return copied_set
    try:
        copied_obj = copy.deepcopy(value, memo)
    except Exception:
        copied_obj = value
    memo[key] = copied_obj
    return copied_obj


def private_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state whose values share no mutable container with ``state`` (see :func:`private_copy`)."""
    return {k: (v if type(v) in _IMMUTABLE else private_copy(v)) for k, v in state.items()}


def _merge_slow(
    entry: StageEntry, out: Any, state: dict[str, Any], pairs: tuple[tuple[str, str], ...], prefix: str
) -> None:
    path = join_path(prefix, entry.path)
    where = f"Stage '{path}' ({entry.label})"
    if not _is_record(out):
        raise _full(bad_output_error(where, out, [sf for sf, _ in pairs], path))
    got = dict(_items(out))
    for sf, st in pairs:
        if sf not in got:
            raise _full(missing_output_error(where, sf, got, path))
        state[st] = got[sf]


def stage_failure(entry: StageEntry, error: Exception, prefix: str) -> StageflowError:
    """The error to raise for a stage failure, with a stage path from the outermost pipeline.

    Errors raised by the engine already carry full paths; errors raised by a nested pipeline's
    own logic (a router, a loop limit, its contract check) carry paths relative to it and get the
    path of the stage that holds it prepended, once.
    """
    full = join_path(prefix, entry.path)
    if isinstance(error, StageflowError):
        if not error.path_is_full:
            error.with_path_prefix(full)
            error.path_is_full = True
        return error
    wrapped = StageError(
        f"Stage '{full}' ({entry.label}) raised {type(error).__name__}: {error_text(error)}",
        stage_path=full,
        code="stage_failed",
    )
    wrapped.path_is_full = True
    wrapped.wraps_stage_exception = True
    wrapped.__cause__ = error
    return wrapped
