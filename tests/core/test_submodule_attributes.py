"""After a plain ``import stageflow``, the dotted paths the README names resolve (helper 110:
``stageflow.lm.resolve_lm`` and ``stageflow.apps.multihop.build_program`` raised
``AttributeError`` from the lazy loader), and importing stageflow alone still imports no DSPy."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PATHS = [
    "stageflow.lm.resolve_lm",
    "stageflow.lm.fast.fast_path_stats",
    "stageflow.runtime.ProcessBackend",
    "stageflow.observe.redact",
    "stageflow.policies.is_retryable",
    "stageflow.engine.concurrency.abandoned_threads",
    "stageflow.apps.multihop.build_program",
    "stageflow.fingerprinting",
]


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("path", _PATHS)
def test_a_readme_path_resolves_after_import_stageflow(path: str) -> None:
    assert _run(f"import stageflow; print({path} is not None)") == "True"


def test_importing_stageflow_alone_imports_no_dspy_and_unknown_names_still_fail() -> None:
    out = _run(
        "import sys, stageflow\n"
        "print('dspy' in sys.modules)\n"
        "for name in ('nothing_here', '_private'):\n"
        "    try:\n"
        "        getattr(stageflow, name)\n"
        "    except AttributeError as e:\n"
        "        print(e)\n"
    )
    assert out.splitlines() == [
        "False",
        "module 'stageflow' has no attribute 'nothing_here'",
        "module 'stageflow' has no attribute '_private'",
    ]
