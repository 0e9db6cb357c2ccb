"""Shared pieces of the observe tests: a pipeline with every pattern, hostile text, real tools.

The fixtures that use them are in ``conftest.py``.

Real tools (Graphviz ``dot``, Chromium driven by Playwright, Mermaid's bundled script) are used by
tests marked ``integration``. Without a tool such a test is skipped on a developer machine, but
under CI (``CI`` set) a missing tool fails the test: ``.ci/run`` installs them all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dspy
import pytest

import stageflow
from stageflow.testing import FakeLM

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("STAGEFLOW_CHROMIUM", "/usr/bin/chromium")
# Mermaid's browser bundle: .ci/run fetches it into build/vendor/ and names it here.
MERMAID_JS = Path(
    os.environ.get("STAGEFLOW_MERMAID_JS")
    or next(
        iter(sorted((ROOT / "build" / "vendor").glob("mermaid-*.min.js"), reverse=True)),
        ROOT / "build/vendor/mermaid.min.js",
    )
)

#: Text that breaks diagrams or pages when it is not escaped.
HOSTILE = (
    'x"]) --> y{{"<img src=x onerror=alert(1)>"}} %% end\n`**md**` #quot; & &lt; \\ ; '
    "</script><script>alert(2)</script> [[a]] (b) |c| -> d"
)


def require(available: bool, what: str) -> None:
    """Skip without ``what``, except under CI, where its absence is a failure."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI (.ci/run installs it)")
    pytest.skip(f"{what} is not installed")


def artifacts_dir() -> Path:
    """Where tests leave files for people to look at: ``$STAGEFLOW_TEST_ARTIFACTS`` or
    ``build/test-artifacts`` in the checkout (kept after the run; ``build/`` is not committed)."""
    path = Path(os.environ.get("STAGEFLOW_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def fn(name: str, reads: list[str], writes: list[str], value: Any = None) -> stageflow.FunctionStage:
    """A function stage that writes ``value`` (default: its own name) to each of ``writes``."""

    def body(**kwargs: Any) -> dict[str, Any]:
        return dict.fromkeys(writes, name if value is None else value)

    return stageflow.stage(body, reads=reads, writes=writes, name=name)


class Summarise(dspy.Module):  # type: ignore[misc]
    """A custom module: its control flow is Python, so the picture lists its predictors."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("text -> draft")
        self.polish = dspy.ChainOfThought("draft -> summary")

    def forward(self, text: str) -> dspy.Prediction:
        return self.polish(draft=self.draft(text=text).draft)


def every_pattern() -> stageflow.SequentialPipeline:
    """One pipeline using every pattern, nested, runnable with :func:`fake_lm`."""
    loop = stageflow.IterativePipeline(
        [fn("improve", ["question"], ["quality_score"], 0.95)],
        stageflow.QualityBasedStopping(quality_threshold=0.9),
        max_iterations=3,
    )
    per_item = stageflow.SequentialPipeline(
        [
            stageflow.Stage(fn("lookup", ["query"], ["passage"]), inputs={"query": "topic"}),
            dspy.Predict("topic, passage -> fact"),
        ]
    )
    hierarchical = stageflow.HierarchicalPipeline(
        {
            "root": {"type": "pipeline", "stages": ["check", "tidy"]},
            "check": {"type": "module", "module": fn("check", ["answer"], ["checked"])},
            "tidy": {"type": "module", "module": fn("tidy", ["checked"], ["tidied"])},
        }
    )
    return stageflow.SequentialPipeline(
        [
            dspy.Predict("question -> topics: list[str]"),
            stageflow.ForEach(per_item, over="topics", item="topic", collect={"fact": "facts"}),
            stageflow.ParallelPipeline(
                [
                    [fn("left", ["question"], ["l"]), fn("right", ["question"], ["r"])],
                    fn("after", ["l", "r"], ["lr"]),
                ]
            ),
            stageflow.BranchingPipeline(
                fn("route", ["question"], ["branch"], "short"),
                {
                    "short": fn("short", ["question"], ["answer"]),
                    "long": dspy.ChainOfThought("question -> answer"),
                },
                default="short",
            ),
            stageflow.EnsemblePipeline(
                [fn("vote_a", ["question"], ["answer"], "A"), fn("vote_b", ["question"], ["answer"], "A")],
                stageflow.ResultAggregator("majority"),
            ),
            stageflow.AdaptivePipeline(
                {
                    "direct": fn("direct", ["question"], ["plan"]),
                    "careful": fn("careful", ["question"], ["plan"]),
                }
            ),
            loop,
            stageflow.ErrorHandlingPipeline([fn("risky", ["answer"], ["safe"])], {0: lambda e, s: s}),
            hierarchical,
            stageflow.Stage(Summarise(), inputs={"text": "answer"}),
        ]
    )


def fake_lm() -> FakeLM:
    return FakeLM({"topics": ["alpha", "beta", "gamma"], "fact": "F", "summary": "S", "draft": "D"})
