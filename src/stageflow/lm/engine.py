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
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from dspy.clients.engines.base import validate_request
from dspy.lm15 import (
    ContextLengthError,
    Message,
    Request,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    ThinkingPart,
    UnsupportedFeatureError,
    Usage,
)

from stageflow.errors import ConfigurationError
from stageflow.lm import grammar as _grammar
from stageflow.lm._locate import find_model_path

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_N_CTX",
    "THREADS_ENV",
    "AsyncLlamaCppEngine",
    "LlamaCppEngine",
    "default_threads",
    "make_local_lm",
]

logger = logging.getLogger(__name__)

THREADS_ENV = "STAGEFLOW_LM_THREADS"
DEFAULT_N_CTX = 4096
DEFAULT_MAX_TOKENS = 512
DEFAULT_REPEAT_PENALTY = 1.1
LLAMA_CPP_INSTALL_COMMAND = (
    'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip install "llama-cpp-python==0.3.36"'
)
_PROVIDER = "llama.cpp"


def default_threads() -> int:
    """Threads for llama.cpp: ``$STAGEFLOW_LM_THREADS``, else one fewer than the usable cores (1..4)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigurationError(
                f"${THREADS_ENV} must be a positive integer, got {raw!r}.",
                code="bad_setting",
                hint=f"set e.g. {THREADS_ENV}=1, or unset it to use cores - 1",
            )
        return value
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, min(4, cores - 1))


# -- the process-wide model registry ------------------------------------------------------------


@dataclass
class _LoadedModel:
    """One llama.cpp context. ``lock`` must be held for every use of ``llama``."""

    llama: Any
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)


# Keyed by process id too: a forked child must not reuse its parent's llama context (or a lock the
# parent held at fork time).
_MODELS: dict[tuple[int, str, int, int], _LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


@atexit.register
def _close_models() -> None:
    """Free every llama.cpp context before the interpreter tears modules down (llama-cpp-python's
    own finaliser fails once its globals are gone, printing a stray traceback at exit)."""
    with _MODELS_LOCK:
        models = list(_MODELS.values())
        _MODELS.clear()
    for loaded in models:
        with loaded.lock, contextlib.suppress(Exception):
            loaded.llama.close()


def _load_model(path: Path, n_ctx: int, n_threads: int) -> _LoadedModel:
    key = (os.getpid(), str(path), n_ctx, n_threads)
    with _MODELS_LOCK:
        loaded = _MODELS.get(key)
        if loaded is not None:
            return loaded
        from llama_cpp import Llama

        started = time.perf_counter()
        try:
            llama = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ConfigurationError(
                f"llama.cpp could not load the model {path}: {exc}",
                code="bad_model_file",
                hint="check that the file is a complete GGUF model supported by llama-cpp-python 0.3.36",
            ) from exc
        loaded = _LoadedModel(llama=llama, load_seconds=time.perf_counter() - started)
        _MODELS[key] = loaded
        return loaded


# -- request translation ------------------------------------------------------------------------


def _text_parts(parts: Any, where: str) -> str:
    texts: list[str] = []
    for j, part in enumerate(parts):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ThinkingPart):
            continue  # a demo's hidden reasoning is not replayed to the model
        else:
            raise UnsupportedFeatureError(
                f"the local llama.cpp engine reads text only; {where}.parts[{j}] is {type(part).__name__}",
                feature=f"{where}.parts[{j}]",
                provider=_PROVIDER,
            )
    return "\n".join(texts)


def _chat_messages(request: Request) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else _text_parts(request.system, "system")
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        if message.role == "tool":
            raise UnsupportedFeatureError(
                "the local llama.cpp engine does not support tool calls",
                feature=f"messages[{i}]",
                provider=_PROVIDER,
            )
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": _text_parts(message.parts, f"messages[{i}]")})
    return messages


def _translate_error(exc: Exception) -> Exception | None:
    text = str(exc)
    if "exceed context window" in text or "llama_decode returned 1" in text:
        error: Exception = ContextLengthError(f"llama.cpp: {text}", provider=_PROVIDER)
        return error
    return None


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

    Raises:
        ConfigurationError: llama-cpp-python is not installed, or the model file is missing/corrupt.
    """

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset(
        {"response_format", "temperature", "max_tokens", "top_p", "top_k", "stop", "seed"}
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

    def _model(self) -> _LoadedModel:
        return _load_model(self.model_path, self.n_ctx, self.n_threads)

    def _grammar_text(self, response_format: Any) -> str | None:
        try:
            schema, json_mode = _grammar.schema_from_response_format(response_format)
        except ValueError as exc:
            raise UnsupportedFeatureError(
                f"the local llama.cpp engine cannot honour this response_format: {exc}",
                feature="config.response_format",
                provider=_PROVIDER,
            ) from exc
        if not json_mode:
            return None
        if schema is None:
            return _grammar.json_object_gbnf()
        try:
            return _grammar.schema_to_gbnf(
                schema, max_string_length=self.max_string_length, max_items=self.max_items
            )
        except ValueError as exc:
            logger.warning("Falling back to a generic JSON-object grammar: %s", exc)
            return _grammar.json_object_gbnf()

    def _generation_kwargs(self, request: Request) -> dict[str, Any]:
        validate_request(request)
        if request.tools:
            raise UnsupportedFeatureError(
                "the local llama.cpp engine does not support tools", feature="tools", provider=_PROVIDER
            )
        config = request.config
        kwargs: dict[str, Any] = {
            "messages": _chat_messages(request),
            "temperature": 0.0 if config.temperature is None else config.temperature,
            "max_tokens": config.max_tokens or self.default_max_tokens,
            "repeat_penalty": self.repeat_penalty,
        }
        if config.top_p is not None:
            kwargs["top_p"] = config.top_p
        if config.top_k is not None:
            kwargs["top_k"] = config.top_k
        if config.seed is not None:
            kwargs["seed"] = config.seed
        if config.stop:
            kwargs["stop"] = list(config.stop)
        gbnf = self._grammar_text(config.response_format)
        if gbnf is not None:
            from llama_cpp import LlamaGrammar

            kwargs["grammar"] = LlamaGrammar.from_string(gbnf, verbose=False)
        return kwargs

    # -- the engine protocol --------------------------------------------------------------------

    def complete(self, request: Request) -> Response:
        """Generate one response. Blocks while another thread uses the same model."""
        kwargs = self._generation_kwargs(request)
        model = self._model()
        try:
            with model.lock:
                out = model.llama.create_chat_completion(**kwargs)
        except (ValueError, RuntimeError) as exc:
            translated = _translate_error(exc)
            if translated is None:
                raise
            raise translated from exc
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return Response(
            id=out.get("id") or f"llamacpp-{uuid.uuid4().hex[:12]}",
            model=request.model,
            message=Message.assistant(choice["message"].get("content") or ""),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            usage=Usage(
                input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens")
            ),
        )

    def stream(self, request: Request) -> Generator[Any, None, None]:
        """Stream text deltas. The model stays locked until the stream ends or is closed."""
        kwargs = self._generation_kwargs(request)
        model = self._model()
        with model.lock:
            try:
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
                translated = _translate_error(exc)
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
    **lm_kwargs: Any,
) -> dspy.LM:
    """A ``dspy.LM`` backed by a local GGUF model (the embedded SmolLM2 by default).

    The model string is ``local/<file stem>-<hash>``, the hash covering the file's size and mtime and
    the output-shaping settings, so DSPy's response cache never mixes two models' answers.
    ``lm_kwargs`` go to ``dspy.LM`` (e.g. ``cache=False``, ``num_retries``, ``callbacks``).

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
    )
    return dspy.LM(
        engine.model_name,
        engine=engine,
        async_engine=AsyncLlamaCppEngine(engine),
        temperature=temperature,
        max_tokens=max_tokens,
        **lm_kwargs,
    )
