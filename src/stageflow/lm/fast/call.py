"""A shorter call path for ``Predict`` / ``ChainOfThought`` stages, for the engine to use.

``call_predictor(module, inputs)`` does what ``module(**inputs)`` does, minus the steps that are
no-ops in the common case: ``Module.__call__``'s callback wrapper when no callback is active,
``resolve_adapter`` when the signature has no decision outputs, the ``send_stream=None`` context
when no stream is open, and ``ChainOfThought``'s own ``forward`` hop. It still does what DSPy's
``Predict._forward_preprocess`` does, runs the adapter (and so the LM, its cache, history and usage)
and does what ``Predict._forward_postprocess`` does (the trace optimizers read) — the first and last
from a per-signature table (:mod:`stageflow.lm.fast._predict`) — with the module — and, for
``ChainOfThought``, its inner predictor — pushed onto ``caller_modules`` as ``Module.__call__``
pushes it, so every module's ``history`` gets the entry.

Anything else — callbacks or usage tracking on, a stream open, a subclass, a patched ``forward``
(GEPA does that), another module type — takes the ordinary ``module(**inputs)`` call.

Example:
    >>> import dspy
    >>> from stageflow.lm.fast.call import call_predictor
    >>> from stageflow.testing import FakeLM
    >>> qa = dspy.ChainOfThought("question -> answer")
    >>> with dspy.context(lm=FakeLM({"answer": "4"})):
    ...     call_predictor(qa, {"question": "2+2?"}).answer
    '4'
    >>> len(qa.history), len(qa.predict.history)
    (1, 1)
"""

from __future__ import annotations

import operator
from types import FunctionType
from typing import Any

import dspy
from dspy.dsp.utils.settings import main_thread_config, thread_local_overrides

from stageflow._callers import is_dspys_entry, push_callers, setting
from stageflow.lm.fast._predict import planned_preprocess, postprocess, signature_plan, untouched
from stageflow.lm.fast.adapters import FastChatAdapter, FastJSONAdapter

__all__ = ["acall_predictor", "call_predictor", "short_path"]


def short_path(module: Any) -> list[Any] | None:
    """The modules a call of ``module`` goes through, ending with its ``Predict``, when the short
    path gives the same result as ``module(**inputs)`` right now; otherwise ``None``."""
    found = _short(module)
    return None if found is None else found[0]


def _short(module: Any) -> tuple[list[Any], dict[str, Any]] | None:
    """:func:`short_path`, and the ``Predict``'s attributes (its ``__dict__``)."""
    # settings.callbacks, .track_usage and .send_stream, read as DSPy's settings object reads them
    o, main = thread_local_overrides.get(), main_thread_config
    if (
        (o["callbacks"] if "callbacks" in o else main.get("callbacks"))
        or (o["track_usage"] if "track_usage" in o else main.get("track_usage"))
        or (o["send_stream"] if "send_stream" in o else main.get("send_stream")) is not None
    ):
        return None
    # (by identity, not ==: a wrapt wrapper compares equal to the function it wraps; _entry_points,
    # written out: this runs on every LM stage)
    seen = _SEEN[0]
    if (
        not (
            seen is not None
            and _P.__call__ is seen[0]
            and _P.acall is seen[1]
            and _P.forward is seen[2]
            and _P.aforward is seen[3]
            and _C.__call__ is seen[4]
            and _C.acall is seen[5]
            and _C.forward is seen[6]
            and _C.aforward is seen[7]
            and _M.__call__ is seen[8]
            and _M.acall is seen[9]
        )
        and not _entry_points_are_dspys()
    ):
        return None  # (wrapped by instrumentation, say: the ordinary call runs the wrappers)
    # (modules' attributes read from their __dict__: dspy.Module's attribute hook costs ten times more)
    chain = [module]
    attrs = _getattr(module, "__dict__")
    if type(module) is _C and attrs.keys().isdisjoint(_OWN) and not attrs.get("callbacks"):
        module = attrs.get("predict")
        if type(module) is not _P:  # (gone, or replaced by something else: DSPy's call)
            return None
        chain.append(module)
        attrs = _getattr(module, "__dict__")
    if type(module) is not _P or not attrs.keys().isdisjoint(_OWN) or attrs.get("callbacks"):
        return None
    return chain, attrs


_getattr = object.__getattribute__
_UNSET: Any = object()


#: Methods that, set on an instance (``pred.aforward = ...``), change what calling it does.
_OWN = frozenset({"forward", "aforward", "acall", "_forward_preprocess", "_forward_postprocess"})
_PREDICT = ("__call__", "acall", "forward", "aforward")
_GET = operator.attrgetter(*_PREDICT)


_P, _C, _M = dspy.Predict, dspy.ChainOfThought, dspy.Module


def _entry_points() -> tuple[Any, ...]:
    return (*_GET(_P), *_GET(_C), _M.__call__, _M.acall)


#: The entry points last found to be DSPy's own (compared per call by identity; kept, so no
#: identity is reused).
_SEEN: list[tuple[Any, ...] | None] = [None]


def _entry_points_are_dspys() -> bool:
    """Whether ``Predict`` and ``ChainOfThought`` are called the way DSPy defines them: the methods a
    call runs through are DSPy's plain functions, not patched or wrapped (OpenInference's
    instrumentation wraps ``Predict.forward``; its spans need the ordinary call)."""
    now = _entry_points()
    own = [
        *(
            type(fn) is FunctionType
            and fn.__qualname__ == f"{cls}.{name}"
            and fn.__code__.co_filename.replace("\\", "/").endswith(where)
            for fn, name, cls, where in zip(
                now[:8],
                _PREDICT * 2,
                ("Predict",) * 4 + ("ChainOfThought",) * 4,
                ("dspy/predict/predict.py",) * 4 + ("dspy/predict/chain_of_thought.py",) * 4,
                strict=True,
            )
            if not (cls == "ChainOfThought" and name in ("__call__", "acall"))
        ),
        is_dspys_entry(now[8], "__call__"),
        is_dspys_entry(now[9], "acall"),
        now[4] is now[8],  # (ChainOfThought's __call__ and acall are Module's own)
        now[5] is now[9],
    ]
    if all(own):
        _SEEN[0] = now
        return True
    return False


def _has_decisions(signature: Any, plan: Any = None) -> bool:
    """Whether ``resolve_adapter`` would do anything for this signature (wrap the adapter for
    decision outputs, or warn about nested ones); kept with the signature's plan, so a signature
    changed in place is looked at again. ``plan``: the signature's plan, when just checked."""
    if plan is None:
        plan = signature_plan(signature)
    found = None if plan is None else plan.decisions
    if found is None:
        from dspy.adapters.decision_state import DecisionState
        from dspy.adapters.types.decision import Choice, Noul, Score

        found = bool(DecisionState(signature, {}).types) or any(
            kind.extract_custom_type_from_annotation(field.rebuild_annotation())
            for field in signature.output_fields.values()
            for kind in (Noul, Choice, Score)
        )
        if plan is not None:
            plan.decisions = found
    return found


#: The adapters a call hands the signature's plan it has just checked (exact types: a subclass may
#: define its own ``__call__``).
_FAST_ADAPTERS = frozenset({FastChatAdapter, FastJSONAdapter})


def _prepare(predictor: Any, attrs: dict[str, Any], inputs: dict[str, Any], own: bool) -> tuple[Any, ...]:
    """``(adapter, lm, config, signature, demos, kwargs, plan)``: ``plan`` is the signature's plan
    when just found to match it and the adapter is a fast one (it then skips its own check)."""
    plan = None
    if own:
        lm, config, signature, demos, kwargs, plan = planned_preprocess(predictor, attrs, inputs)
    else:
        lm, config, signature, demos, kwargs = dspy.Predict._forward_preprocess(predictor, **inputs)
    adapter = setting("adapter") or dspy.ChatAdapter()  # (settings.adapter, without its hook)
    fields = attrs.get("fields", _UNSET)
    if fields is _UNSET:
        fields = predictor.fields
    if fields or getattr(lm, "supports_decision_requests", False) is True or _has_decisions(signature, plan):
        from dspy.adapters.decision import resolve_adapter

        adapter = resolve_adapter(lm, adapter, signature, predictor.fields, predictor.signature)
    if type(adapter) not in _FAST_ADAPTERS:
        plan = None
    return adapter, lm, config, signature, demos, kwargs, plan


def call_predictor(module: Any, inputs: dict[str, Any]) -> Any:
    """``module(**inputs)`` for a ``Predict`` / ``ChainOfThought``, by the short path when it applies."""
    found = _short(module)
    if found is None or "self" in inputs:  # (an input named self: the call fails as DSPy's does)
        return module(**inputs)
    chain, attrs = found
    predictor = chain[-1]
    token = push_callers(chain)
    try:
        own = untouched()
        adapter, lm, config, signature, demos, kwargs, plan = _prepare(predictor, attrs, inputs, own)
        if plan is None:
            completions = adapter(lm, lm_kwargs=config, signature=signature, demos=demos, inputs=kwargs)
        else:
            completions = adapter(
                lm, lm_kwargs=config, signature=signature, demos=demos, inputs=kwargs, _checked=plan
            )
        if own:
            return postprocess(predictor, completions, signature, kwargs)
        return dspy.Predict._forward_postprocess(predictor, completions, signature, **kwargs)
    finally:
        thread_local_overrides.reset(token)


async def acall_predictor(module: Any, inputs: dict[str, Any]) -> Any:
    """``await module.acall(**inputs)``, by the short path when it applies."""
    found = _short(module)
    if found is None or "self" in inputs:
        return await module.acall(**inputs)
    chain, attrs = found
    predictor = chain[-1]
    token = push_callers(chain)
    try:
        own = untouched()
        adapter, lm, config, signature, demos, kwargs, plan = _prepare(predictor, attrs, inputs, own)
        if plan is None:
            completions = await adapter.acall(
                lm, lm_kwargs=config, signature=signature, demos=demos, inputs=kwargs
            )
        else:
            completions = await adapter.acall(
                lm, lm_kwargs=config, signature=signature, demos=demos, inputs=kwargs, _checked=plan
            )
        if own:
            return postprocess(predictor, completions, signature, kwargs)
        return dspy.Predict._forward_postprocess(predictor, completions, signature, **kwargs)
    finally:
        thread_local_overrides.reset(token)
