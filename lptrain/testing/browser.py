"""Headless Chromium (Debian's `chromium` package) for page tests: the DOM after load, and a
screenshot. The flags keep it off the network: without the background-networking ones it
keeps trying to reach Google's services, which a closed network refuses."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str | None:
    """The browser's path, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(page: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile every time
        return subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def dump_dom(page: Path) -> str:
    """The page's DOM after its load event (scripts have run)."""
    return _run(page, "--dump-dom").stdout


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 2400) -> Path:
    _run(page, f"--window-size={width},{height}", f"--screenshot={out.resolve()}")
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {page}")
    return out
