"""A stage that chooses one of the candidates an upstream stage produced.

Small models write wrong or malformed free text far more often than they pick badly from a short
list. :class:`Choose` lets the model answer only with one of the candidates, in one of two ways:

* ``scoring="generate"`` (one LM call): the output field's type becomes ``Literal[<candidates>]`` for
  this call, so DSPy sends a JSON schema with an ``enum`` and a grammar-constrained engine (the
  embedded llama.cpp model) can only produce a candidate; any LM with structured outputs works.
* ``scoring="likelihood"`` (one LM call per candidate): each call forces one candidate and asks for
  ``logprobs``; the candidate whose tokens the model finds most likely wins. Needs an LM that returns
  log-probabilities (the embedded engine does). The calls share their whole prompt, so on the
  embedded engine each costs only the few answer tokens.

The predictor is an ordinary ``dspy.Predict`` (``choose.predict``): its demos and instructions are
compiled by DSPy optimizers like any other. The result carries the choice and, as ``choice_scores``,
each candidate's score (log-probability for ``likelihood``; 0.0 for the chosen one and ``None`` for the
others with ``generate``).

Examples:
    >>> import dspy
    >>> from stageflow.choose import Choose
    >>> from stageflow.testing import FakeLM
    >>> pick = Choose("question, candidates -> answer")
    >>> with dspy.context(lm=FakeLM({"answer": "Paris"}), adapter=dspy.JSONAdapter()):
    ...     pick(question="Capital of France?", candidates=["Lyon", "Paris"]).answer
    'Paris'
"""

from __future__ import annotations

import json
import typing
from collections.abc import Generator, Sequence
from typing import Any, Literal

import dspy

from stageflow.errors import ConfigurationError

__all__ = ["Choose", "Scoring", "clean_candidates", "value_logprob"]

Scoring = Literal["generate", "likelihood"]


def clean_candidates(values: Any, limit: int | None = None) -> list[str]:
    """Candidates as distinct, non-blank strings in their original order (at most ``limit``).

    Examples:
        >>> clean_candidates([" Paris", "paris", "", None, "Lyon"])
        ['Paris', 'Lyon']
    """
    items = values if isinstance(values, list | tuple) else [] if values is None else [values]
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        text = "" if item is None else str(item).strip()
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out if limit is None else out[:limit]


def value_logprob(logprobs: Any, value: str) -> float:
    """The log-probability of the tokens that wrote ``value`` (and closed it) in a JSON output.

    ``logprobs`` is what DSPy attaches to a prediction made with ``config={"logprobs": True}``:
    ``{"content": [{"token", "logprob", "bytes"}, ...]}``. Tokens before the value (``{"answer": "``)
    are the same for every candidate and are left out; the value's tokens and the ones closing the
    output are summed. When the value cannot be located, every token counts.

    Raises:
        ValueError: ``logprobs`` holds no tokens.

    Examples:
        >>> tokens = [{"token": t, "logprob": p} for t, p in
        ...           [('{"answer": "', -1.0), ("Par", -0.5), ("is", -0.25), ('"}', -0.125)]]
        >>> value_logprob({"content": tokens}, "Paris")
        -0.875
    """
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not content:
        raise ValueError("the LM returned no token log-probabilities")
    pieces = [bytes(t["bytes"]) if t.get("bytes") is not None else str(t["token"]).encode() for t in content]
    text = b"".join(pieces)
    quoted = json.dumps(value, ensure_ascii=False).encode()
    at = text.rfind(quoted)
    start = at + 1 if at >= 0 else 0
    total, end = 0.0, 0
    for piece, token in zip(pieces, content, strict=True):
        end += len(piece)
        if end > start:
            total += float(token["logprob"])
    return total


class Choose(dspy.Module):  # type: ignore[misc]
    """Answer with one of the candidates in an input field (see the module docstring).

    Args:
        signature: The predictor's signature, e.g. ``"question, passages, candidates -> answer"`` or
            a ``dspy.Signature`` class; its output field (exactly one) receives the choice.
        candidates: The input field holding the candidates (a list of strings).
        scoring: ``"generate"`` or ``"likelihood"``.
        max_candidates: Candidates beyond this many are ignored.
        show_candidates: Pass the candidates to the predictor when its signature has that field
            (with ``generate`` the model sees the list; ``likelihood`` can score blind).

    With no candidates the stage answers ``""`` and makes no LM call (``choice_scores`` is empty).

    Raises:
        ConfigurationError: a signature with other than one output field, or a bad setting.
    """

    def __init__(
        self,
        signature: Any,
        *,
        candidates: str = "candidates",
        scoring: Scoring = "generate",
        max_candidates: int = 8,
        show_candidates: bool = True,
    ) -> None:
        super().__init__()
        self.predict = dspy.Predict(signature)
        outputs = list(self.predict.signature.output_fields)
        if len(outputs) != 1:
            raise ConfigurationError(
                f"Choose needs a signature with exactly one output field, got {outputs}.",
                field="signature",
                code="bad_signature",
                hint='write e.g. Choose("question, candidates -> answer")',
            )
        if scoring not in ("generate", "likelihood"):
            raise ConfigurationError(
                f"scoring must be 'generate' or 'likelihood', got {scoring!r}.",
                field="scoring",
                code="bad_setting",
            )
        if max_candidates < 1:
            raise ConfigurationError(
                f"max_candidates must be at least 1, got {max_candidates}.",
                field="max_candidates",
                code="bad_setting",
            )
        self.output = outputs[0]
        self.candidates = candidates
        self.scoring: Scoring = scoring
        self.max_candidates = max_candidates
        self.show_candidates = show_candidates

    def _constrained(self, options: Sequence[str]) -> Any:
        choice = typing.Literal[tuple(options)]  # type: ignore[valid-type]
        return self.predict.signature.with_updated_fields(self.output, type_=choice)

    def _inputs(self, inputs: dict[str, Any], options: list[str]) -> dict[str, Any]:
        fields = self.predict.signature.input_fields
        given = {k: v for k, v in inputs.items() if k in fields}
        if self.candidates in fields:
            given[self.candidates] = options if self.show_candidates else []
        return given

    def _steps(self, inputs: dict[str, Any]) -> Generator[dict[str, Any], Any, dspy.Prediction]:
        """The choice as a coroutine: yields predictor calls (kwargs), receives their predictions.

        ``forward`` and ``aforward`` drive it with sync and async calls: one implementation.
        """
        options = clean_candidates(inputs.get(self.candidates), self.max_candidates)
        if not options:
            return dspy.Prediction(**{self.output: "", "choice_scores": {}})
        given = self._inputs(inputs, options)
        if self.scoring == "generate" or len(options) == 1:
            pred = yield {**given, "signature": self._constrained(options)}
            chosen = str(pred[self.output])
            scores: dict[str, float | None] = {o: (0.0 if o == chosen else None) for o in options}
            return dspy.Prediction(**{self.output: chosen, "choice_scores": scores})
        scored: dict[str, float | None] = {}
        for option in options:
            pred = yield {**given, "signature": self._constrained([option]), "config": {"logprobs": True}}
            try:
                scored[option] = value_logprob(getattr(pred, "logprobs", None), option)
            except ValueError as exc:
                raise ConfigurationError(
                    f"Choose(scoring='likelihood') got no log-probabilities from the LM ({exc}).",
                    field="scoring",
                    code="no_logprobs",
                    hint="use an LM that returns logprobs (e.g. the embedded local model), "
                    "or scoring='generate'",
                ) from exc
        best = max(options, key=lambda o: typing.cast(float, scored[o]))
        return dspy.Prediction(**{self.output: best, "choice_scores": scored})

    def forward(self, **inputs: Any) -> dspy.Prediction:
        steps = self._steps(inputs)
        try:
            call = next(steps)
            while True:
                call = steps.send(self.predict(**call))
        except StopIteration as done:
            result: dspy.Prediction = done.value
            return result

    async def aforward(self, **inputs: Any) -> dspy.Prediction:
        steps = self._steps(inputs)
        try:
            call = next(steps)
            while True:
                call = steps.send(await self.predict.acall(**call))
        except StopIteration as done:
            result: dspy.Prediction = done.value
            return result
