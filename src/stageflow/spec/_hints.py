"""Fixes for pipeline-file users: contract hints written for Python, translated to the file's keys.

Examples:
    >>> file_hint("declare it with Stage(<stage>, writes=['title', 'words'])")
    "declare it with `writes: [title, words]` on that stage's node"
    >>> file_hint("feed it from an existing field: Stage(<stage>, inputs={'query': 'text'})")
    "feed it from an existing field: `inputs: {query: text}` on that stage's node"
    >>> file_hint("pass question=... when calling the pipeline")
    "add 'question' to the file's `inputs` (and to --input when running it)"
"""

from __future__ import annotations

import re

__all__ = ["file_hint"]

_WRITES = re.compile(r"Stage\(<stage>, writes=\[([^\]]*)\]\)")
_INPUTS = re.compile(r"Stage\(<stage>, inputs=\{([^}]*)\}\)")
_PASS = re.compile(r"pass (\w+)=\.\.\. when calling the pipeline")


def _names(listing: str) -> str:
    return ", ".join(n.strip().strip("'\"") for n in listing.split(",") if n.strip() and n.strip() != "...")


def _pairs(mapping: str) -> str:
    pairs = [p.split(":", 1) for p in mapping.split(",") if ":" in p]
    return ", ".join(f"{k.strip().strip(chr(39))}: {v.strip().strip(chr(39))}" for k, v in pairs)


def file_hint(hint: str | None) -> str | None:
    """``hint`` with its Python spellings replaced by the pipeline file's."""
    if not hint:
        return hint
    hint = _WRITES.sub(lambda m: f"`writes: [{_names(m.group(1))}]` on that stage's node", hint)
    hint = _INPUTS.sub(lambda m: f"`inputs: {{{_pairs(m.group(1))}}}` on that stage's node", hint)
    return _PASS.sub(
        lambda m: f"add '{m.group(1)}' to the file's `inputs` (and to --input when running it)", hint
    )
