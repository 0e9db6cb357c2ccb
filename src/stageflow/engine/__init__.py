"""The one execution engine: plan entries, contract scope, hooks, and the stage runner."""

from stageflow.engine.hooks import (
    Hook,
    active_hooks,
    attach_hooks,
    current_path,
    install_hook,
    uninstall_hook,
)
from stageflow.engine.plan import Scope, StageEntry, build_entry, join_path
from stageflow.engine.runner import acall_stage, aexecute, arun_sequence, call_stage, execute, run_sequence

__all__ = [
    "Hook",
    "Scope",
    "StageEntry",
    "acall_stage",
    "active_hooks",
    "aexecute",
    "arun_sequence",
    "attach_hooks",
    "build_entry",
    "call_stage",
    "current_path",
    "execute",
    "install_hook",
    "join_path",
    "run_sequence",
    "uninstall_hook",
]
