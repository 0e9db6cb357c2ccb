"""``stageflow demo``: run the multi-hop program on one question and report what each stage did.

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
from stageflow.apps.multihop.data import corpus_path, load_devset, match_kind
from stageflow.apps.multihop.evaluate import with_train_demos
from stageflow.apps.multihop.program import build_program, stage_name
from stageflow.observe.profiler import profile

__all__ = [
    "DEFAULT_DEMOS",
    "DEFAULT_QUESTION_ID",
    "DemoResult",
    "default_question",
    "fake_lm",
    "format_text",
    "run_demo",
]

#: The dev-set question the demo answers when none is given.
DEFAULT_QUESTION_ID = "d04"
#: Labeled train-set demos per predictor (``LabeledFewShot``; see benchmarks/demo_quality.py).
DEFAULT_DEMOS = 4


def default_question() -> str:
    """The demo's default question (from the shipped dev set)."""
    return str(next(ex.question for ex in load_devset() if ex.id == DEFAULT_QUESTION_ID))


@dataclass
class DemoResult:
    """Everything the demo shows."""

    question: str
    sub_questions: list[str]
    facts: list[str]
    passages: list[list[str]]
    answer: str
    model: str
    prompt_style: str
    demos: int
    seconds: float
    stages: list[dict[str, Any]] = field(default_factory=list)
    expected: str | None = None
    match: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what ``stageflow demo --json`` prints)."""
        return {
            "question": self.question,
            "sub_questions": self.sub_questions,
            "facts": self.facts,
            "passages": self.passages,
            "answer": self.answer,
            "expected": self.expected,
            "match": self.match,
            "model": self.model,
            "prompt_style": self.prompt_style,
            "demos": self.demos,
            "seconds": round(self.seconds, 4),
            "stages": self.stages,
        }


def _stage_table(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for path, stats in summary.items():
        name = stage_name(path)
        row = rows.setdefault(
            name, {"stage": name.strip(), "depth": len(name) - len(name.lstrip()), "calls": 0}
        )
        row["calls"] += stats["num_executions"]
        row["seconds"] = round(row.get("seconds", 0.0) + stats["total_time"], 4)
    order = ["decompose", "check sub-questions", "for each sub-question", "one sub-question", "retrieve"]
    order += ["extract fact", "synthesize"]
    return sorted(rows.values(), key=lambda r: order.index(r["stage"]) if r["stage"] in order else 99)


def run_demo(
    question: str,
    *,
    lm: Any,
    compact: bool,
    adapter: Any = None,
    corpus: str | Path | None = None,
    k: int = 3,
    demos: int = 0,
    model_label: str = "",
) -> DemoResult:
    """Build the program, run it once under ``lm`` and profile it.

    Args:
        question: The question to answer.
        lm: The DSPy LM.
        compact: Use the compact prompt style (terse instructions, :class:`CompactJSONAdapter`).
        adapter: Override the adapter (default: the one for the prompt style).
        corpus: A JSON Lines corpus to retrieve from (default: the shipped one).
        k: Passages per sub-question.
        demos: Labeled train-set demos per predictor (``dspy.LabeledFewShot``, no model calls).
        model_label: How to name the model in the output.

    Raises:
        ConfigurationError: a bad corpus; stageflow errors from the run.
    """
    from stageflow.retrieval import BM25Retriever

    retriever = BM25Retriever(corpus if corpus is not None else corpus_path(), k=k)
    program = with_train_demos(build_program(retriever, k=k, compact=compact), demos)
    started = time.perf_counter()
    with dspy.context(lm=lm, adapter=adapter or make_adapter(compact)), profile() as prof:
        result = program(question=question)
    seconds = time.perf_counter() - started
    gold = next((ex for ex in load_devset() if ex.question.strip() == question.strip()), None)
    return DemoResult(
        question=question,
        sub_questions=[str(s) for s in result.sub_questions],
        facts=["" if f is None else str(f) for f in result.facts],
        passages=[list(p or []) for p in result.passages],
        answer=str(result.answer),
        model=model_label or str(getattr(lm, "model", lm)),
        prompt_style="compact" if compact else "standard",
        demos=demos,
        seconds=seconds,
        stages=_stage_table(prof.get_performance_summary()),
        expected=None if gold is None else str(gold.answer),
        match=None if gold is None else (match_kind(result, gold) or "no"),
    )


def format_text(result: DemoResult) -> str:
    """The human-readable report ``stageflow demo`` prints."""
    lines = [
        f"stageflow demo: multi-hop QA with {result.model}",
        f"({result.prompt_style} prompts, {result.demos} train-set demos per predictor)",
        "",
        f"question       {result.question}",
        "sub-questions",
        *(f"  {i}. {s}" for i, s in enumerate(result.sub_questions, 1)),
        "facts",
        *(f"  {i}. {f}" for i, f in enumerate(result.facts, 1)),
        f"answer         {result.answer}",
    ]
    if result.expected is not None:
        verdict = {"exact": "correct", "contains": "correct (contains it)"}.get(result.match or "", "wrong")
        lines.append(f"expected       {result.expected}  [{verdict}; from the shipped dev set]")
    lines += ["", f"{'stage':<26}{'calls':>6}{'total ms':>12}"]
    for row in result.stages:
        label = " " * row["depth"] + row["stage"]
        lines.append(f"{label:<26}{row['calls']:>6}{row['seconds'] * 1000:>12.1f}")
    lines.append(f"{'whole program':<26}{'':>6}{result.seconds * 1000:>12.1f}")
    return "\n".join(lines)


def fake_lm() -> Any:
    """A deterministic :class:`~stageflow.testing.FakeLM` for ``stageflow demo --fake``: the question is
    its own sub-question, the fact is the best passage's first sentence, the answer the first fact."""
    from stageflow.testing import FakeLM

    def first_sentence(inputs: dict[str, Any]) -> str:
        passages = inputs.get("passages")
        text = passages[0] if isinstance(passages, list) and passages else str(passages or "")
        return text.split(": ", 1)[-1].split(". ")[0].rstrip(".") + "."

    def answer(inputs: dict[str, Any]) -> str:
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
