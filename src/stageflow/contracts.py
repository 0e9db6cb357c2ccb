"""Pydantic stage contracts: validated input → ``process()`` → validated output.

Examples:
    >>> import stageflow
    >>> class In(stageflow.StageInput):
    ...     text: str
    >>> class Out(stageflow.StageOutput):
    ...     length: int | None = None
    >>> class Measure(stageflow.StandardStage):
    ...     input_model, output_model = In, Out
    ...     def process(self, data: In) -> Out:
    ...         return Out(length=len(data.text))
    >>> Measure()(text="hello").length
    5
    >>> failed = Measure()(text=None)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    stageflow.errors.ContractError: ...
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import dspy
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stageflow.errors import ConfigurationError, ContractError
from stageflow.stages import Ports

__all__ = ["StageInput", "StageOutput", "StandardStage"]


class StageInput(BaseModel):
    """Base class for a stage's validated input. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class StageOutput(BaseModel):
    """Base class for a stage's validated output.

    Attributes:
        error: Set when ``process`` failed; the other fields are then ``None``.
        confidence: How sure the stage is, from 0 to 1 (0 on error).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    error: str | None = None
    confidence: float = Field(default=1.0, ge=0.0, le=1.0)


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "?"
    return loc, str(err.get("msg", ""))


class StandardStage(dspy.Module):  # type: ignore[misc]
    """A stage with pydantic input and output contracts.

    Subclass it, set ``input_model`` / ``output_model`` (or pass them to ``__init__``) and implement
    ``process(data) -> output`` (may be ``async def``). Invalid input raises :class:`ContractError`
    naming the field; an exception inside ``process`` becomes an output with ``error=...`` and
    ``confidence=0.0`` instead of failing the pipeline; an output that breaks the output model
    raises :class:`ContractError`.
    """

    input_model: ClassVar[type[StageInput]] = StageInput
    output_model: ClassVar[type[StageOutput]] = StageOutput

    def __init__(
        self,
        input_model: type[StageInput] | None = None,
        output_model: type[StageOutput] | None = None,
    ) -> None:
        super().__init__()
        if input_model is not None:
            self.input_model = input_model  # type: ignore[misc]
        if output_model is not None:
            self.output_model = output_model  # type: ignore[misc]
        for name, model, base in (
            ("input_model", self.input_model, BaseModel),
            ("output_model", self.output_model, StageOutput),
        ):
            if not (isinstance(model, type) and issubclass(model, base)):
                raise ConfigurationError(
                    f"{type(self).__name__}.{name} must be a subclass of {base.__name__}, got {model!r}.",
                    field=name,
                    code="bad_contract",
                )

    def process(self, data: Any) -> Any:
        """Do the stage's work on validated ``data``; return an ``output_model`` (or a dict of it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement process(data)")

    def stageflow_ports(self) -> Ports:
        fields = self.input_model.model_fields
        out_fields = self.output_model.model_fields
        types = {k: v.annotation for k, v in fields.items()}
        types.update({k: v.annotation for k, v in out_fields.items()})
        return Ports(
            required=tuple(k for k, v in fields.items() if v.is_required()),
            optional=tuple(k for k, v in fields.items() if not v.is_required()),
            outputs=tuple(out_fields),
            types=types,
        )

    def _validate_input(self, kwargs: dict[str, Any]) -> Any:
        try:
            return self.input_model(**kwargs)
        except ValidationError as e:
            loc, msg = _first_error(e)
            raise ContractError(
                f"{type(self).__name__}: input field '{loc}' is invalid: {msg}. "
                f"Expected fields: {list(self.input_model.model_fields)}; got {sorted(kwargs)}.",
                field=loc,
                code="invalid_input",
            ) from e

    def _error_output(self, error: Exception) -> Any:
        blanks = {k: None for k, v in self.output_model.model_fields.items() if v.is_required()}
        return self.output_model.model_construct(
            **blanks, error=f"{type(error).__name__}: {error}", confidence=0.0
        )

    def _finish(self, out: Any) -> dspy.Prediction:
        if isinstance(out, dict):
            out = self._check_output(lambda: self.output_model(**out))
        elif not isinstance(out, self.output_model):
            raise ContractError(
                f"{type(self).__name__}.process returned {type(out).__name__}; expected "
                f"{self.output_model.__name__} or a dict of its fields.",
                code="invalid_output",
            )
        return dspy.Prediction(**{k: getattr(out, k, None) for k in self.output_model.model_fields})

    def _check_output(self, build: Any) -> Any:
        try:
            return build()
        except ValidationError as e:
            loc, msg = _first_error(e)
            raise ContractError(
                f"{type(self).__name__}: output field '{loc}' is invalid: {msg}.",
                field=loc,
                code="invalid_output",
            ) from e

    def forward(self, **kwargs: Any) -> dspy.Prediction:
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
        except (ContractError, ConfigurationError):
            raise
        except Exception as e:
            out = self._error_output(e)
        return self._finish(out)

    async def aforward(self, **kwargs: Any) -> dspy.Prediction:
        data = self._validate_input(kwargs)
        try:
            out = self.process(data)
            if inspect.isawaitable(out):
                out = await out
        except ContractError:
            raise
        except Exception as e:
            out = self._error_output(e)
        return self._finish(out)
