"""Every file stageflow writes on request goes through stageflow.outfile (r_cli_1).

Before the fix, `graph -o`, `run --output` and `batch -o` wrote a temporary file and renamed it
over the path: a character device or FIFO became a regular file (as root, `-o /dev/null` destroyed
the system's /dev/null), writing to a full device exited 0, a symlink was replaced instead of
written through, and every output was mode 0600 whatever the umask.

Device nodes are private ones made with mknod in the test's folder (never /dev/null or /dev/full,
which a regression would destroy); those tests are skipped where mknod is not allowed.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stageflow.cli import main
from stageflow.errors import ConfigurationError
from stageflow.outfile import open_output, write_text

GRAPH_FILE = (
    'version: 1\ninputs: [x]\nnodes:\n  root:\n    type: pipeline\n    stages:\n    - predict: "x -> y"\n'
)
ALLOW = ["--allow-module", "outmod"]
COMPONENT = "def shout(x):\n    return {'y': x.upper()}\n"


def _device(folder: Path, name: str, minor: int) -> Path:
    """A private character device (1, minor): 3 is null, 7 is full."""
    path = folder / name
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except (PermissionError, AttributeError, OSError) as exc:
        pytest.skip(f"cannot make a device node here ({exc})")
    return path


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "outmod", raising=False)
    (tmp_path / "g.yaml").write_text(GRAPH_FILE, encoding="utf-8")
    (tmp_path / "outmod.py").write_text(COMPONENT, encoding="utf-8")
    (tmp_path / "p.yaml").write_text("inputs: [x]\nroot: {component: 'outmod:shout', writes: [y]}\n", "utf-8")
    (tmp_path / "d.jsonl").write_text('{"id": "a", "x": "one"}\n', encoding="utf-8")
    return tmp_path


def test_new_file_gets_umask_mode(tmp_path: Path, umask022: None) -> None:
    write_text(tmp_path / "new.txt", "x\n")
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644


def test_replaced_file_keeps_its_mode_and_no_temp_is_left(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    target.chmod(0o640)
    write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old\n")

    def produce() -> None:
        with open_output(target) as fh:
            fh.write("half")
            raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError):
        produce()
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_symlink_target_is_written_and_the_link_stays(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "target.txt"
    target.write_text("old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    write_text(link, "new\n")
    assert link.is_symlink()
    assert os.readlink(link) == str(target)
    assert target.read_text() == "new\n"


def test_fifo_is_written_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_text(fifo, "through the pipe\n")
    reader.join(10)
    assert got == ["through the pipe\n"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_dash_is_standard_output(capsys: pytest.CaptureFixture[str]) -> None:
    write_text("-", "to stdout\n")
    assert capsys.readouterr().out == "to stdout\n"


@pytest.mark.parametrize("bad", ["folder", "readonly", "missing/x.txt"])
def test_unwritable_paths_are_refused(tmp_path: Path, bad: str) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "readonly").write_text("keep\n")
    (tmp_path / "readonly").chmod(0o444)
    if bad == "readonly" and os.access(tmp_path / "readonly", os.W_OK):
        pytest.skip("root may write any file")
    with pytest.raises(ConfigurationError) as info:
        write_text(tmp_path / bad, "x")
    assert info.value.code == "bad_output"
    assert bad.split("/")[0] in str(info.value)


def test_device_is_written_in_place_and_a_full_device_fails(tmp_path: Path) -> None:
    null, full = _device(tmp_path, "mynull", 3), _device(tmp_path, "myfull", 7)
    write_text(null, "discarded\n")
    assert stat.S_ISCHR(null.stat().st_mode)
    with pytest.raises(ConfigurationError, match="No space left on device") as info:
        write_text(full, "x" * 100_000)
    assert info.value.code == "bad_output"
    assert stat.S_ISCHR(full.stat().st_mode)


@pytest.mark.parametrize(
    "command",
    [
        ["graph", "g.yaml", "-o", "{out}"],
        ["run", "p.yaml", "--input", '{"x": "a"}', "--output", "{out}", "--allow-module", "outmod"],
        ["batch", "p.yaml", "d.jsonl", "-o", "{out}", "--journal", "j.db", "--quiet", *ALLOW],
    ],
    ids=["graph", "run", "batch"],
)
def test_cli_outputs_keep_devices_and_fail_loudly_when_full(
    project: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    null, full = _device(project, "mynull", 3), _device(project, "myfull", 7)
    assert main([a.replace("{out}", str(null)) for a in command]) == 0
    assert stat.S_ISCHR(null.stat().st_mode)
    capsys.readouterr()
    big = [a.replace("{out}", str(full)) for a in command]
    if command[0] == "batch":  # a fresh journal, so that the output is written again
        big[big.index("j.db")] = "j2.db"
    assert main(big) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err
    assert "myfull" in err
    assert stat.S_ISCHR(full.stat().st_mode)


@pytest.mark.parametrize(
    "command",
    [
        ["graph", "g.yaml", "-o", "link.txt"],
        ["run", "p.yaml", "--input", '{"x": "a"}', "--output", "link.txt", "--allow-module", "outmod"],
        ["batch", "p.yaml", "d.jsonl", "-o", "link.txt", "--allow-module", "outmod", "--quiet"],
    ],
    ids=["graph", "run", "batch"],
)
def test_cli_outputs_write_through_symlinks_with_the_umask(
    project: Path, command: list[str], umask022: None
) -> None:
    (project / "link.txt").symlink_to("target.txt")
    assert main(command) == 0
    assert (project / "link.txt").is_symlink()
    target = project / "target.txt"
    assert target.stat().st_size > 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "command",
    [
        ["graph", "g.yaml", "-o", "loop_a"],
        ["run", "p.yaml", "--input", '{"x": "a"}', "-o", "loop_a", "--allow-module", "outmod"],
        ["batch", "p.yaml", "d.jsonl", "-o", "loop_a", "--allow-module", "outmod", "--quiet"],
    ],
    ids=["graph", "run", "batch"],
)
def test_a_symlink_loop_as_output_is_bad_input(
    project: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Second attack round: it was "run failed: RuntimeError: Symlink loop" with exit 1.
    (project / "loop_a").symlink_to("loop_b")
    (project / "loop_b").symlink_to("loop_a")
    assert main(command) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot be written" in err
    assert "loop_a" in err


def test_batch_to_stdout_needs_a_journal(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["batch", "p.yaml", "d.jsonl", "-o", "-", "--allow-module", "outmod", "--quiet"]
    assert main(base) == 2
    assert "--journal" in capsys.readouterr().err
    assert main([*base, "--journal", "j.db"]) == 0
    assert capsys.readouterr().out == '{"id":"a","status":"ok","outputs":{"y":"ONE"}}\n'
