"""User code the monitoring sections' tests run (the tutorial's §M1 and §M2 wrap any stages): a
two-stage writer and the fake LM that answers it."""

from __future__ import annotations

import dspy

from stageflow.testing import FakeLM

__all__ = ["Draft", "Review", "writer_lm"]


class Draft(dspy.Module):
    def __init__(self):
        super().__init__()
        self.write = dspy.Predict("topic -> draft")

    def forward(self, topic):
        return self.write(topic=topic)


class Review(dspy.Module):
    def __init__(self):
        super().__init__()
        self.review = dspy.ChainOfThought("draft -> verdict")

    def forward(self, draft):
        return self.review(draft=draft)


def writer_lm() -> FakeLM:
    return FakeLM({"draft": lambda i: f"a draft about {i['topic']}", "verdict": "accept"})
