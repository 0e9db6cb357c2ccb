"""Concurrency: one budget for the whole program, and the fan-out every concurrent pattern uses.

**Budget.** ``stageflow.configure(max_concurrency=N)`` (or ``with stageflow.limits(...)``) sets a
cap on concurrent *leaf* stage calls (predictors, modules, functions — not the pipelines around
them). Each fan-out may add its own cap (``max_concurrency=`` on the pattern). Caps form a chain
through the context, so a ``ForEach`` inside an ensemble inside a batch never exceeds any cap above
it: a leaf call takes one slot of every budget in its chain, outermost first. A leaf running
inside another leaf (a function stage that calls a pipeline) does not take a slot twice, so small
caps cannot deadlock. Without a cap nothing is limited: there is no silent default below what
the user set.

**Fan-out.** :func:`fan_out` (threads) and :func:`afan_out` (asyncio tasks) run branch thunks
concurrently and return one :class:`BranchOutcome` per branch, in input order:

- threads come from one long-lived pool (no pool per call); the calling thread works too (except
  with ``fail_fast``, ``until`` or a timeout, where it must stay free to stop early), so a
  saturated pool cannot deadlock nested fan-outs;
- each branch runs in a copy of the caller's context, so ``dspy.context`` settings, the DSPy
  trace list (optimizers) and the usage tracker reach every branch;
- failure policies: ``collect`` (default) records errors, ``skip`` drops failed branches,
  ``fail_fast`` stops at the first error and raises it;
- per-branch timeouts: async branches are cancelled; threads cannot be, so a timed-out thread is
  reported as abandoned (see :func:`abandoned_threads`) and a fresh worker takes over;
- ``until(outcomes)`` stops early (e.g. an ensemble quorum) and abandons the rest.
"""

from __future__ import annotations

from stageflow.engine.budget import (
    Budget,
    aenter_leaf,
    budget_chain,
    child_budget,
    enter_leaf,
    exit_leaf,
    leaf_slots,
    limits,
)
from stageflow.engine.config import configure, get_config
from stageflow.engine.fanout import BranchOutcome, FailurePolicy, afan_out, fan_out
from stageflow.engine.pool import (
    abandoned_threads,
    available_cpus,
    note_abandoned,
    on_background_loop,
    run_on_background_loop,
    shared_pool,
    to_thread,
)

__all__ = [
    "BranchOutcome",
    "Budget",
    "FailurePolicy",
    "abandoned_threads",
    "aenter_leaf",
    "afan_out",
    "available_cpus",
    "budget_chain",
    "child_budget",
    "configure",
    "enter_leaf",
    "exit_leaf",
    "fan_out",
    "get_config",
    "leaf_slots",
    "limits",
    "note_abandoned",
    "on_background_loop",
    "run_on_background_loop",
    "shared_pool",
    "to_thread",
]
