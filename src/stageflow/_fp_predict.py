"""The fast path of :func:`stageflow.fingerprint` for a predictor (internal).

A cached ``dspy.Predict`` is fingerprinted on every call, so "has anything changed since last
time?" must cost about a microsecond. :class:`PredictMemo` remembers what decided the last
fingerprint — the signature (by weak reference) and its instructions, copies of the demos' fields,
the LM's class, model and ``kwargs``, ``config``, the adapter — and :meth:`PredictMemo.matches`
compares the predictor's current state with it field by field, stopping at the first difference.
Dicts are compared by value *and* by the types of their values, so ``temperature`` going from
``1`` to ``1.0`` or ``True`` is a change. A predictor whose state is not plain (a demo holding a
list, an LM setting that is an object) has no memo here and takes the general path.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from stageflow._fp_digest import ADAPTER_SETTINGS, current, state_of

__all__ = ["PredictMemo"]

_SCALARS = frozenset({str, int, float, bool, type(None)})
_STR = frozenset({str})

Plain = tuple[dict[str, Any], tuple[type, ...]]


def _plain(d: Any) -> Plain | None:
    """A copy of a dict of string keys and scalar values, with the types of the values."""
    if type(d) is not dict:
        return None
    kinds = tuple(map(type, d.values()))
    if _SCALARS.issuperset(kinds) and _STR.issuperset(map(type, d)):
        return dict(d), kinds
    return None


def _same(d: Any, plain: Plain) -> bool:
    return type(d) is dict and d == plain[0] and tuple(map(type, d.values())) == plain[1]


def _adapter_settings(adapter: Any) -> tuple[Any, ...]:
    state = getattr(adapter, "__dict__", {})
    return tuple(
        (k, list(v) if type(v) is list else v) for k in ADAPTER_SETTINGS if (v := state.get(k, k)) is not k
    )


class PredictMemo:
    """What one predictor's last fingerprint was computed from (plain copies and weak references)."""

    __slots__ = ("adapter", "config", "demos", "doc", "fp", "lm", "ptype", "sig")

    def __init__(
        self,
        p: Any,
        sig: Any,
        demos: tuple[tuple[Any, Plain, frozenset[str] | None], ...],
        lm: tuple[Any, Any, Any, Plain] | None,
        config: Plain,
        adapter: Any,
        fp: str,
    ) -> None:
        self.ptype = weakref.ref(type(p))
        self.sig: weakref.ref[Any] | None = None if sig is None else weakref.ref(sig)
        self.doc: str | None = None if sig is None else sig.__doc__
        self.demos = demos
        self.lm = lm
        self.config = config
        self.adapter: tuple[weakref.ref[Any], tuple[Any, ...]] | None = (
            None if adapter is None else (weakref.ref(adapter), _adapter_settings(adapter))
        )
        self.fp = fp

    @classmethod
    def build(cls, p: Any, fp: str) -> PredictMemo | None:
        """A memo of ``p``'s current state, or ``None`` when that state is not plain."""
        state = state_of(p, "__dict__")
        lm, adapter = current()
        own = state.get("lm")
        if own is not None:
            lm = own
        if adapter is not None and type(adapter).__module__.split(".")[0] != "dspy":
            return None  # your own adapter class: the general path compares its code
        demos_list = state.get("demos")
        config = _plain(state.get("config"))
        if type(demos_list) is not list or config is None:
            return None
        demos = []
        for ex in demos_list:
            ex_state = getattr(ex, "__dict__", None)
            store = _plain(ex_state.get("_store")) if ex_state is not None else None
            if store is None or ex_state is None:
                return None
            keys = ex_state.get("_input_keys")
            demos.append((weakref.ref(type(ex)), store, None if keys is None else frozenset(keys)))
        lm_memo = None
        if lm is not None:
            kwargs = _plain(getattr(lm, "kwargs", None))
            if kwargs is None:
                return None
            model = getattr(lm, "model", None)
            lm_memo = (weakref.ref(type(lm)), model, getattr(lm, "model_type", None), kwargs)
        return cls(p, state.get("signature"), tuple(demos), lm_memo, config, adapter, fp)

    def matches(self, p: Any) -> bool:
        """Whether ``p`` is in the state this memo was built from (then ``self.fp`` is its fingerprint)."""
        if type(p) is not self.ptype():
            return False
        state = state_of(p, "__dict__")
        sig = state.get("signature")
        memo_sig = self.sig
        if sig is None or memo_sig is None:
            if sig is not None or memo_sig is not None:
                return False
        elif memo_sig() is not sig or sig.__doc__ != self.doc:
            return False
        settings = sys.modules.get("dspy.dsp.utils.settings")  # (current(), inlined: every call)
        main = settings.main_thread_config if settings is not None else {}
        overrides = settings.thread_local_overrides.get() if settings is not None else None
        if overrides:
            lm, adapter = overrides.get("lm", main.get("lm")), overrides.get("adapter", main.get("adapter"))
        else:
            lm, adapter = main.get("lm"), main.get("adapter")
        own = state.get("lm")
        if own is not None:
            lm = own
        memo_adapter = self.adapter
        if adapter is None or memo_adapter is None:
            if adapter is not None or memo_adapter is not None:
                return False
        elif memo_adapter[0]() is not adapter or _adapter_settings(adapter) != memo_adapter[1]:
            return False
        memo_lm = self.lm
        if lm is None or memo_lm is None:
            if lm is not None or memo_lm is not None:
                return False
        else:
            kwargs, (kwargs_copy, kwargs_kinds) = getattr(lm, "kwargs", None), memo_lm[3]
            if (
                type(lm) is not memo_lm[0]()
                or getattr(lm, "model", None) != memo_lm[1]
                or getattr(lm, "model_type", None) != memo_lm[2]
                or type(kwargs) is not dict
                or kwargs != kwargs_copy
                or tuple(map(type, kwargs.values())) != kwargs_kinds
            ):
                return False
        config = state.get("config")
        if (config or self.config[0]) and not _same(config, self.config):
            return False
        demos = state.get("demos")
        if type(demos) is not list or len(demos) != len(self.demos):
            return False
        if not demos:
            return True
        for ex, (ex_type, store, keys) in zip(demos, self.demos, strict=True):
            ex_state = getattr(ex, "__dict__", None)
            if type(ex) is not ex_type() or ex_state is None or not _same(ex_state.get("_store"), store):
                return False
            current_keys = ex_state.get("_input_keys")
            if (current_keys is None) != (keys is None) or (keys is not None and current_keys != keys):
                return False
        return True
