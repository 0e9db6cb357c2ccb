"""``stageflow demo``: run a multi-hop QA architecture on one question and report what each stage did.

:func:`run_demo` does the work and returns a :class:`DemoResult`; :func:`format_text` and
:func:`DemoResult.to_json` render it. The command line (``stageflow.cli``) adds model selection, the
progress line and error handling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from stageflow.apps.multihop.adapter import make_adapter
from stageflow.apps.multihop.architectures import DEFAULT_ARCHITECTURE, build_architecture, get_architecture
from stageflow.apps.multihop.data import load_devset, match_kind
from stageflow.apps.multihop.evaluate import count_lm_calls
from stageflow.apps.multihop.program import stage_name
from stageflow.observe.profiler import profile

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "DEFAULT_DEMOS",
    "DEFAULT_QUESTION_ID",
    "DemoResult",
    "default_question",
    "demo_stage_name",
    "fake_lm",
    "format_text",
    "run_demo",
]

#: The dev-set question the demo answers when none is given.
DEFAULT_QUESTION_ID = "d04"
#: Labeled train-set demos per predictor of the ``decompose`` architecture on the embedded model.
DEFAULT_DEMOS = get_architecture("decompose").default_demos

_LINKED_NAMES = {"stages[0]": "retrieve", "stages[1]": "candidates", "stages[2]": "answer"}


def default_question() -> str:
    """The demo's default question (from the shipped dev set)."""
    return str(next(ex.question for ex in load_devset() if ex.id == DEFAULT_QUESTION_ID))


def demo_stage_name(path: str, architecture: str = DEFAULT_ARCHITECTURE) -> str:
    """A readable name for a stage path of ``architecture`` (``stages[0]`` → ``retrieve``)."""
    if architecture == "decompose":
        return stage_name(path)
    return _LINKED_NAMES.get(path, path)


@dataclass
class DemoResult:
    """Everything the demo shows.

    ``steps`` holds what the architecture's stages produced, by field: ``passages``, ``linked``,
    ``candidates`` and ``choice_scores`` for the linked architectures; ``sub_questions``, ``facts``
    and ``passages`` (one list per sub-question) for ``decompose``.
    """

    question: str
    architecture: str
    answer: str
    model: str
    prompt_style: str
    demos: int
    seconds: float
    lm_calls: int
    steps: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    expected: str | None = None
    match: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what ``stageflow demo --json`` prints)."""
        return {
            "question": self.question,
            "architecture": self.architecture,
            **self.steps,
            "answer": self.answer,
            "expected": self.expected,
            "match": self.match,
            "model": self.model,
            "prompt_style": self.prompt_style,
            "demos": self.demos,
            "lm_calls": self.lm_calls,
            "seconds": round(self.seconds, 4),
            "stages": self.stages,
        }


_LINKED_ORDER = ["retrieve", "candidates", "answer"]
_DECOMPOSE_ORDER = [
    "decompose",
    "check sub-questions",
    "for each sub-question",
    "one sub-question",
    "retrieve",
    "extract fact",
    "synthesize",
]


def _stage_table(summary: dict[str, dict[str, Any]], architecture: str) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for path, stats in summary.items():
        name = demo_stage_name(path, architecture)
        row = rows.setdefault(
            name, {"stage": name.strip(), "depth": len(name) - len(name.lstrip()), "calls": 0}
        )
        row["calls"] += stats["num_executions"]
        row["seconds"] = round(row.get("seconds", 0.0) + stats["total_time"], 4)
    order = _DECOMPOSE_ORDER if architecture == "decompose" else _LINKED_ORDER
    return sorted(rows.values(), key=lambda r: order.index(r["stage"]) if r["stage"] in order else 99)


def _steps(result: Any, architecture: str) -> dict[str, Any]:
    if architecture == "decompose":
        return {
            "sub_questions": [str(s) for s in result.sub_questions],
            "facts": ["" if f is None else str(f) for f in result.facts],
            "passages": [list(p or []) for p in result.passages],
        }
    steps: dict[str, Any] = {
        "passages": [str(p) for p in result.passages],
        "linked": [str(t) for t in result.linked],
        "candidates": [str(c) for c in result.candidates],
    }
    scores = result.get("choice_scores")
    if scores:
        steps["choice_scores"] = {str(k): v for k, v in scores.items()}
    return steps


def run_demo(
    question: str,
    *,
    lm: Any,
    compact: bool,
    architecture: str = DEFAULT_ARCHITECTURE,
    adapter: Any = None,
    corpus: str | Path | None = None,
    k: int | None = None,
    demos: int | None = None,
    model_label: str = "",
) -> DemoResult:
    """Build the architecture's program, run it once under ``lm`` and profile it.

    Args:
        question: The question to answer.
        lm: The DSPy LM (unused by the no-model ``linked-first``).
        compact: Use the terse prompt style for tiny models
            (:class:`~stageflow.apps.multihop.adapter.CompactJSONAdapter`, terse signatures).
        architecture: A name from :data:`~stageflow.apps.multihop.architectures.ARCHITECTURES`.
        adapter: Override the adapter.
        corpus: A JSON Lines corpus to retrieve from (default: the shipped one).
        k: Passages per search (default: the architecture's).
        demos: Labeled train-set demos per predictor (default: the architecture's, for compact prompts).
        model_label: How to name the model in the output.

    Raises:
        ConfigurationError: an unknown architecture or a bad corpus; stageflow errors from the run.
    """
    arch = get_architecture(architecture)
    shown = (arch.default_demos if compact else 0) if demos is None else demos
    program = build_architecture(architecture, corpus=corpus, k=k, compact=compact, demos=shown)
    chosen_adapter = adapter or make_adapter(compact)
    started = time.perf_counter()
    with dspy.context(lm=lm, adapter=chosen_adapter), profile() as prof, count_lm_calls() as calls:
        result = program(question=question)
    seconds = time.perf_counter() - started
    gold = next((ex for ex in load_devset() if ex.question.strip() == question.strip()), None)
    return DemoResult(
        question=question,
        architecture=architecture,
        answer=str(result.answer),
        model=(model_label or str(getattr(lm, "model", lm))) if arch.uses_lm else "no model",
        prompt_style="compact" if compact else "standard",
        demos=shown if arch.uses_lm else 0,
        seconds=seconds,
        lm_calls=calls.calls,
        steps=_steps(result, architecture),
        stages=_stage_table(prof.get_performance_summary(), architecture),
        expected=None if gold is None else str(gold.answer),
        match=None if gold is None else (match_kind(result, gold) or "no"),
    )


def _passage_lines(result: DemoResult) -> list[str]:
    lines: list[str] = []
    linked = set(result.steps.get("linked", []))
    source = ""
    for passage in result.steps.get("passages", []):
        title, sep, _ = passage.partition(": ")
        title = title if sep else "(untitled)"
        if title in linked:
            lines.append(f"  hop 2  {title}  (linked from {source})")
        else:
            source = title
            lines.append(f"  hop 1  {title}")
    return lines


def _candidate_lines(result: DemoResult) -> list[str]:
    scores = result.steps.get("choice_scores") or {}
    out = []
    for c in result.steps.get("candidates", []):
        score = scores.get(c)
        mark = "  <- chosen" if c == result.answer else ""
        out.append(f"  {c}" + (f"  ({score:.2f})" if isinstance(score, float) and score else "") + mark)
    return out or ["  (none)"]


def format_text(result: DemoResult) -> str:
    """The human-readable report ``stageflow demo`` prints."""
    arch = get_architecture(result.architecture)
    who = f"with {result.model}" if arch.uses_lm else "with no model (the control)"
    lines = [
        f"stageflow demo: multi-hop QA {who}",
        f"architecture {arch.name}: {arch.summary}",
        "",
        f"question       {result.question}",
    ]
    if result.architecture == "decompose":
        lines += [
            "sub-questions",
            *(f"  {i}. {s}" for i, s in enumerate(result.steps["sub_questions"], 1)),
            "facts",
            *(f"  {i}. {f}" for i, f in enumerate(result.steps["facts"], 1)),
        ]
    else:
        lines += ["passages (found without a model)", *_passage_lines(result)]
        lines += ["candidates (typed spans of the passages)", *_candidate_lines(result)]
    lines.append(f"answer         {result.answer}")
    if result.expected is not None:
        verdict = {"exact": "correct", "contains": "correct (contains it)"}.get(result.match or "", "wrong")
        lines.append(f"expected       {result.expected}  [{verdict}; from the shipped dev set]")
    lines += ["", f"{'stage':<26}{'calls':>6}{'total ms':>12}"]
    for row in result.stages:
        label = " " * row["depth"] + row["stage"]
        lines.append(f"{label:<26}{row['calls']:>6}{row['seconds'] * 1000:>12.1f}")
    lines.append(f"{'whole program':<26}{'':>6}{result.seconds * 1000:>12.1f}")
    lines.append(f"{result.lm_calls} model call{'s' if result.lm_calls != 1 else ''}")
    return "\n".join(lines)


def fake_lm() -> Any:
    """A deterministic :class:`~stageflow.testing.FakeLM` for ``stageflow demo --fake``: it picks the
    first candidate; for ``decompose`` the question is its own sub-question, the fact is the best
    passage's first sentence and the answer the first fact."""
    from stageflow.testing import FakeLM

    def first_sentence(inputs: dict[str, Any]) -> str:
        passages = inputs.get("passages")
        text = passages[0] if isinstance(passages, list) and passages else str(passages or "")
        return text.split(": ", 1)[-1].split(". ")[0].rstrip(".") + "."

    def answer(inputs: dict[str, Any]) -> str:
        candidates = inputs.get("candidates")
        if isinstance(candidates, list) and candidates:
            return str(candidates[0])
        facts = inputs.get("facts")
        return str(facts[0] if isinstance(facts, list) and facts else facts or "")

    return FakeLM(
        {
            "sub_questions": lambda i: [i.get("question", "")],
            "fact": first_sentence,
            "reasoning": "The facts name it.",
            "answer": answer,
        },
        model="stageflow-fake/multihop",
    )
