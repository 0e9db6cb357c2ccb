"""``Result.copy()`` keeps the fields, as ``dspy.Prediction.copy()`` does (issue 12 verification).

Reproducer: ``result.copy()`` returned a Result whose only field was ``base`` (the original result):
DSPy's ``Example.copy`` builds ``type(self)(base=self, **kwargs)``, which ``Result`` took as a field.
"""

from __future__ import annotations

import stageflow


def test_copy_keeps_fields_and_run_and_takes_overrides() -> None:
    result = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x + 1}, writes=["y"])])(x=1)
    twin = result.copy()
    assert twin.keys() == result.keys() == ["x", "y"]
    assert twin.y == 2
    assert twin is not result
    assert [r.path for r in twin.trace] == [r.path for r in result.trace]
    changed = result.copy(y=5, z=0)
    assert (changed.y, changed.z, result.y) == (5, 0, 2)
