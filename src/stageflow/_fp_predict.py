"""The fast path of :func:`stageflow.fingerprint` for a predictor (internal).

A cached ``dspy.Predict`` is fingerprinted on every call, so "has anything changed since last
time?" must cost a few microseconds. :func:`observe` reads what decides a predictor's outputs —
its class, its signature, instructions and fields (each field's type, default and settings, see
:func:`~stageflow._fp_digest.field_view`), the LM (its own or the one ``dspy.context`` provides:
class, model, ``kwargs``), ``config``, the adapter's class and settings, each demo's fields — into
one tuple, and :class:`PredictMemo` keeps a copy of that tuple (dicts copied) next to the
fingerprint computed from it. One tuple comparison then tells whether the fingerprint still holds.
Dicts are compared by value *and* by the types of their values, so ``temperature`` going from
``1`` to ``1.0`` or ``True`` is a change; an in-place edit of a demo or of ``lm.kwargs`` is a
change. A predictor whose state is not plain (a demo holding a list, an LM setting that is an
object) has no memo here and takes the general path of :mod:`stageflow.fingerprinting`.

A predictor or LM of your own subclass (``class MyPredict(dspy.Predict)``, ``class MyLM(dspy.BaseLM)``)
adds :func:`custom_spec` to the memo: the attribute values of your classes' bodies (an edited or
replaced ``forward`` is a change) and the instance attributes your code set (``lm.weights``), when
those are plain values; DSPy's own classes add nothing, so the usual case stays one comparison.

The memo holds classes (the predictor's, the signature, the LM's) and your classes' attributes,
but no instance: it keeps no predictor, LM or demo alive.
"""

from __future__ import annotations

import sys
from typing import Any

from stageflow._fp_digest import ADAPTER_SETTINGS, field_view, own_attributes, state_of, user_classes

__all__ = ["PredictMemo", "custom_spec", "observe", "read_custom"]

_SCALARS = frozenset({str, int, float, bool, type(None)})
_STR = frozenset({str})
_LM, _KWARGS, _CONFIG, _DEMOS = 4, 5, 7, 10  # positions in the observed tuple


def _adapter_settings(adapter: Any) -> tuple[Any, ...]:
    """DSPy's settings of an adapter (lists copied, so an in-place edit is a change)."""
    state = getattr(adapter, "__dict__", {})
    return tuple((k, list(v) if type(v) is list else v) for k, v in state.items() if k in ADAPTER_SETTINGS)


def observe(p: Any) -> tuple[Any, ...]:
    """What decides ``p``'s outputs besides its inputs, as one tuple (live dicts, not copies)."""
    return _observe(p)[0]


def _observe(p: Any) -> tuple[tuple[Any, ...], Any, dict[str, Any]]:
    """:func:`observe`, with the LM it found and ``p``'s ``__dict__``."""
    state = state_of(p, "__dict__")
    sig = state.get("signature")
    settings = sys.modules.get("dspy.dsp.utils.settings")
    main = settings.main_thread_config if settings is not None else {}
    overrides = settings.thread_local_overrides.get() if settings is not None else None
    if overrides:
        lm, adapter = overrides.get("lm", main.get("lm")), overrides.get("adapter", main.get("adapter"))
    else:
        lm, adapter = main.get("lm"), main.get("adapter")
    own = state.get("lm")
    if own is not None:
        lm = own
    kwargs = getattr(lm, "kwargs", None) if lm is not None else None
    config = state.get("config")
    demos = state.get("demos")
    seen = (
        type(p),
        sig,
        getattr(sig, "__doc__", None),
        None if sig is None else field_view(sig),
        None
        if lm is None
        else (
            type(lm),
            getattr(lm, "model", None),
            getattr(lm, "model_type", None),
            getattr(lm, "stageflow_identity", None),  # (a fake LM's script: stageflow.testing.FakeLM)
        ),
        kwargs,
        tuple(map(type, kwargs.values())) if type(kwargs) is dict else None,
        config,
        tuple(map(type, config.values())) if type(config) is dict else None,
        None if adapter is None else (type(adapter), _adapter_settings(adapter)),
        tuple(
            (type(ex), s := getattr(ex, "__dict__", {}).get("_store"), _kinds(s), _keys(ex)) for ex in demos
        )
        if type(demos) is list and demos
        else (type(demos), len(demos) if type(demos) is list else None),
    )
    return seen, lm, state


def _kinds(d: Any) -> tuple[type, ...] | None:
    return tuple(map(type, d.values())) if type(d) is dict else None


def _keys(ex: Any) -> frozenset[str] | None:
    keys = getattr(ex, "__dict__", {}).get("_input_keys")
    return None if keys is None else frozenset(keys)


def _plain(d: Any) -> bool:
    return type(d) is dict and _SCALARS.issuperset(map(type, d.values())) and _STR.issuperset(map(type, d))


#: Per object of your own class (the predictor, its LM): is it the LM, your classes in its MRO,
#: the names of its instance attributes (in order), the names your code set.
_Spec = tuple[tuple[bool, tuple[type, ...], tuple[str, ...], tuple[str, ...]], ...]


def custom_spec(p: Any) -> tuple[bool, _Spec | None]:
    """``(plain, spec)``: what to compare besides :func:`observe` when the predictor or its LM is of
    *your* subclass (``spec`` is ``None`` for DSPy's own classes, the usual case). ``plain`` is false
    when an attribute your code set is not a plain value (no memo: the general path compares it)."""
    _, lm, state = _observe(p)
    spec = []
    for is_lm, obj in ((False, p), (True, lm)):
        classes = user_classes(type(obj)) if obj is not None else ()
        if not classes:
            continue
        own = getattr(obj, "__dict__", None) if is_lm else state
        if type(own) is not dict:
            return False, None
        attrs = own_attributes(obj, own)
        if any(type(v) not in _SCALARS for _, v in attrs):
            return False, None
        spec.append((is_lm, classes, tuple(own), tuple(k for k, _ in attrs)))
    return True, tuple(spec) if spec else None


def read_custom(state: dict[str, Any], lm: Any, spec: _Spec) -> tuple[Any, ...]:
    """For each object of your class: its classes' bodies (attribute values, by identity), whether
    its instance attribute names are unchanged, and the values of the attributes your code set."""
    out = []
    for is_lm, classes, keys, names in spec:
        own = (getattr(lm, "__dict__", None) or {}) if is_lm else state
        bodies = tuple([tuple(vars(c).values()) for c in classes])
        out.append((bodies, tuple(own) == keys, tuple([own.get(n) for n in names])))
    return tuple(out)


class PredictMemo:
    """A copy of what one predictor's last fingerprint was computed from."""

    __slots__ = ("custom", "fp", "spec", "state")

    def __init__(self, state: tuple[Any, ...], fp: str, spec: _Spec | None = None) -> None:
        self.state = state
        self.fp = fp
        self.spec = spec
        self.custom: tuple[Any, ...] | None = None

    @classmethod
    def build(cls, p: Any, fp: str) -> PredictMemo | None:
        """A memo of ``p``'s current state, or ``None`` when that state is not plain."""
        seen = list(observe(p))
        kwargs, config, demos = seen[_KWARGS], seen[_CONFIG], seen[_DEMOS]
        if (kwargs is not None and not _plain(kwargs)) or not _plain(config):
            return None
        if seen[_LM] is not None and kwargs is None:
            return None
        if demos and type(demos[0]) is tuple:  # demos present: each store must be plain
            if not all(_plain(store) for _, store, _, _ in demos):
                return None
            seen[_DEMOS] = tuple((t, dict(store), kinds, keys) for t, store, kinds, keys in demos)
        seen[_KWARGS] = None if kwargs is None else dict(kwargs)
        seen[_CONFIG] = dict(config)
        plain, spec = custom_spec(p)
        if not plain:
            return None  # your subclass holds objects: the general path compares them
        memo = cls(tuple(seen), fp, spec)
        if spec is not None:
            _, lm, state = _observe(p)
            memo.custom = read_custom(state, lm, spec)
        return memo

    def matches(self, p: Any) -> bool:
        """Whether ``p`` is in the state this memo was built from (then ``self.fp`` is its fingerprint)."""
        seen, lm, state = _observe(p)
        if seen != self.state:
            return False
        return self.spec is None or read_custom(state, lm, self.spec) == self.custom
