"""An in-process llama.cpp model as a DSPy 3.4 engine.

``dspy.LM(model, engine=LlamaCppEngine(...), async_engine=AsyncLlamaCppEngine(...))`` is DSPy's
forward-compatible way to plug in a model (``BaseLM.forward`` subclasses are deprecated for 3.5).
:func:`make_local_lm` builds that LM with a model string unique to the weights file, because DSPy's
response cache key carries the model string but not the engine.

Facts this module is built on (measured with SmolLM2-135M on a 2-core machine):

* Structured output only works with grammar-constrained decoding, and llama-cpp-python silently
  ignores ``response_format={"type": "json_schema", ...}``: the schema DSPy's ``JSONAdapter`` sends is
  turned into a GBNF grammar (:mod:`stageflow.lm.grammar`) and passed as ``grammar=``.
* One llama context used by two threads at once aborts the process (a ``GGML_ASSERT``). Each loaded
  model has one blocking lock, held for the whole generation.
* With ``n_threads`` equal to the core count, any competing process makes calls 5-40x slower
  (ggml's spin barriers), so the default leaves one core free.
* Weights load once per process and path: engines, copies of LMs and deep copies of programs share
  the loaded model (and its lock).
* llama.cpp reuses only the prompt prefix shared with the previous call, so alternating predictors
  re-process their system prompts and demos on every call. Each loaded model keeps a
  :class:`~stageflow.lm.prefix.PrefixCache`: one KV snapshot per prompt prefix (per predictor),
  restored before a call with that prefix. Outputs are unchanged, byte for byte.
* ``logprobs`` come from a logits processor (:mod:`stageflow.lm.logprobs`), not from llama.cpp's
  ``logits_all`` mode, which would keep 800 MB of logits for a 4096-token context.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import dspy
from dspy.lm15 import (
    Message,
    Request,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    UnsupportedFeatureError,
    Usage,
)

from stageflow.errors import ConfigurationError
from stageflow.lm import _models
from stageflow.lm import grammar as _grammar
from stageflow.lm._locate import find_model_path
from stageflow.lm._messages import PROVIDER, generation_kwargs, translate_error
from stageflow.lm._models import THREADS_ENV, LoadedModel, default_threads
from stageflow.lm.logprobs import LogprobRecorder
from stageflow.lm.prefix import DEFAULT_PREFIX_SLOTS, prefix_key

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_N_CTX",
    "DEFAULT_PREFIX_SLOTS",
    "THREADS_ENV",
    "AsyncLlamaCppEngine",
    "LlamaCppEngine",
    "default_threads",
    "make_local_lm",
]

logger = logging.getLogger(__name__)

DEFAULT_N_CTX = 4096
DEFAULT_MAX_TOKENS = 512
DEFAULT_REPEAT_PENALTY = 1.1
LLAMA_CPP_INSTALL_COMMAND = (
    'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip install "llama-cpp-python==0.3.36"'
)
_PROVIDER = PROVIDER


class LlamaCppEngine:
    """A GGUF model run in-process by llama-cpp-python, as a DSPy 3.4 engine.

    The file is located and checked when the engine is created (so a missing model fails early, with
    the install command); the weights load on the first call, once per process and path.

    Args:
        model_path: A ``.gguf`` file; ``None`` means ``$STAGEFLOW_MODEL_PATH`` or the embedded SmolLM2.
        n_ctx: Context window in tokens.
        n_threads: llama.cpp threads; ``None`` means :func:`default_threads`.
        max_string_length, max_items: Bounds applied to unbounded strings/arrays of a requested JSON
            schema (see :func:`stageflow.lm.grammar.tighten_schema`).
        repeat_penalty: llama.cpp's repetition penalty (1.0 disables it).
        default_max_tokens: Output limit when the request sets none.
        prefix_slots: Prompt prefixes (one per predictor) whose KV cache is kept between calls;
            0 turns the prefix cache off (llama.cpp then reuses the previous call's prefix only).

    Raises:
        ConfigurationError: llama-cpp-python is not installed, or the model file is missing/corrupt.
    """

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset(
        {"response_format", "temperature", "max_tokens", "top_p", "top_k", "stop", "seed", "logprobs"}
    )

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        max_string_length: int = _grammar.DEFAULT_MAX_STRING_LENGTH,
        max_items: int = _grammar.DEFAULT_MAX_ITEMS,
        repeat_penalty: float = DEFAULT_REPEAT_PENALTY,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        prefix_slots: int = DEFAULT_PREFIX_SLOTS,
    ) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigurationError(
                "The local model needs llama-cpp-python, which is not installed.",
                code="missing_dependency",
                hint=f"run `{LLAMA_CPP_INSTALL_COMMAND}` (compiles llama.cpp once, about 4-8 minutes)",
            )
        if n_ctx < 256:
            raise ConfigurationError(
                f"n_ctx must be at least 256, got {n_ctx}.", field="n_ctx", code="bad_setting"
            )
        if n_threads is not None and n_threads < 1:
            raise ConfigurationError(
                f"n_threads must be positive, got {n_threads}.", field="n_threads", code="bad_setting"
            )
        if default_max_tokens < 1:
            raise ConfigurationError(
                f"default_max_tokens must be positive, got {default_max_tokens}.",
                field="default_max_tokens",
                code="bad_setting",
            )
        if prefix_slots < 0:
            raise ConfigurationError(
                f"prefix_slots must be 0 or more, got {prefix_slots}.",
                field="prefix_slots",
                code="bad_setting",
                hint="use 0 to turn the prefix cache off",
            )
        # Validate the bounds now rather than on the first structured call.
        _grammar.tighten_schema({}, max_string_length=max_string_length, max_items=max_items)
        self._explicit_path = None if model_path is None else str(model_path)
        self.model_path: Path = find_model_path(model_path)
        self.n_ctx = n_ctx
        self._explicit_threads = n_threads
        self.n_threads = n_threads if n_threads is not None else default_threads()
        self.max_string_length = max_string_length
        self.max_items = max_items
        self.repeat_penalty = repeat_penalty
        self.default_max_tokens = default_max_tokens
        self.prefix_slots = prefix_slots

    # -- identity and persistence ---------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """A ``local/...`` model string unique to this weights file and these output-shaping settings."""
        stat = self.model_path.stat()
        settings = (
            stat.st_size,
            stat.st_mtime_ns,
            self.max_string_length,
            self.max_items,
            self.repeat_penalty,
        )
        fingerprint = ":".join(str(value) for value in settings)
        digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:10]
        stem = re.sub(r"[^a-z0-9._-]+", "-", self.model_path.stem.lower()).strip("-") or "model"
        return f"local/{stem}-{digest}"

    def dump_state(self) -> dict[str, Any]:
        """JSON-serializable settings (lets DSPy save a program whose LM uses this engine)."""
        return {
            "model_path": self._explicit_path,
            "n_ctx": self.n_ctx,
            "n_threads": self._explicit_threads,
            "max_string_length": self.max_string_length,
            "max_items": self.max_items,
            "repeat_penalty": self.repeat_penalty,
            "default_max_tokens": self.default_max_tokens,
            "prefix_slots": self.prefix_slots,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> LlamaCppEngine:
        return cls(**state)

    def __deepcopy__(self, memo: dict[int, Any]) -> LlamaCppEngine:
        # DSPy optimizers deep-copy whole programs; the model, its lock and its context are shared.
        return self

    def __repr__(self) -> str:
        return f"LlamaCppEngine({str(self.model_path)!r}, n_ctx={self.n_ctx}, n_threads={self.n_threads})"

    # -- model access ---------------------------------------------------------------------------

    def load(self) -> float:
        """Load the weights now (otherwise the first call does); returns the load time in seconds."""
        return self._model().load_seconds

    def _model(self) -> LoadedModel:
        return _models.load_model(self.model_path, self.n_ctx, self.n_threads)

    def _generation_kwargs(self, request: Request) -> dict[str, Any]:
        return generation_kwargs(
            request,
            max_string_length=self.max_string_length,
            max_items=self.max_items,
            repeat_penalty=self.repeat_penalty,
            default_max_tokens=self.default_max_tokens,
        )

    # -- the engine protocol --------------------------------------------------------------------

    def _prepare(self, model: LoadedModel, kwargs: dict[str, Any]) -> None:
        """Restore the prompt prefix's KV snapshot (the caller holds ``model.lock``)."""
        if model.snapshots:
            model.prefix.activate(model.llama, prefix_key(kwargs["messages"]), self.prefix_slots)

    def complete(self, request: Request) -> Response:
        """Generate one response. Blocks while another thread uses the same model."""
        kwargs = self._generation_kwargs(request)
        top = request.config.logprobs
        model = self._model()
        logprobs = None
        try:
            with model.lock:
                self._prepare(model, kwargs)
                recorder = None if top is None else LogprobRecorder(model.llama, top)
                if recorder is not None:
                    from llama_cpp import LogitsProcessorList

                    kwargs["logits_processor"] = LogitsProcessorList([recorder])
                out = model.llama.create_chat_completion(**kwargs)
                text = out["choices"][0]["message"].get("content") or ""
                if recorder is not None:
                    logprobs = recorder.finish(text)
        except (ValueError, RuntimeError) as exc:
            translated = translate_error(exc)
            if translated is None:
                raise
            raise translated from exc
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return Response(
            id=out.get("id") or f"llamacpp-{uuid.uuid4().hex[:12]}",
            model=request.model,
            message=Message.assistant(text),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            usage=Usage(
                input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens")
            ),
            logprobs=logprobs,
        )

    def stream(self, request: Request) -> Generator[Any, None, None]:
        """Stream text deltas. The model stays locked until the stream ends or is closed.

        Raises:
            UnsupportedFeatureError: the request asks for ``logprobs`` (use ``complete``).
        """
        if request.config.logprobs is not None:
            raise UnsupportedFeatureError(
                "the local llama.cpp engine reports logprobs on complete() only, not while streaming",
                feature="config.logprobs",
                provider=_PROVIDER,
            )
        kwargs = self._generation_kwargs(request)
        model = self._model()
        with model.lock:
            try:
                self._prepare(model, kwargs)
                chunks = model.llama.create_chat_completion(**kwargs, stream=True)
                yield StreamStartEvent(model=request.model)
                finish = "stop"
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        yield StreamDeltaEvent(delta=TextDelta(text=piece))
                    if choice.get("finish_reason") == "length":
                        finish = "length"
            except (ValueError, RuntimeError) as exc:
                translated = translate_error(exc)
                if translated is None:
                    raise
                raise translated from exc
        yield StreamEndEvent(finish_reason=finish)

    def close(self) -> None:
        """Nothing to release: loaded models are shared process-wide."""


class AsyncLlamaCppEngine:
    """The async twin of :class:`LlamaCppEngine`: runs the same locked calls in a worker thread.

    Args:
        engine: The sync engine to share (normal use: ``AsyncLlamaCppEngine(sync_engine)``); when
            omitted one is built from ``engine_kwargs``.
    """

    supports_response_schema = LlamaCppEngine.supports_response_schema
    supports_function_calling = LlamaCppEngine.supports_function_calling
    supports_reasoning = LlamaCppEngine.supports_reasoning
    supported_params = LlamaCppEngine.supported_params

    def __init__(self, engine: LlamaCppEngine | None = None, **engine_kwargs: Any) -> None:
        if engine is not None and engine_kwargs:
            raise TypeError("pass either an engine or engine settings, not both")
        self.sync = engine if engine is not None else LlamaCppEngine(**engine_kwargs)

    async def complete(self, request: Request) -> Response:
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        events = self.sync.stream(request)
        done = object()
        try:
            while True:
                event = await asyncio.to_thread(next, events, done)
                if event is done:
                    return
                yield event
        finally:
            # ValueError: still running in a worker (cancelled mid-token); it closes when collected.
            with contextlib.suppress(ValueError):
                await asyncio.to_thread(events.close)

    async def aclose(self) -> None:
        """Nothing to release: loaded models are shared process-wide."""

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncLlamaCppEngine:
        return cls(LlamaCppEngine.load_state(state))

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncLlamaCppEngine:
        return self

    def __repr__(self) -> str:
        return f"AsyncLlamaCppEngine({self.sync!r})"


def make_local_lm(
    path: str | os.PathLike[str] | None = None,
    *,
    n_ctx: int = DEFAULT_N_CTX,
    n_threads: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = 0.0,
    max_string_length: int = _grammar.DEFAULT_MAX_STRING_LENGTH,
    max_items: int = _grammar.DEFAULT_MAX_ITEMS,
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY,
    prefix_slots: int = DEFAULT_PREFIX_SLOTS,
    **lm_kwargs: Any,
) -> dspy.LM:
    """A ``dspy.LM`` backed by a local GGUF model (the embedded SmolLM2 by default).

    The model string is ``local/<file stem>-<hash>``, the hash covering the file's size and mtime and
    the output-shaping settings, so DSPy's response cache never mixes two models' answers.
    ``lm_kwargs`` go to ``dspy.LM`` (e.g. ``cache=False``, ``num_retries``, ``callbacks``).
    ``prefix_slots`` sets the per-predictor prompt-prefix cache (:class:`LlamaCppEngine`); ``0``
    turns it off.

    Raises:
        ConfigurationError: llama-cpp-python is missing, or the model file is missing or corrupt.
    """
    engine = LlamaCppEngine(
        path,
        n_ctx=n_ctx,
        n_threads=n_threads,
        max_string_length=max_string_length,
        max_items=max_items,
        repeat_penalty=repeat_penalty,
        default_max_tokens=max_tokens,
        prefix_slots=prefix_slots,
    )
    return dspy.LM(
        engine.model_name,
        engine=engine,
        async_engine=AsyncLlamaCppEngine(engine),
        temperature=temperature,
        max_tokens=max_tokens,
        **lm_kwargs,
    )
