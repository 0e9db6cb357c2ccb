"""The pytest plugin stageflow installs provides its fixtures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dspy


def test_fake_lm_fixture_builds_a_scripted_lm(fake_lm: Callable[..., Any]) -> None:
    lm = fake_lm({"answer": "42"})
    with dspy.context(lm=lm):
        assert dspy.Predict("question -> answer")(question="?").answer == "42"
    assert lm.calls == 1


def test_isolation_fixture_turns_the_disk_cache_off(stageflow_dspy: None) -> None:
    assert dspy.cache.enable_disk_cache is False


def test_settings_changed_in_a_test_do_not_leak_one() -> None:
    dspy.configure(lm=dspy.utils.DummyLM([{"answer": "x"}]))
    assert dspy.settings.lm is not None


def test_settings_changed_in_a_test_do_not_leak_two() -> None:
    # runs after the test above in file order: the isolation fixture restored the defaults
    assert dspy.settings.lm is None
