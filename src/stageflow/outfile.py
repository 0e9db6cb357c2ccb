"""Writing an output file the way a user expects, whatever sits at the path.

Every file stageflow writes on request (``stageflow graph -o``, ``run --output``, ``batch -o``,
``report -o``, :meth:`Tracer.save`, :func:`stageflow.observe.write_report`, ``dump_spec``) goes
through :func:`open_output`:

- ``-`` is standard output.
- A **regular file**, or a path where nothing exists yet, is replaced **atomically**: the text goes
  to a temporary file in the same folder, is flushed to disk, then renamed over the path, so a
  reader sees the old file or the new one, never half of it. The new file keeps the mode (and,
  where allowed, the owner) of the file it replaces; a new file gets ``0o666`` minus the umask,
  as ``open()`` would give it. A hard link to the old file keeps the old content.
- A **symbolic link** is followed: its target is what gets replaced (or created); the link stays.
- Anything else — a character device such as ``/dev/null``, a FIFO, a socket — is **opened and
  written in place** (no rename: a device node is never replaced by a file). Opening a FIFO
  waits for a reader, as a shell redirection does.
- A folder, a read-only file, a missing parent folder, or a failed write (``ENOSPC`` on a full
  disk or ``/dev/full``, ``EIO``...) raise :class:`~stageflow.errors.ConfigurationError` with
  ``code="bad_output"`` naming the path and the system's reason; the command line exits 2. A
  failed atomic write leaves the previous file as it was and no temporary file behind.

Examples:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> path = os.path.join(folder, "out.txt")
    >>> write_text(path, "hello\\n")
    >>> open(path).read()
    'hello\\n'
    >>> os.chmod(path, 0o640); write_text(path, "again\\n"); oct(os.stat(path).st_mode & 0o777)
    '0o640'
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from typing import TextIO

from stageflow.errors import ConfigurationError

__all__ = ["STDOUT", "check_output", "open_output", "write_text"]

#: The path that means standard output.
STDOUT = "-"


def _fail(path: str, what: str, reason: str, hint: str | None = None) -> ConfigurationError:
    return ConfigurationError(f"Cannot write {what} to {path}: {reason}.", code="bad_output", hint=hint)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _stat(target: str, path: str, what: str) -> os.stat_result | None:
    try:
        return os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symlink loop, a permission problem on a parent folder...
        raise _fail(path, what, _reason(exc)) from exc


def check_output(path: str | os.PathLike[str], what: str = "the output") -> None:
    """Refuse, before any work, an output path that :func:`open_output` could not write.

    Args:
        path: The path the user gave (``-`` is standard output, always fine).
        what: What is written, for the message (``"the graph"``, ``"--output"``).

    Raises:
        ConfigurationError: ``code="bad_output"``: a folder, a missing or read-only parent folder,
            a file or device that is not writable.
    """
    name = os.fspath(path)
    if name == STDOUT:
        return
    target = os.path.realpath(name)
    st = _stat(target, name, what)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise _fail(name, what, "it is a directory", hint="name a file inside it")
    if st is not None and not os.access(target, os.W_OK):
        raise _fail(name, what, "it is not writable (permission denied)")
    if st is not None and not stat.S_ISREG(st.st_mode):
        return  # a device or FIFO is written in place: its folder does not matter
    parent = os.path.dirname(target) or "."
    if not os.path.isdir(parent):
        raise _fail(name, what, f"the directory {parent} does not exist", hint="create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _fail(name, what, f"the directory {parent} is not writable")


@contextlib.contextmanager
def open_output(path: str | os.PathLike[str], what: str = "the output") -> Iterator[TextIO]:
    """A UTF-8 text stream for ``path``, committed when the block ends without an error.

    See the module docstring for what happens for each kind of path. If the block raises, a regular
    file is left as it was.

    Args:
        path: Where to write; ``-`` is standard output.
        what: What is written, for error messages.

    Raises:
        ConfigurationError: ``code="bad_output"``, the path cannot be written (the ``OSError`` is
            the ``__cause__``).
    """
    name = os.fspath(path)
    if name == STDOUT:
        with _guard(name, what):
            yield sys.stdout
            sys.stdout.flush()
        return
    check_output(name, what)
    target = os.path.realpath(name)
    st = _stat(target, name, what)
    if st is not None and not stat.S_ISREG(st.st_mode):
        # No O_CREAT and no O_TRUNC: a device or FIFO is written as it is, never replaced.
        with _guard(name, what), open(os.open(target, os.O_WRONLY), "w", encoding="utf-8") as fh:
            yield fh
        return
    with _atomic(target, name, what, st) as fh:
        yield fh


@contextlib.contextmanager
def _guard(path: str, what: str) -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:  # the reader went away (`... -o - | head`): not a write failure
        raise
    except OSError as exc:
        raise _fail(path, what, _reason(exc)) from exc


def _create_temp(target: str, path: str, what: str) -> tuple[int, str]:
    folder, base = os.path.split(target)
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            # 0o666 through the kernel: the umask (and a folder's default ACL) apply as for open().
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise _fail(path, what, _reason(exc)) from exc
    raise _fail(path, what, f"could not create a temporary file in {folder}")


@contextlib.contextmanager
def _atomic(target: str, path: str, what: str, st: os.stat_result | None) -> Iterator[TextIO]:
    fd, tmp = _create_temp(target, path, what)
    try:
        fh = open(fd, "w", encoding="utf-8")  # noqa: SIM115 (closed below, before the rename)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with _guard(path, what), fh:
            if st is not None:  # keep the replaced file's mode and, where allowed, its owner
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    with contextlib.suppress(OSError):
                        os.fchown(fd, st.st_uid, st.st_gid)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        with _guard(path, what):
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dfd = os.open(os.path.dirname(target) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_text(path: str | os.PathLike[str], text: str, what: str = "the output") -> None:
    """Write ``text`` to ``path`` with :func:`open_output` (``-``: standard output)."""
    with open_output(path, what) as fh:
        fh.write(text)
