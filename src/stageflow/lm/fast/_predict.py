"""``Predict``'s own steps around the adapter call, from a per-signature table, for the stage path.

``dspy.Predict._forward_preprocess`` (DSPy 3.4.1) rebuilds the signature's input-field table four
times per call and reads DSPy's settings through their attribute hook; ``_forward_postprocess``
builds the ``Prediction`` through three constructors that each set attributes through another hook.
Together they cost about a sixth of a ``question -> answer`` stage on a fast LM. :func:`preprocess`
and :func:`postprocess` give the same results from the signature's plan (the one the fast adapter
uses, checked on every call against the signature as it is now) for the common case, and hand
everything else to DSPy's own methods, which then decide (and warn, or raise) as always:

- an input named as one of ``Predict``'s own keywords (``signature``, ``demos``, ``config``, ``lm``,
  ``prediction``, ...), an input the signature does not have, a required input missing, a value
  whose type does not match its field (DSPy warns about the last three);
- no LM, or an LM that is not a ``dspy.BaseLM``; a signature the plan cannot describe;
- ``Predict``'s methods, ``Prediction`` / ``Completions`` / ``Example`` constructors replaced or
  wrapped after import (instrumentation), adapter output that is not a list of dicts.

Example:
    >>> import dspy
    >>> from stageflow.lm.fast._predict import postprocess, preprocess, untouched
    >>> from stageflow.testing import FakeLM
    >>> qa = dspy.Predict("question -> answer")
    >>> untouched()
    True
    >>> with dspy.context(lm=FakeLM({"answer": "4"})):
    ...     lm, config, signature, demos, kwargs = preprocess(qa, vars(qa), {"question": "2+2?"})
    ...     pred = postprocess(qa, [{"answer": "4"}], signature, kwargs)
    >>> kwargs, pred.answer, pred.completions.answer
    ({'question': '2+2?'}, '4', ['4'])
"""

from __future__ import annotations

import importlib
import weakref
from typing import Any

import dspy
from dspy.clients.base_lm import BaseLM
from dspy.primitives.example import Example
from dspy.primitives.prediction import Completions, Prediction
from dspy.utils.constants import IS_TYPE_UNDEFINED
from pydantic_core import PydanticUndefined

from stageflow._callers import setting
from stageflow.lm.fast._plan import Plan, plan_for
from stageflow.lm.fast._watch import recheck

__all__ = ["planned_preprocess", "postprocess", "preprocess", "signature_plan", "untouched"]

_predict_module: Any = importlib.import_module("dspy.predict.predict")
_prediction_module: Any = importlib.import_module("dspy.primitives.prediction")

#: ``Predict``'s own keywords (and the one its post-processing pops, and ``self``, which its methods
#: are called with): an input by one of these names means something to DSPy's methods, which handle
#: it (or fail on it, as a plain call does).
_KEYWORDS = frozenset({"self", "signature", "new_signature", "demos", "config", "lm", "prediction", "_trace"})

#: The plans of the signatures seen here (the fast adapters keep their own: theirs grow prompt caches).
_PLANS: weakref.WeakKeyDictionary[Any, Plan] = weakref.WeakKeyDictionary()


#: What :func:`untouched` watches, as ``(owner, attribute, expected)`` (see
#: :mod:`~stageflow.lm.fast._watch`): ``expected`` is where DSPy's own function's code is, or the
#: object itself (a class; ``object``'s own
#: ``__setattr__``, ``__delattr__``, ``__new__``: what the shortcut builds the ``Prediction`` with,
#: writing its ``__dict__`` directly). ``from_completions`` is read from the class's own ``__dict__``
#: (the classmethod, not a new bound method per read).
_WATCHED: tuple[tuple[Any, str, Any], ...] = (
    (dspy.Predict, "_forward_preprocess", (("Predict._forward_preprocess", "dspy/predict/predict.py"),)),
    (dspy.Predict, "_forward_postprocess", (("Predict._forward_postprocess", "dspy/predict/predict.py"),)),
    (Prediction, "from_completions", (("Prediction.from_completions", "dspy/primitives/prediction.py"),)),
    (Prediction, "__init__", (("Prediction.__init__", "dspy/primitives/prediction.py"),)),
    (Example, "__init__", (("Example.__init__", "dspy/primitives/example.py"),)),
    (Prediction, "__setattr__", (("Example.__setattr__", "dspy/primitives/example.py"),)),
    (Prediction, "__delattr__", object.__delattr__),
    (Prediction, "__new__", object.__new__),
    (Completions, "__init__", (("Completions.__init__", "dspy/primitives/prediction.py"),)),
    (Completions, "__setattr__", object.__setattr__),
    (Completions, "__new__", object.__new__),
    (Completions, "items", (("Completions.items", "dspy/primitives/prediction.py"),)),
    (_predict_module, "Prediction", Prediction),  # (what _forward_postprocess builds)
    (_prediction_module, "Completions", Completions),  # (what from_completions builds)
)


def _methods() -> tuple[Any, ...]:
    """What :func:`untouched` looks at now (in the order of :data:`_WATCHED`)."""
    return tuple(
        owner.__dict__.get(name) if name == "from_completions" else getattr(owner, name)
        for owner, name, _ in _WATCHED
    )


#: The methods last found to be DSPy's own (compared by identity on each call).
_SEEN: list[tuple[Any, ...] | None] = [None]
_Predict = dspy.Predict


def untouched() -> bool:
    """Whether ``Predict``'s steps, the constructors of what they build and the names they build it
    by are DSPy's own functions (not replaced or wrapped, before stageflow was imported or since):
    :func:`preprocess` and :func:`postprocess` apply only then. Checked once per call, by the caller."""
    seen = _SEEN[0]
    if (  # (the common case: what was found to be DSPy's own last time; _WATCHED, written out)
        seen is not None
        and _Predict._forward_preprocess is seen[0]
        and _Predict._forward_postprocess is seen[1]
        and Prediction.__dict__.get("from_completions") is seen[2]
        and Prediction.__init__ is seen[3]
        and Example.__init__ is seen[4]
        and Prediction.__setattr__ is seen[5]
        and Prediction.__delattr__ is seen[6]
        and Prediction.__new__ is seen[7]
        and Completions.__init__ is seen[8]
        and Completions.__setattr__ is seen[9]
        and Completions.__new__ is seen[10]
        and Completions.items is seen[11]
        and _predict_module.Prediction is seen[12]
        and _prediction_module.Completions is seen[13]
    ):
        return True
    return recheck(_SEEN, _methods(), _WATCHED)


def signature_plan(signature: Any) -> Plan | None:
    """The signature's current plan (rebuilt when the signature changed in place); ``None`` for
    what is not a DSPy signature class."""
    return plan_for(_PLANS, signature)


def preprocess(predictor: Any, attrs: dict[str, Any], inputs: dict[str, Any]) -> tuple[Any, ...]:
    """``dspy.Predict._forward_preprocess(predictor, **inputs)``: ``(lm, config, signature, demos,
    kwargs)``; ``inputs`` is not changed. ``attrs`` is the predictor's ``__dict__`` (read directly:
    ``dspy.Module``'s attribute hook costs ten times more). Only while :func:`untouched`."""
    return planned_preprocess(predictor, attrs, inputs)[:5]


def planned_preprocess(predictor: Any, attrs: dict[str, Any], inputs: dict[str, Any]) -> tuple[Any, ...]:
    """:func:`preprocess`, and the signature's plan it used (``None`` when DSPy's method did it)."""
    if not _KEYWORDS.isdisjoint(inputs):
        return (*dspy.Predict._forward_preprocess(predictor, **inputs), None)
    try:
        signature, own_lm, own_config, demos = (
            attrs["signature"],
            attrs["lm"],
            attrs["config"],
            attrs["demos"],
        )
    except KeyError:  # (not set on the instance: DSPy's method reads them as it reads them)
        return (*dspy.Predict._forward_preprocess(predictor, **inputs), None)
    plan = plan_for(_PLANS, signature)
    lm = own_lm or setting("lm")
    if plan is None or plan.reason is not None or not isinstance(lm, BaseLM):
        return (*dspy.Predict._forward_preprocess(predictor, **inputs), None)
    fields: tuple[Any, ...] = plan.inputs  # (each field's json_schema_extra is a dict: the plan checked it)
    kwargs = dict(inputs)
    check_types = setting("warn_on_type_mismatch")
    compatible = _predict_module._is_value_compatible_with_type
    for name, info, _, _ in fields:
        if name in kwargs:
            value = kwargs[name]
        elif info.default is not PydanticUndefined:
            value = kwargs[name] = info.default  # (checked like a given value, as DSPy checks it)
        else:  # (missing: DSPy's method decides, and warns unless the field allows None)
            return (*dspy.Predict._forward_preprocess(predictor, **inputs), None)
        if (
            check_types
            and value is not None
            and not info.json_schema_extra.get(IS_TYPE_UNDEFINED, False)
            and type(value) is not info.annotation
            and not compatible(value, info.annotation)
        ):
            return (*dspy.Predict._forward_preprocess(predictor, **inputs), None)  # (it warns)
    if len(kwargs) != len(fields):  # (every field is in kwargs by now: the rest are extra)
        return (*dspy.Predict._forward_preprocess(predictor, **inputs), None)  # (it warns)
    config = {**own_config}
    defaults = getattr(lm, "kwargs", {})
    temperature = config.get("temperature") or defaults.get("temperature")
    generations = config.get("n") or defaults.get("n") or defaults.get("num_generations") or 1
    if (temperature is None or temperature <= 0.15) and generations > 1:
        config["temperature"] = 0.7
    return lm, config, signature, demos, kwargs, plan


def postprocess(predictor: Any, completions: Any, signature: Any, kwargs: dict[str, Any]) -> Any:
    """``dspy.Predict._forward_postprocess(predictor, completions, signature, **kwargs)``: the
    ``Prediction``, added to DSPy's trace when one is kept. Only while :func:`untouched`."""
    if type(completions) is not list or "_trace" in kwargs:
        return dspy.Predict._forward_postprocess(predictor, completions, signature, **kwargs)
    columns: dict[str, list[Any]] = {}
    for completion in completions:
        if type(completion) is not dict:
            return dspy.Predict._forward_postprocess(predictor, completions, signature, **kwargs)
        for key, value in completion.items():
            columns.setdefault(key, []).append(value)
    if columns:
        length = len(completions)
        for column in columns.values():
            if len(column) != length:  # (a key missing from some completions: DSPy refuses)
                return dspy.Predict._forward_postprocess(predictor, completions, signature, **kwargs)
    # What Prediction.from_completions builds (attributes in the order its constructors set them).
    found = object.__new__(Completions)
    found.signature = signature
    found._completions = columns
    pred = object.__new__(Prediction)
    attrs = pred.__dict__
    attrs["_store"] = {key: column[0] for key, column in columns.items()}
    attrs["_completions"] = found
    attrs["_lm_usage"] = None
    trace = setting("trace")
    if trace is not None:
        limit = setting("max_trace_size")
        if limit > 0:
            if len(trace) >= limit:
                trace.pop(0)
            trace.append((predictor, {**kwargs}, pred))
    return pred
