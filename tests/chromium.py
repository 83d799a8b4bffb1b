"""Headless Chromium driven over the DevTools protocol, with the standard library only.

Chromium is started with ``--remote-debugging-pipe``: it reads protocol commands from file
descriptor 3 and writes replies and events to descriptor 4, each message one JSON object
followed by a NUL byte. ``os.posix_spawn`` puts the two pipe ends at exactly those numbers in
the child. A page is inspected after its ``load`` event: every image (``complete``, a natural
width > 0, and no pixel left transparent when drawn on a canvas), every request
(``Network.requestWillBeSent``), every failed load (``Network.loadingFailed``, which includes
loads the page's Content-Security-Policy blocked), logged errors and script exceptions.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--remote-debugging-pipe",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]
# Per image: loaded, its natural size, and how many of its pixels are not opaque once drawn on
# a canvas. A PNG cut short still reports its header's size, but the rows it lacks stay
# transparent; the report's figures have an opaque background, so a complete one has none.
IMAGES = """JSON.stringify(Array.from(document.images).map(i => {
  let transparent = -1;
  if (i.complete && i.naturalWidth > 0) {
    const canvas = document.createElement("canvas");
    canvas.width = i.naturalWidth;
    canvas.height = i.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(i, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    transparent = 0;
    for (let k = 3; k < data.length; k += 4) if (data[k] < 255) transparent++;
  }
  return {src: i.src.slice(0, 40), alt: i.alt, complete: i.complete, width: i.naturalWidth,
          height: i.naturalHeight, transparent: transparent};
}))"""


class BrowserError(RuntimeError):
    pass


@dataclass
class PageCheck:
    """What one page load showed."""

    images: list[dict[str, Any]]
    requests: list[str]
    failed: list[str]
    errors: list[str]
    title: str
    screenshot: bytes = field(repr=False, default=b"")

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        return [
            i
            for i in self.images
            if not (i["complete"] and i["width"] > 0 and i["transparent"] == 0)
        ]

    def problems(self) -> list[str]:
        """Everything that went wrong; empty for a page that rendered completely."""
        out = [f"image did not render: {i}" for i in self.broken_images]
        out += [f"failed to load: {f}" for f in self.failed]
        out += [f"network request: {u}" for u in self.requests if u.startswith(("http", "ws"))]
        out += [f"error: {e}" for e in self.errors]
        return out


class Browser:
    """One headless Chromium with a fresh profile; use as a context manager."""

    def __init__(self, profile: Path, log: Path, timeout: float = 60.0) -> None:
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed")
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._buffer = b""
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # above 9, so the spawn's dup2 onto 3 and 4 can never overwrite a source
        child_in = fcntl.fcntl(commands_read, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(replies_write, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(commands_read)
        os.close(replies_write)
        profile.mkdir(parents=True, exist_ok=True)
        argv = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
            (os.POSIX_SPAWN_DUP2, child_in, 3),
            (os.POSIX_SPAWN_DUP2, child_out, 4),
        ]
        try:
            self.pid: int | None = os.posix_spawn(
                CHROMIUM, argv, dict(os.environ), file_actions=actions
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        self.log = log

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(BrowserError, OSError):
            self.send("Browser.close", timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.pid = None
        os.close(self._commands)
        os.close(self._replies)

    # protocol ------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no reply from chromium in time; its log: {self._log_tail()}")
            ready, _, _ = select.select([self._replies], [], [], left)
            if ready:
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium closed the pipe; its log: {self._log_tail()}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        data: dict[str, Any] = json.loads(message)
        return data

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return
            seen = len(self.events)
            event = self._read_message(deadline)
            if "method" in event:
                self.events.append(event)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    # pages ---------------------------------------------------------------------------
    def inspect(self, page: Path, width: int = 1280, height: int = 900) -> PageCheck:
        """Open ``page`` in a new tab, wait for its load event and report what it showed; the
        screenshot covers the whole page."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        start = len(self.events)
        self.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        self.wait_for("Page.loadEventFired", session)
        images = json.loads(
            self.send(
                "Runtime.evaluate", {"expression": IMAGES, "returnByValue": True}, session=session
            )["result"]["value"]
        )
        title = self.send(
            "Runtime.evaluate",
            {"expression": "document.title", "returnByValue": True},
            session=session,
        )["result"]["value"]
        size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": max(size["width"], width),
                    "height": size["height"],
                    "scale": 1,
                },
            },
            session=session,
        )
        events = [e for e in self.events[start:] if e.get("sessionId") == session]
        requests = [
            e["params"]["request"]["url"][:80]  # data: URIs are long
            for e in events
            if e["method"] == "Network.requestWillBeSent"
        ]
        failed = [
            f"{e['params'].get('errorText')} {e['params'].get('blockedReason') or ''}".strip()
            for e in events
            if e["method"] == "Network.loadingFailed"
        ]
        errors = [
            e["params"]["entry"]["text"]
            for e in events
            if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
        ]
        errors += [
            str(e["params"]["exceptionDetails"].get("text"))
            for e in events
            if e["method"] == "Runtime.exceptionThrown"
        ]
        self.send("Target.closeTarget", {"targetId": target})
        return PageCheck(
            images, requests, failed, errors, str(title), base64.b64decode(shot["data"])
        )
