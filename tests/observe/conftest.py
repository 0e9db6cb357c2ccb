"""Fixtures of the observe tests: Graphviz's ``dot`` and a Chromium page (see ``observe_kit``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from observe_kit import CHROMIUM, require


@pytest.fixture
def dot_binary() -> str:
    exe = shutil.which("dot")
    require(exe is not None, "Graphviz 'dot' (apt-get install graphviz)")
    assert exe is not None
    return exe


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A page in Debian's Chromium (never a downloaded browser), fresh profile, no network."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "Playwright for Python (pip install playwright)")
    require(Path(CHROMIUM).exists(), f"Chromium at {CHROMIUM} (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            viewport={"width": 1400, "height": 1000},
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield context.new_page()
        finally:
            context.close()
