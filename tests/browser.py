"""Headless Chromium for page tests: Debian's /usr/bin/chromium driven by Playwright's async API,
inside pytest-tornado's event loop (the sync API would fight Tornado for the loop).

A missing browser is a failure, not a skip: CI installs `chromium` with apt.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from playwright.async_api import Browser, async_playwright

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google on this closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
README = Path(__file__).resolve().parent.parent / "README.md"
README_PROXY = "http://localhost:8889"  # the proxy's address in the README's snippets


def readme_snippet(marker: str) -> str:
    """The README's one fenced code block that contains `marker`."""
    blocks = re.findall(r"```(?:js|typescript|tsx)\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"README.md has {len(found)} code blocks with {marker!r}"
    return found[0]


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install -y chromium) "
        "or set CHROMIUM_PATH")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


def artifact(name: str) -> str:
    """Path for a screenshot or trace kept after the run (test-artifacts/, git-ignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return str(ARTIFACTS / name)


@contextmanager
def page_server(port: int, html: str) -> Iterator[str]:
    """Serve `html` at http://localhost:PORT/ (an embedding page on its own origin); fails, does
    not skip, when the port is taken."""
    import socket

    import pytest
    import tornado.web

    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
    except OSError as exc:
        pytest.fail(f"port {port} is taken ({exc}): the page on another origin needs it")
    finally:
        probe.close()

    class Page(tornado.web.RequestHandler):
        def get(self) -> None:
            self.finish(html)

    server = tornado.web.Application([(r"/", Page)]).listen(port, address="127.0.0.1")
    try:
        yield f"http://localhost:{port}"
    finally:
        server.stop()
