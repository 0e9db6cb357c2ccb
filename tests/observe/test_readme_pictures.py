"""The README's Mermaid picture is what the code draws today."""

from __future__ import annotations

import re
from pathlib import Path

from stageflow.apps.multihop import build_program

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_mermaid_block_is_the_multihop_program() -> None:
    blocks = re.findall(r"```mermaid\n(.*?)```\n", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no mermaid block"
    assert blocks[0].rstrip("\n") == build_program().to_mermaid()
