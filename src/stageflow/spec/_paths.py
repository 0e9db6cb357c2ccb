"""File references in pipeline files stay inside the file's folder (or folders the user allows).

A pipeline file is data someone else may have written. If ``bm25: /home/me/.ssh/id_rsa`` were
followed, loading the file would read (and through error messages, show) any file the user can
read. A reference is therefore resolved against the file's folder, with ``..`` and symbolic links
followed to the real path, and used only if that real path is inside the file's folder or inside a
folder the user allowed (``--allow-path`` / ``allow_paths=``).

The data shipped inside stageflow (the multi-hop corpus, :data:`SHIPPED_DATA`) is public and
read-only, and always readable, so the shipped example files load from wherever stageflow is
installed.

The check is made on the fully resolved path, which is then what gets opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["SHIPPED_DATA", "resolve_reference"]

#: Data files shipped with stageflow, readable from any pipeline file.
SHIPPED_DATA = Path(__file__).resolve().parents[1] / "apps" / "multihop" / "data"


def resolve_reference(text: str, base: Path, allowed: Sequence[Path] = ()) -> Path | str:
    """The real path of ``text`` (relative to ``base``) if it lies inside ``base`` or an allowed folder.

    Returns:
        The resolved :class:`~pathlib.Path`, or a phrase saying where it leads instead (for the error
        message), e.g. ``"is absolute (/etc/passwd)"``.

    >>> import tempfile
    >>> base = Path(tempfile.mkdtemp()).resolve()
    >>> resolve_reference("data/corpus.jsonl", base) == base / "data" / "corpus.jsonl"
    True
    >>> resolve_reference("../corpus.jsonl", base).startswith("goes up with '..'")
    True
    """
    raw = Path(text)
    try:
        expanded = raw.expanduser()
        real = (base / expanded).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, an embedded NUL byte...
        return f"cannot be resolved ({exc})"
    roots = [base.resolve(), SHIPPED_DATA, *(Path(p).resolve() for p in allowed)]
    if any(real == root or real.is_relative_to(root) for root in roots):
        return real
    if text.startswith("~"):
        return f"starts with '~' (it is {real})"
    if raw.is_absolute():
        return f"is absolute ({real})"
    if ".." in raw.parts:
        return f"goes up with '..' to {real}"
    return f"leads through a symbolic link to {real}"
