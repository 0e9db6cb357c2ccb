"""Pydantic stage contracts: validated input → ``process()`` → validated output.

The tutorial's standard shapes: every stage takes ``content`` (plus optional ``metadata`` and
``context``) and returns ``content`` with a ``confidence`` (plus optional ``metadata``, and ``error``
when it failed). Subclass them to add fields.

Examples:
    >>> import stageflow
    >>> class Measure(stageflow.StandardStage):
    ...     def process(self, data):
    ...         return {"content": data.content.upper(), "confidence": 1.0}
    >>> Measure()(content="hello").content
    'HELLO'
    >>> failed = Measure()(content=None)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    stageflow.errors.ContractError: ...
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import dspy
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from stageflow.errors import ConfigurationError, ContractError
from stageflow.stages import Ports

__all__ = ["StageInput", "StageOutput", "StandardStage"]


class StageInput(BaseModel):
    """Standardized input format for stages (unknown fields are refused, naming them)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    content: str = Field(description="Main content to process")
    metadata: dict[str, Any] | None = Field(default=None, description="Additional metadata")
    context: str | None = Field(default=None, description="Additional context")


class StageOutput(BaseModel):
    """Standardized output format for stages.

    Attributes:
        content: The processed content.
        confidence: How sure the stage is, from 0 to 1 (0 on error).
        metadata: Stage-specific metadata.
        error: Set when the stage failed (``content`` is then empty).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    content: str = Field(description="Processed content")
    confidence: float = Field(ge=0.0, le=1.0, description="Confidence score")
    metadata: dict[str, Any] | None = Field(default=None, description="Stage-specific metadata")
    error: str | None = Field(default=None, description="Error message if failed")
    #: Why ``error`` is set: ``"invalid_output"`` when the output broke the schema (repairable).
    _error_code: str | None = PrivateAttr(default=None)


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "?"
    return loc, str(err.get("msg", ""))


# Errors that are the caller's or the class's fault, never turned into an error output.
_PASS_THROUGH = (ContractError, ConfigurationError)


class StandardStage(dspy.Module):  # type: ignore[misc]
    """A stage with pydantic input and output contracts (the tutorial's ``StandardStage``).

    Subclass it, set ``input_schema`` / ``output_schema`` (``input_model`` / ``output_model`` are
    aliases; or pass them to ``__init__``) and implement ``process(input_data)`` returning a dict of
    output fields or an ``output_schema`` instance (``process`` may be ``async def``; call the
    pipeline with ``acall`` then).

    Calling the stage returns the validated ``output_schema`` instance, as in the tutorial. Invalid
    input raises :class:`ContractError` naming the field. An exception inside ``process``, or an
    output that breaks the output schema, becomes an output with ``error="Type: message"``,
    ``content=""`` and ``confidence=0.0``. Inside a pipeline such an output is a failure of the stage:
    the run stops with a :class:`~stageflow.StageError` naming the stage — or, in an
    :class:`~stageflow.ErrorHandlingPipeline`, its recovery runs and the error is logged — so an
    empty ``content`` never flows on as if it were an answer.
    """

    input_schema: ClassVar[type[BaseModel]] = StageInput
    output_schema: ClassVar[type[BaseModel]] = StageOutput
    input_model: ClassVar[type[BaseModel]] = StageInput
    output_model: ClassVar[type[BaseModel]] = StageOutput
    #: The output field that reports a failure (read by the engine; see the class docstring).
    stageflow_error_field: ClassVar[str | None] = "error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        for schema, alias in (("input_schema", "input_model"), ("output_schema", "output_model")):
            if alias in own and schema not in own:
                setattr(cls, schema, own[alias])
            else:
                setattr(cls, alias, getattr(cls, schema))

    def __init__(
        self,
        input_schema: type[BaseModel] | None = None,
        output_schema: type[BaseModel] | None = None,
        *,
        input_model: type[BaseModel] | None = None,
        output_model: type[BaseModel] | None = None,
    ) -> None:
        super().__init__()
        given_in = input_schema or input_model
        given_out = output_schema or output_model
        if given_in is not None:
            self.input_schema = self.input_model = given_in  # type: ignore[misc]
        if given_out is not None:
            self.output_schema = self.output_model = given_out  # type: ignore[misc]
        for name, model in (("input_schema", self.input_schema), ("output_schema", self.output_schema)):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ConfigurationError(
                    f"{type(self).__name__}.{name} must be a pydantic model class, got {model!r}.",
                    field=name,
                    code="bad_contract",
                )

    def process(self, input_data: Any) -> Any:
        """Do the stage's work on validated ``input_data``; return a dict of output fields or an
        ``output_schema`` instance. Override in subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement process(input_data)")

    def stageflow_ports(self) -> Ports:
        fields = self.input_schema.model_fields
        out_fields = self.output_schema.model_fields
        types = {k: v.annotation for k, v in fields.items()}
        types.update({k: v.annotation for k, v in out_fields.items()})
        return Ports(
            required=tuple(k for k, v in fields.items() if v.is_required()),
            optional=tuple(k for k, v in fields.items() if not v.is_required()),
            outputs=tuple(out_fields),
            types=types,
        )

    # -- the one implementation behind forward and aforward -----------------------------------
    def _validate_input(self, kwargs: dict[str, Any]) -> Any:
        try:
            return self.input_schema(**kwargs)
        except ValidationError as e:
            loc, msg = _first_error(e)
            raise ContractError(
                f"{type(self).__name__}: input field '{loc}' is invalid: {msg}. "
                f"Expected fields: {list(self.input_schema.model_fields)}; got {sorted(kwargs)}.",
                field=loc,
                code="invalid_input",
            ) from e

    def _error_output(self, error: BaseException, code: str = "stage_reported_error") -> Any:
        text = f"{type(error).__name__}: {error}"
        values: dict[str, Any] = {"content": "", "confidence": 0.0, "error": text}
        schema = self.output_schema
        known = {k: v for k, v in values.items() if k in schema.model_fields}
        try:
            out = schema(**known)
        except ValidationError:  # the schema has more required fields: build it without them
            blanks: dict[str, Any] = {k: None for k, v in schema.model_fields.items() if v.is_required()}
            out = schema.model_construct(None, **{**blanks, **known})
        if "_error_code" in getattr(schema, "__private_attributes__", {}):
            out._error_code = code  # type: ignore[attr-defined]
        return out

    def _finish(self, out: Any) -> Any:
        """The validated output, or an error output when it breaks the output schema."""
        if isinstance(out, self.output_schema):
            return out
        try:
            if isinstance(out, BaseModel):
                out = out.model_dump()
            if not isinstance(out, dict):
                raise TypeError(
                    f"process returned {type(out).__name__}; expected {self.output_schema.__name__} "
                    "or a dict of its fields"
                )
            return self.output_schema(**out)
        except ValidationError as e:
            loc, msg = _first_error(e)
            return self._error_output(ValueError(f"output field '{loc}' is invalid: {msg}"), "invalid_output")
        except TypeError as e:
            return self._error_output(e, "invalid_output")

    def forward(self, **kwargs: Any) -> Any:
        data = self._validate_input(kwargs)
        try:
            out = self.process(data)
            if inspect.isawaitable(out):
                if inspect.iscoroutine(out):
                    out.close()  # never started: close it so Python does not warn it was never awaited
                raise ConfigurationError(
                    f"{type(self).__name__}.process is async; call the pipeline with acall().",
                    code="async_process",
                )
        except _PASS_THROUGH:
            raise
        except Exception as e:
            return self._error_output(e)
        return self._finish(out)

    async def aforward(self, **kwargs: Any) -> Any:
        data = self._validate_input(kwargs)
        try:
            out = self.process(data)
            if inspect.isawaitable(out):
                out = await out
        except _PASS_THROUGH:
            raise
        except Exception as e:
            return self._error_output(e)
        return self._finish(out)
