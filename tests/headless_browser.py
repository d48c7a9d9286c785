"""A headless Chromium driven over the DevTools protocol, for tests that open a page as a reader would.

No driver package: Chromium (Debian's `chromium`, or any on PATH / in $NFED_CHROMIUM) listens on a loopback port
that it picks itself and names in DevToolsActivePort, and a minimal WebSocket client (RFC 6455, text frames
only) sends it commands. Console errors, uncaught exceptions and browser log errors (a blocked resource, a
Content-Security-Policy violation) are collected from the moment the page starts loading.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome", "chromium-headless-shell")
START_SECONDS = 60
COMMAND_SECONDS = 60


def find_chromium() -> str | None:
    """$NFED_CHROMIUM, else the first Chromium on PATH."""
    given = os.environ.get("NFED_CHROMIUM")
    if given:
        return given
    return next((path for path in map(shutil.which, BROWSER_NAMES) if path), None)


class WebSocket:
    """Client side of RFC 6455 over a socket: masked text frames out, (fragmented) text frames in."""

    def __init__(self, port: int, path: str, timeout: float):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode("ascii"))
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv_some()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head.decode(errors='replace')}")

    def _recv_some(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the browser closed the DevTools connection")
        return data

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._recv_some()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, text: str) -> None:
        payload = text.encode("utf-8")
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
                                  if n < 1 << 16 else bytes([0x80 | 127]) + struct.pack("!Q", n))
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> str:
        """The next whole text message (pings answered, continuation frames joined)."""
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            opcode = first & 0x0F
            if opcode == 0x9:
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            message += payload
            if first & 0x80:
                return message.decode("utf-8")

    def close(self) -> None:
        self.sock.close()


class HeadlessChromium:
    """One headless Chromium with one page; use as a context manager. `errors` collects the page's console
    errors, uncaught exceptions and browser log errors."""

    def __init__(self, executable: str, profile_dir: Path, width: int = 1280, height: int = 900):
        self.executable, self.profile_dir, self.size = executable, Path(profile_dir), (width, height)
        self.errors: list[str] = []
        self.events: list[dict] = []
        self.ids = itertools.count(1)

    def __enter__(self) -> "HeadlessChromium":
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        (self.profile_dir / "DevToolsActivePort").unlink(missing_ok=True)   # a previous browser's port
        args = [self.executable, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile_dir}",
                f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")   # Chromium refuses to run as root with its sandbox
        self.log = (self.profile_dir / "chromium.log").open("wb")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            port, path = self._devtools_address()
            self.ws = WebSocket(port, path, COMMAND_SECONDS)
            target = next(t for t in self.command("Target.getTargets")["targetInfos"] if t["type"] == "page")
            self.session = self.command("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.command(f"{domain}.enable", session=True)
            self.command("Emulation.setDeviceMetricsOverride", session=True, width=self.size[0], height=self.size[1],
                         deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)   # the browser's own process group (started above)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def _devtools_address(self) -> tuple[int, str]:
        """The port and browser path Chromium writes into DevToolsActivePort once it listens."""
        active = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Chromium exited with {self.process.returncode}: see "
                                   f"{self.profile_dir / 'chromium.log'}")
            lines = active.read_text().split("\n") if active.is_file() else []
            if len(lines) >= 2 and lines[0].strip().isdigit() and lines[1].strip():
                return int(lines[0]), lines[1].strip()
            time.sleep(0.1)
        raise TimeoutError(f"Chromium did not open its DevTools port within {START_SECONDS} s")

    def _note(self, event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console." + params["type"] + ": " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
        self.events.append(event)

    def command(self, method: str, session: bool = False, **params) -> dict:
        """Send one DevTools command and return its result; events that arrive meanwhile are noted."""
        message = {"id": next(self.ids), "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.receive())
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._note(reply)

    def wait_for(self, method: str, since: int = 0, seconds: float = COMMAND_SECONDS) -> dict:
        """The first event named `method` from events[since] on, waiting for it when it has not come yet."""
        deadline = time.monotonic() + seconds
        seen = since
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method:
                    return event
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {seconds} s")
            self._note(json.loads(self.ws.receive()))

    def open(self, url: str) -> None:
        """Load `url` and wait until its load event has fired."""
        since = len(self.events)
        result = self.command("Page.navigate", session=True, url=url)
        if result.get("errorText"):
            raise RuntimeError(f"{url}: {result['errorText']}")
        self.wait_for("Page.loadEventFired", since)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (exceptions raise)."""
        result = self.command("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                              awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """A PNG of the viewport, or of the whole page."""
        params = {"format": "png"}
        if full_page:
            size = self.command("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.command("Page.captureScreenshot", session=True, **params)["data"]
        path.write_bytes(base64.b64decode(data))
        return path
