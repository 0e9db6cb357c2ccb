"""Stage fusion: two adjacent LM stages become one LM call with one combined signature.

The fused signature takes the inputs of ``a`` plus the inputs of ``b`` that ``a`` does not produce,
and outputs everything both produce (``a``'s first, so the model writes them before ``b``'s, as
``b`` would have read them). Its instructions are both stages' instructions, in order. The fused
stage is a real ``dspy.Predict`` (or ``ChainOfThought`` when either stage was one), so it has a
stable path and optimizers compile it like any other predictor.

Fuse before compiling: demos of the original predictors are not carried over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dspy

from stageflow.errors import ConfigurationError
from stageflow.stages import Stage, may_be_left_out

__all__ = ["StageFusion", "fuse"]


def _unwrap(stage: Any) -> Any:
    if isinstance(stage, Stage) and not stage.input_map and not stage.output_map and stage.policy is None:
        return stage.module
    return stage


def _parts(stage: Any) -> tuple[Any, bool] | None:
    """``(base_signature, is_chain_of_thought)`` for a fusable predictor, else ``None``."""
    m = _unwrap(stage)
    if isinstance(m, dspy.ChainOfThought) and isinstance(getattr(m, "predict", None), dspy.Predict):
        sig = m.predict.signature
        if "reasoning" in sig.output_fields:
            sig = sig.delete("reasoning")
        return sig, True
    if type(m) is dspy.Predict:
        return m.signature, False
    return None


def _predictor(stage: Any) -> Any:
    m = _unwrap(stage)
    return m.predict if isinstance(m, dspy.ChainOfThought) else m


_PREDICTORS = ("Predict", "ChainOfThought")
_ONLY_PREDICTORS = "only dspy.Predict / dspy.ChainOfThought stages without renames or policies can be fused"


def _kind(stage: Any) -> str:
    """The class name a fusion rule is keyed by (a plain ``Stage`` wrapper counts as its module)."""
    return type(_unwrap(stage)).__name__


class StageFusion:
    """Decide whether two adjacent stages can share one LM call, and fuse them.

    As in the tutorial, ``fusion_rules`` maps ``"<first class>_<second class>"`` to a function
    ``(stage1, stage2) -> fused stage``. It starts with the four ``Predict``/``ChainOfThought`` pairs,
    fused into one predictor with a combined signature (:meth:`fuse_predictors`, which also checks
    the pair is safe to fuse: same LM, no demos, no field written twice). Add a rule to fuse your
    own classes; delete one to keep a pair apart.

    Examples:
        >>> import dspy
        >>> f = StageFusion()
        >>> sorted(f.fusion_rules)[:2]
        ['ChainOfThought_ChainOfThought', 'ChainOfThought_Predict']
        >>> a, b = dspy.Predict("question -> keywords"), dspy.Predict("question, keywords -> answer")
        >>> f.can_fuse(a, b)
        True
        >>> f.fuse(a, b).signature.signature
        'question -> keywords, answer'
        >>> del f.fusion_rules["Predict_Predict"]
        >>> f.why_not(a, b)
        "StageFusion.fusion_rules has no rule for 'Predict_Predict'"
    """

    def __init__(self) -> None:
        self.fusion_rules: dict[str, Callable[[Any, Any], Any]] = {
            f"{x}_{y}": self.fuse_predictors for x in _PREDICTORS for y in _PREDICTORS
        }

    def why_not(self, a: Any, b: Any) -> str | None:
        """Why ``a`` and ``b`` cannot be fused (``None`` when they can)."""
        key = f"{_kind(a)}_{_kind(b)}"
        rule = self.fusion_rules.get(key)
        if rule is None:
            if _parts(a) is None or _parts(b) is None:
                return (
                    "only dspy.Predict / dspy.ChainOfThought stages without renames or policies can be fused"
                )
            return f"StageFusion.fusion_rules has no rule for {key!r}"
        if getattr(rule, "__func__", None) is not StageFusion.fuse_predictors:
            return None  # the user's own rule decides
        return _predictors_why_not(a, b)

    def can_fuse(self, a: Any, b: Any) -> bool:
        """Whether ``a`` then ``b`` can become one stage (one LM call for predictors)."""
        return self.why_not(a, b) is None

    def fuse(self, a: Any, b: Any) -> Any:
        """One stage doing the work of ``a`` then ``b``, made by the matching rule."""
        reason = self.why_not(a, b)
        if reason is not None:
            raise ConfigurationError(f"Cannot fuse these stages: {reason}.", code="not_fusable")
        return self.fusion_rules[f"{_kind(a)}_{_kind(b)}"](a, b)

    def fuse_predictors(self, a: Any, b: Any) -> Any:
        """One predictor doing the work of ``a`` then ``b`` in a single LM call."""
        reason = _predictors_why_not(a, b)
        if reason is not None:
            raise ConfigurationError(f"Cannot fuse these stages: {reason}.", code="not_fusable")
        (sa, cot_a), (sb, cot_b) = _parts(a), _parts(b)  # type: ignore[misc]
        fields: dict[str, Any] = {}
        for name, f in sa.input_fields.items():
            fields[name] = (f.annotation, f)
        for name, f in sb.input_fields.items():
            if name not in sa.output_fields and name not in fields:
                fields[name] = (f.annotation, f)
        for name, f in {**sa.output_fields, **sb.output_fields}.items():
            fields[name] = (f.annotation, f)
        instructions = f"{sa.instructions.strip()}\n\nThen: {sb.instructions.strip()}"
        signature = dspy.make_signature(fields, instructions)
        lm = _predictor(a).lm
        fused = dspy.ChainOfThought(signature) if cot_a or cot_b else dspy.Predict(signature)
        if lm is not None:
            _predictor(fused).lm = lm
        return fused


def _predictors_why_not(a: Any, b: Any) -> str | None:
    pa, pb = _parts(a), _parts(b)
    if pa is None or pb is None:
        return _ONLY_PREDICTORS
    if _predictor(a).lm is not _predictor(b).lm:
        return "the stages use different LMs"
    if _predictor(a).demos or _predictor(b).demos:
        return "the stages have demos (fuse before compiling)"
    sa, sb = pa[0], pb[0]
    clash = set(sa.output_fields) & set(sb.output_fields)
    if clash:
        return f"both stages write {sorted(clash)}"
    if set(sb.output_fields) & set(sa.input_fields):
        return "the second stage writes a field the first one reads"
    for name in sorted(set(sa.input_fields) & set(sb.input_fields)):
        # (the fused signature has one field for both: its default would hold for both stages)
        fa, fb = sa.input_fields[name], sb.input_fields[name]
        if may_be_left_out(fa) != may_be_left_out(fb) or not _same(fa.default, fb.default):
            return f"the stages read '{name}' with different defaults (or one may be left out)"
    return None


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # (values that cannot be compared are not the same)
        return False


def fuse(pipeline: Any, fusion: StageFusion | None = None) -> Any:
    """A new :class:`SequentialPipeline` with every fusable run of adjacent stages fused.

    The result has the same fields as the original's. Examples: four chained ``Predict`` stages on
    one LM become one ``Predict``: 4 LM calls → 1.
    """
    from stageflow.patterns.sequential import SequentialPipeline

    if type(pipeline) is not SequentialPipeline:
        raise ConfigurationError(
            f"stageflow.fuse takes a plain SequentialPipeline, not {type(pipeline).__name__}: what that "
            "class adds (recovery per stage index, observers) would not survive fusing its stages.",
            code="not_fusable",
            hint="fuse the stages first, then wrap them: "
            "ErrorHandlingPipeline(stageflow.fuse(p).stages, ...)",
        )
    f = fusion or StageFusion()
    out: list[Any] = []
    for s in pipeline.stages:
        if out and f.can_fuse(out[-1], s):
            out[-1] = f.fuse(out[-1], s)
        else:
            out.append(s)
    fused = SequentialPipeline(out)
    fused._default_policy = pipeline._default_policy  # pipeline-wide policies carry over
    return fused
