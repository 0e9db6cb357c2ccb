"""``FastChatAdapter`` and ``FastJSONAdapter``: DSPy's adapters, minus the repeated work.

Each is a subclass of the DSPy adapter it stands for and sends the LM exactly the messages that
adapter would send, and parses answers to exactly the values it would return (a test compares
them on a corpus of signatures). What it does differently is *when* work happens: the system
message, the output-format reminder, the field tables, the value parsers, the formatted demos
and (JSON) the structured-output schema are built once per signature (or demo set) instead of
on every call. Their ``__call__`` / ``acall`` do the steps of DSPy's (see
:mod:`~stageflow.lm.fast._adapter_call` and :mod:`~stageflow.lm.fast._lm_call`), and DSPy's own
methods run whenever one of those steps was replaced, so callbacks, history, usage tracking, the LM
cache, the JSON fallback and ``inspect_history`` see what they always see.

The classes carry DSPy's class names (``FastChatAdapter.__name__ == "ChatAdapter"``), because
DSPy reads adapter class names in places (streaming listeners, parse error messages); their
qualified names say what they are.

Anything the fast path does not cover runs DSPy's own code and is counted
(:func:`stageflow.lm.fast.fast_path_stats`): signatures with DSPy custom types (images, audio,
history, tools) or types it cannot reproduce exactly, subclasses that override a formatting
hook, values that serialise to DSPy custom-type blocks. The first call of every signature is
also built both ways and compared; a difference (a DSPy upgrade changed its formatting, say)
sends that signature to DSPy's code for good, with a warning. An answer the fast parser rejects
is parsed again by DSPy's code, so parse errors are DSPy's own, word for word.

Example:
    >>> import dspy
    >>> from stageflow.lm.fast import FastChatAdapter
    >>> sig = dspy.Signature("question -> answer", "Answer briefly.")
    >>> fast = FastChatAdapter().format(sig, [], {"question": "2+2?"})
    >>> fast == dspy.ChatAdapter().format(sig, [], {"question": "2+2?"})
    True
    >>> FastChatAdapter().parse(sig, "[[ ## answer ## ]]\\n4\\n\\n[[ ## completed ## ]]")
    {'answer': '4'}
"""

from __future__ import annotations

import copy
import inspect
import logging
import operator
import weakref
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any, ClassVar

import dspy
import pydantic
from dspy.adapters.json_adapter import _get_structured_outputs_response_format
from dspy.adapters.types.base_type import CUSTOM_TYPE_START_IDENTIFIER
from dspy.utils.callback import with_callbacks
from dspy.utils.exceptions import AdapterParseError

from stageflow.lm.fast import _adapter_call, _lm_call
from stageflow.lm.fast._format import demo_key, user_content
from stageflow.lm.fast._parse import complete_outputs, parse_chat, parse_json
from stageflow.lm.fast._plan import _UNSET, Plan, plan_for
from stageflow.lm.fast._stats import count_adapter_fallback, count_fallback, count_fast, logger

__all__ = ["FastChatAdapter", "FastJSONAdapter"]

# DSPy's own implementations, without the callback wrappers (the public methods are wrapped).
_DSPY_FORMAT = inspect.unwrap(dspy.ChatAdapter.format)
_DSPY_CHAT_PARSE = inspect.unwrap(dspy.ChatAdapter.parse)
_DSPY_JSON_PARSE = inspect.unwrap(dspy.JSONAdapter.parse)
_JSON_LOGGER = logging.getLogger("dspy.adapters.json_adapter")

# Compare the first fast format and parse of every signature with DSPy's (tests switch it off to
# see the fast path's own output).
VERIFY_FIRST_CALL = True

# Methods whose output the fast path caches or reproduces; a subclass overriding one of them
# gets DSPy's code path, which calls its override.
_HOOKS = (
    "format_system_message",
    "format_field_description",
    "format_field_structure",
    "format_task_description",
    "format_user_message_content",
    "format_assistant_message_content",
    "format_demos",
    "format_field_with_value",
    "format_conversation_history",
    "user_message_output_requirements",
    "_get_history_field_name",
)
_HOOK_NAMES = frozenset(_HOOKS)  # (also set on an instance: ``adapter.format_task_description = ...``)
_GET_HOOKS = operator.attrgetter(*_HOOKS)


# Within one adapter call, ``_call_preprocess``, ``format``, ``_call_postprocess`` and ``parse``
# each ask for the signature's plan; the first lookup (a weak-dictionary get and a check that the
# signature is unchanged) is kept for the rest of the call: (adapter, signature, plan). (Keyed by the
# adapter, not its class: another adapter of the class called meanwhile may set its own hooks.)
_CallPlan = tuple[Any, Any, Plan | None]
_CALL_PLAN: ContextVar[_CallPlan | None] = ContextVar("stageflow_fast_call_plan", default=None)
_IN_CALL: _CallPlan = (None, None, None)


class _FastPath:
    """The shared fast path; comes before the DSPy adapter in each class's MRO."""

    _dspy_base: ClassVar[type]
    _plans: ClassVar[weakref.WeakKeyDictionary[Any, Plan]]
    _pure: ClassVar[bool] = True

    _methods: ClassVar[tuple[Any, ...]] = ()
    _taken: ClassVar[tuple[Any, ...]] = ()
    _get_taken: ClassVar[Any]
    _format_wrapper: ClassVar[Any] = None
    _parse_wrapper: ClassVar[Any] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)  # DSPy's Adapter wraps format/parse with callbacks here
        base = cls._dspy_base
        cls._pure = all(getattr(cls, hook) is getattr(base, hook) for hook in _HOOKS)
        # The formatting methods as the fast path reproduces them: one patched later on the class
        # (``dspy.ChatAdapter.format_task_description = ...``) sends its calls to DSPy's code.
        cls._methods = _GET_HOOKS(cls)
        # DSPy's own methods this class replaces, as they were at import (see base_patched).
        names = sorted(
            {
                n
                for k in cls.__mro__[: cls.__mro__.index(base)]
                for n in vars(k)
                if callable(getattr(base, n, None))
            }
            - {"__init__", "__init_subclass__", "__new__"}
        )
        cls._get_taken = staticmethod(operator.attrgetter(*names))
        cls._taken = cls._get_taken(base)
        # DSPy's callback wrappers of this class's format and parse (see _adapter_call.unwrapped).
        cls._format_wrapper = cls.__dict__.get("format")
        cls._parse_wrapper = cls.__dict__.get("parse")

    @classmethod
    def _unpatched(cls) -> bool:
        return bool(_GET_HOOKS(cls) == cls._methods)  # (a tuple compare: identity first, in C)

    @classmethod
    def base_patched(cls) -> bool:
        """Whether a method of DSPy's adapter class that this fast class takes over (``format``,
        ``parse``, ``__call__``, ``_call_preprocess``...) was replaced on DSPy's class since import:
        then the adapter is left to DSPy's own code (:func:`~stageflow.lm.fast.fast_adapter_for`)."""
        return bool(cls._get_taken(cls._dspy_base) != cls._taken)

    # -- plans ---------------------------------------------------------------------------------

    def _plan(self, signature: Any) -> Plan | None:
        """The signature's plan, or ``None`` when DSPy's code must handle this call."""
        cls = type(self)
        memo = _CALL_PLAN.get()
        if memo is not None and memo[0] is self and memo[1] is signature:
            plan = memo[2]  # (looked up, and this adapter checked, earlier in this adapter call)
        else:
            if not cls._pure or not _HOOK_NAMES.isdisjoint(self.__dict__) or not cls._unpatched():
                plan = None
            else:
                plan = plan_for(cls._plans, signature)
            if memo is not None:  # (None: format or parse called on their own)
                _CALL_PLAN.set((self, signature, plan))
        if plan is None or plan.reason is not None or plan.differs is not None:
            return None
        return plan

    def _call_memo(self, checked: Plan | None, signature: Any) -> _CallPlan:
        """What an adapter call's plan memo starts as: empty (:meth:`_plan` looks the plan up), or,
        when the LM-stage path has just found ``checked`` (its own plan of ``signature``) to match
        the signature, this adapter's plan without checking the signature a second time: a plan
        found to match beside ``checked`` matches whenever ``checked`` does (both compare the same
        identities of the signature)."""
        if checked is None:
            return _IN_CALL
        cls = type(self)
        if not cls._pure or not _HOOK_NAMES.isdisjoint(self.__dict__) or not cls._unpatched():
            return (self, signature, None)
        plans = cls._plans
        plan = plans.get(signature)
        if plan is None or plan.checked_with is not checked:
            plan = plan_for(plans, signature)
            if plan is not None:
                plan.checked_with = checked
        return (self, signature, plan)

    # -- the adapter call: the plan is looked up (and checked against the signature) once -------

    def __call__(self, lm: Any, lm_kwargs: Any, signature: Any, demos: Any, inputs: Any) -> Any:
        token = _CALL_PLAN.set(_IN_CALL)
        try:
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)  # type: ignore[misc]
        finally:
            _CALL_PLAN.reset(token)

    async def acall(self, lm: Any, lm_kwargs: Any, signature: Any, demos: Any, inputs: Any) -> Any:
        token = _CALL_PLAN.set(_IN_CALL)
        try:
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)  # type: ignore[misc]
        finally:
            _CALL_PLAN.reset(token)

    # -- ChatAdapter.__call__ around Adapter.__call__ with DSPy's scopes set directly (see
    # _adapter_call); the fast classes call these only while _adapter_call.untouched() --------

    def _chat_call(self, lm: Any, lm_kwargs: Any, signature: Any, demos: Any, inputs: Any) -> Any:
        progress, outer, planning = _adapter_call.enter(lm, lm_kwargs)
        try:
            try:
                try:
                    processed, messages = self._begin(lm, lm_kwargs, signature, demos, inputs)
                    marker = _adapter_call.mark(lm, messages)
                    try:
                        outputs = _lm_call.call(lm, messages, lm_kwargs)
                    finally:
                        _adapter_call.unmark(marker)
                    return self._call_postprocess(processed, signature, outputs, lm, lm_kwargs)
                finally:
                    _adapter_call.leave_planning(planning)
            except AdapterParseError:
                if not self._falls_back(progress):
                    raise
                return self._make_json_adapter_fallback()(lm, lm_kwargs, signature, demos, inputs)  # type: ignore[attr-defined]
        finally:
            _adapter_call.leave(outer)

    async def _achat_call(self, lm: Any, lm_kwargs: Any, signature: Any, demos: Any, inputs: Any) -> Any:
        progress, outer, planning = _adapter_call.enter(lm, lm_kwargs)
        try:
            try:
                try:
                    await _adapter_call.prepare_async(lm)
                    processed, messages = self._begin(lm, lm_kwargs, signature, demos, inputs)
                    marker = _adapter_call.mark(lm, messages)
                    try:
                        outputs = await _lm_call.acall(lm, messages, lm_kwargs)
                    finally:
                        _adapter_call.unmark(marker)
                    return self._call_postprocess(processed, signature, outputs, lm, lm_kwargs)
                finally:
                    _adapter_call.leave_planning(planning)
            except AdapterParseError:
                if not self._falls_back(progress):
                    raise
                fallback = self._make_json_adapter_fallback()  # type: ignore[attr-defined]
                return await fallback.acall(lm, lm_kwargs, signature, demos, inputs)
        finally:
            _adapter_call.leave(outer)

    def _begin(self, lm: Any, lm_kwargs: Any, signature: Any, demos: Any, inputs: Any) -> tuple[Any, Any]:
        """``Adapter.__call__`` up to the LM call: the processed signature and the messages."""
        processed = self._call_preprocess(lm, lm_kwargs, signature, inputs)
        messages = _adapter_call.unwrapped(self, "format", type(self)._format_wrapper)(
            processed, demos, inputs
        )
        if lm_kwargs.get("parallel_tool_calls") is not None:
            lm_kwargs.setdefault("tool_choice", "auto")
        return processed, messages

    def _falls_back(self, progress: Any) -> bool:
        """Whether ``ChatAdapter.__call__`` retries a parse error with the JSON adapter."""
        return not (
            progress.emitted or isinstance(self, dspy.JSONAdapter) or not self.use_json_adapter_fallback  # type: ignore[attr-defined]
        )

    def _why_not(self, signature: Any) -> str:
        """Why :meth:`_plan` gave no plan, for the counters."""
        if not type(self)._pure:
            return f"{type(self).__qualname__} overrides a formatting method"
        own = sorted(_HOOK_NAMES.intersection(self.__dict__))
        if own:
            return f"the adapter instance sets its own {own[0]}"
        if not type(self)._unpatched():
            return f"a formatting method of {type(self)._dspy_base.__name__} was replaced after import"
        plan = plan_for(type(self)._plans, signature)
        if plan is None:
            return f"not a DSPy signature class: {type(signature).__qualname__}"
        return plan.reason or plan.differs or "unknown"

    def _differs(self, plan: Plan, signature: Any, what: str) -> None:
        plan.differs = f"the fast {what} differed from DSPy's output"
        logger.warning(
            "stageflow fast adapter: %s for signature %s (%s); DSPy's own %s code handles this "
            "signature from now on. Please report it with the signature and the DSPy version.",
            plan.differs,
            getattr(signature, "__name__", "?"),
            getattr(signature, "signature", "?"),
            type(self)._dspy_base.__name__,
        )

    # -- format --------------------------------------------------------------------------------

    def format(self, signature: Any, demos: Any, inputs: Any) -> list[dict[str, Any]]:
        plan = self._plan(signature)
        if plan is None:
            why = self._why_not(signature)
        else:
            try:
                messages = self._fast_format(plan, signature, demos, inputs)
            except Exception as e:  # DSPy's code below decides (it raises its own error if any)
                messages = f"the fast prompt raised {type(e).__name__}"
            if not isinstance(messages, str):
                if plan.format_verified or not VERIFY_FIRST_CALL:
                    count_fast()
                    return messages
                return self._verified_format(plan, signature, demos, inputs, messages)
            why = messages
        count_fallback(why)
        return _DSPY_FORMAT(self, signature, demos, inputs)  # type: ignore[no-any-return]

    def _verified_format(
        self, plan: Plan, signature: Any, demos: Any, inputs: Any, messages: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Build the first prompt of a signature both ways; on a difference DSPy's wins."""
        expected = _DSPY_FORMAT(self, signature, demos, inputs)
        plan.format_verified = True
        if expected != messages:
            self._differs(plan, signature, "prompt")
            count_fallback(plan.differs or "")
            return expected  # type: ignore[no-any-return]
        count_fast()
        return messages

    def _fast_format(self, plan: Plan, signature: Any, demos: Any, inputs: Any) -> list[dict[str, Any]] | str:
        """The messages, or why this call needs DSPy's code."""
        system = plan.system
        if system is None:
            system = plan.system = self.format_system_message(signature)  # type: ignore[attr-defined]
        reminder = plan.output_reminder
        if reminder is _UNSET:
            reminder = plan.output_reminder = self.user_message_output_requirements(signature)  # type: ignore[attr-defined]
        messages = [{"role": "system", "content": system}]
        if demos:
            block = self._demo_block(plan, signature, demos)
            if block is None:
                return "a demo value serialises to DSPy custom-type blocks (an image...)"
            messages.extend({"role": role, "content": content} for role, content in block)
        content = user_content(plan, inputs, reminder)
        if CUSTOM_TYPE_START_IDENTIFIER in content:
            return "an input value serialises to DSPy custom-type blocks (an image...)"
        if content:
            messages.append({"role": "user", "content": content})
        return messages

    def _demo_block(
        self, plan: Plan, signature: Any, demos: Sequence[Any]
    ) -> tuple[tuple[str, str], ...] | None:
        key = demo_key(plan.names, demos)
        if key is not None:
            block = plan.demo_blocks.get(key)
            if block is not None:
                return block
        formatted = self.format_demos(signature, demos)  # type: ignore[attr-defined]
        pairs = []
        for message in formatted:
            content = message.get("content")
            if (
                len(message) != 2
                or not isinstance(content, str)
                or (message.get("role") == "user" and CUSTOM_TYPE_START_IDENTIFIER in content)
            ):
                return None
            pairs.append((message["role"], content))
        block = tuple(pairs)
        if key is not None:
            plan.remember_demos(key, block)
        return block

    # -- parse ---------------------------------------------------------------------------------

    def _fast_parse(self, plan: Plan, signature: Any, completion: str) -> dict[str, Any]:
        raise NotImplementedError

    def _dspy_parse(self, signature: Any, completion: str) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        plan = self._plan(signature)
        if plan is None:
            return self._dspy_parse(signature, completion)
        if plan.parse_verified or not VERIFY_FIRST_CALL:
            try:
                return self._fast_parse(plan, signature, completion)
            except Exception:
                # An answer that does not parse (or a fast-path bug): DSPy's parse gives the
                # result or raises the error DSPy users know, word for word.
                return self._dspy_parse(signature, completion)
        return self._verified_parse(plan, signature, completion)

    def _verified_parse(self, plan: Plan, signature: Any, completion: str) -> dict[str, Any]:
        """Parse both ways once per signature; on any difference DSPy's result (or error) wins."""
        expected: Any = None
        expected_error: Exception | None = None
        try:
            expected = self._dspy_parse(signature, completion)
        except Exception as e:
            expected_error = e
        try:
            got: Any = self._fast_parse(plan, signature, completion)
            got_error: Exception | None = None
        except Exception as e:
            got, got_error = None, e
        plan.parse_verified = True
        if expected_error is not None or got_error is not None:
            same = type(expected_error) is type(got_error) and str(expected_error) == str(got_error)
        else:
            same = _same_values(expected, got)
        if not same:
            self._differs(plan, signature, "parse")
        if expected_error is not None:
            raise expected_error
        return expected  # type: ignore[no-any-return]

    # -- the adapter call around format/parse --------------------------------------------------

    def _call_preprocess(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, inputs: Any) -> Any:
        if self._plan(signature) is None:
            return super()._call_preprocess(lm, lm_kwargs, signature, inputs)  # type: ignore[misc]
        # No tool or native-response fields (those signatures have no plan): only the tool
        # options are dropped when native function calling is off.
        if not self.use_native_function_calling:  # type: ignore[attr-defined]
            for key in ("tools", "tool_choice", "parallel_tool_calls"):
                lm_kwargs.pop(key, None)
        return signature

    def _call_postprocess(
        self,
        processed_signature: Any,
        original_signature: Any,
        outputs: list[Any],
        lm: Any,
        lm_kwargs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        plan = self._plan(original_signature)
        if (
            plan is None
            or processed_signature is not original_signature
            or any(type(output) is not str for output in outputs)
        ):
            return super()._call_postprocess(  # type: ignore[misc,no-any-return]
                processed_signature, original_signature, outputs, lm, lm_kwargs
            )
        values = []
        wrapper = type(self)._parse_wrapper
        for output in outputs:
            if not output:
                raise AdapterParseError(
                    adapter_name=type(self).__name__,
                    signature=original_signature,
                    lm_response=str(output),
                    message="The LM returned an empty or null response.",
                )
            # (looked up per output, as DSPy's wrapper looks the callbacks up per parse)
            parse = _adapter_call.unwrapped(self, "parse", wrapper)
            value = complete_outputs(plan, parse(processed_signature, output))
            for spec in plan.outputs:
                value.setdefault(spec.name, None)
            values.append(value)
        return values


def _same_values(a: Any, b: Any) -> bool:
    if not isinstance(a, dict) or not isinstance(b, dict) or list(a) != list(b):
        return False
    return all(type(a[k]) is type(b[k]) and a[k] == b[k] for k in a)


class FastChatAdapter(_FastPath, dspy.ChatAdapter):  # type: ignore[misc]
    """DSPy's ``ChatAdapter`` with per-signature caching (same prompts, same parses).

    Takes ``ChatAdapter``'s arguments. A JSON fallback after a parse error uses
    :class:`FastJSONAdapter`, as ``ChatAdapter`` would use ``JSONAdapter``.
    """

    _dspy_base = dspy.ChatAdapter
    _plans: ClassVar[weakref.WeakKeyDictionary[Any, Plan]] = weakref.WeakKeyDictionary()

    def _fast_parse(self, plan: Plan, signature: Any, completion: str) -> dict[str, Any]:
        return parse_chat(plan, signature, completion)

    # -- DSPy's ChatAdapter.__call__ / Adapter.__call__, scopes set directly (see _adapter_call) --

    def __call__(
        self,
        lm: Any,
        lm_kwargs: Any,
        signature: Any,
        demos: Any,
        inputs: Any,
        *,
        _checked: Plan | None = None,
    ) -> Any:
        if not _adapter_call.untouched():
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)
        token = _CALL_PLAN.set(self._call_memo(_checked, signature))
        try:
            return self._chat_call(lm, lm_kwargs, signature, demos, inputs)
        finally:
            _CALL_PLAN.reset(token)

    async def acall(
        self,
        lm: Any,
        lm_kwargs: Any,
        signature: Any,
        demos: Any,
        inputs: Any,
        *,
        _checked: Plan | None = None,
    ) -> Any:
        if not _adapter_call.untouched():
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)
        token = _CALL_PLAN.set(self._call_memo(_checked, signature))
        try:
            return await self._achat_call(lm, lm_kwargs, signature, demos, inputs)
        finally:
            _CALL_PLAN.reset(token)

    def _dspy_parse(self, signature: Any, completion: str) -> dict[str, Any]:
        return _DSPY_CHAT_PARSE(self, signature, completion)  # type: ignore[no-any-return]

    def _make_json_adapter_fallback(self) -> Any:
        options = {
            "use_native_function_calling": self.use_native_function_calling,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if FastJSONAdapter.base_patched():  # DSPy's JSONAdapter was patched: its own code, patch and all
            count_adapter_fallback("JSONAdapter (patched)")
            return dspy.JSONAdapter(**options)
        return FastJSONAdapter(**options)


class FastJSONAdapter(_FastPath, dspy.JSONAdapter):  # type: ignore[misc]
    """DSPy's ``JSONAdapter`` with per-signature caching, including the structured-output schema."""

    _dspy_base = dspy.JSONAdapter
    _plans: ClassVar[weakref.WeakKeyDictionary[Any, Plan]] = weakref.WeakKeyDictionary()

    # -- DSPy's JSONAdapter.__call__ (response format, then ChatAdapter.__call__), scopes set directly

    def __call__(
        self,
        lm: Any,
        lm_kwargs: Any,
        signature: Any,
        demos: Any,
        inputs: Any,
        *,
        _checked: Plan | None = None,
    ) -> Any:
        if not (_adapter_call.untouched() and _adapter_call.json_untouched()):
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)
        token = _CALL_PLAN.set(self._call_memo(_checked, signature))
        planning = _adapter_call.enter_planning(lm, lm_kwargs)
        try:
            self._prepare_response_format(lm, lm_kwargs, signature)
            return self._chat_call(lm, lm_kwargs, signature, demos, inputs)
        finally:
            _adapter_call.leave_planning(planning)
            _CALL_PLAN.reset(token)

    async def acall(
        self,
        lm: Any,
        lm_kwargs: Any,
        signature: Any,
        demos: Any,
        inputs: Any,
        *,
        _checked: Plan | None = None,
    ) -> Any:
        if not (_adapter_call.untouched() and _adapter_call.json_untouched()):
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)
        token = _CALL_PLAN.set(self._call_memo(_checked, signature))
        planning = _adapter_call.enter_planning(lm, lm_kwargs)
        try:
            await _adapter_call.prepare_async(lm)
            self._prepare_response_format(lm, lm_kwargs, signature)
            return await self._achat_call(lm, lm_kwargs, signature, demos, inputs)
        finally:
            _adapter_call.leave_planning(planning)
            _CALL_PLAN.reset(token)

    def _fast_parse(self, plan: Plan, signature: Any, completion: str) -> dict[str, Any]:
        return parse_json(plan, signature, completion, type(self).__name__)

    def _dspy_parse(self, signature: Any, completion: str) -> dict[str, Any]:
        return _DSPY_JSON_PARSE(self, signature, completion)  # type: ignore[no-any-return]

    def _prepare_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any) -> None:
        plan = self._plan(signature)
        if plan is None or not _adapter_call.json_format_untouched():
            super()._prepare_response_format(lm, lm_kwargs, signature)  # (DSPy's, patch and all)
            return
        if "response_format" not in lm.supported_params:
            return
        if plan.open_mapping or not lm.supports_response_schema:
            lm_kwargs["response_format"] = {"type": "json_object"}
            return
        native = bool(self.use_native_function_calling)
        witness = _schema_witness(plan, signature)
        kept = plan.response_models.get(native)
        if kept is None or kept[0] != witness:
            kept = plan.response_models[native] = (witness, _response_model(signature, native))
        model = kept[1]
        if model is False:
            _JSON_LOGGER.warning(
                "Failed to build structured output schema; using JSON mode before execution."
            )
            lm_kwargs["response_format"] = {"type": "json_object"}
            return
        lm_kwargs["response_format"] = model


def _schema_witness(plan: Plan, signature: Any) -> tuple[str, ...]:
    """What the schema is made of that can change in place without a new signature: the configs of
    the pydantic models the fields name (``json_schema_extra``...) and the outputs' mutable
    defaults. The kept schema is built again when it changes."""
    configs = tuple(repr(model.model_config) for model, _ in plan._models)
    defaults = tuple(
        repr(field.default)
        for field in signature.output_fields.values()
        if isinstance(field.default, list | dict | set)
    )
    return configs + defaults


def _response_model(signature: Any, native: bool) -> Any:
    """DSPy's structured-output model for ``signature``, built once (``False``: it cannot be)."""
    try:
        model = _get_structured_outputs_response_format(signature, native)
    except (ValueError, pydantic.PydanticInvalidForJsonSchema, pydantic.PydanticSchemaGenerationError):
        return False
    schema = model.model_json_schema()
    # Each call gets its own copy of the schema, as a model built per call would give.
    model.model_json_schema = lambda *args, **kwargs: copy.deepcopy(schema)
    return model


# DSPy's JSONAdapter.format is wrapped by with_callbacks twice (once for ChatAdapter, once for
# JSONAdapter), so format callbacks fire twice per call; keep that count identical.
FastJSONAdapter.format = with_callbacks(FastJSONAdapter.format)  # type: ignore[method-assign]
# DSPy reads adapter class names (streaming listeners, error messages): use DSPy's.
FastChatAdapter.__name__ = "ChatAdapter"
FastJSONAdapter.__name__ = "JSONAdapter"
