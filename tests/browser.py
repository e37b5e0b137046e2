"""Headless Chromium for tests: load a page once, return its rendered DOM and optionally save a screenshot.

No WebDriver: ``chromium --headless --dump-dom`` prints the DOM after the page has loaded, and ``--screenshot``
in the same run captures that same render. Credentials in the URL (``http://user:password@host/...``) are
used for the top-level navigation and reused for the page's same-origin subresources (CSS, scripts), which
is enough for pages behind HTTP basic auth.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.services import stop_pid

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# What `make test` runs on a clean Debian (as root) to make the browser checks run instead of skip.
CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"
# Headless, and nothing that reaches the network or a desktop session: no sandbox (tests run as root in
# containers), no GPU, no QUIC, no first-run, sync or component-update traffic.
HEADLESS_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def chromium_binary() -> str | None:
    """The path of the first Chromium (or Chrome) on PATH, or None when there is none."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def render(url: str, screenshot: Path | None = None, window: tuple[int, int] = (1280, 1600),
           timeout_s: float = 90) -> str:
    """Load ``url`` in a fresh headless Chromium profile and return the DOM it rendered.

    Args:
        url: the page; ``http://user:password@host:port/path`` for basic auth.
        screenshot: where to save a PNG of the same render (its folder is created); None for none.
        window: the viewport, width and height in pixels (the screenshot's size).
        timeout_s: how long the browser may take; it is then killed with its whole process group.

    Returns:
        The serialised DOM (``<html>...</html>``).

    Raises:
        RuntimeError: no Chromium on PATH, or it exited non-zero or wrote no DOM (its stderr is in the message).
        TimeoutError: it ran past ``timeout_s``.
    """
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError(f"no Chromium on PATH; install it with: {CHROMIUM_INSTALL}")
    with tempfile.TemporaryDirectory(prefix="guild-chromium-") as profile:
        args = [binary, *HEADLESS_FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}"]
        if screenshot is not None:
            screenshot = Path(screenshot).resolve()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            args.append(f"--screenshot={screenshot}")
        args += ["--dump-dom", url]
        # Its own session, so that a hung browser is killed with its renderer and GPU helper processes.
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            dom, errors = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_pid(proc, timeout_s=5)
            shown = _without_password(url)
            raise TimeoutError(f"chromium did not finish loading {shown} in {timeout_s:.0f} s") from None
    if proc.returncode != 0 or "<html" not in dom:
        raise RuntimeError(f"chromium exited {proc.returncode} on {_without_password(url)}:\n{errors[-3000:]}")
    return dom


def _without_password(url: str) -> str:
    """``url`` with the password of its userinfo masked, for error messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpath = rest.partition("@")
    if not sep or not at or "/" in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpath}"
