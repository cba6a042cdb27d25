#!/usr/bin/env python3
"""Headless-Chromium check of the status page (stdlib only; Debian's `chromium` required).

Loads the page served at URL in headless Chromium driven over the DevTools protocol
(--remote-debugging-pipe), waits until the device table is filled from /api/state, records a
marker in `window`, then waits until a live /events update changes the table *without a
reload* (the marker survives), fails on any JavaScript exception, and saves a screenshot.

    status_page_check.py [--url URL | --demo PATH_TO_status_demo] [--screenshot out.png]
                         [--width 412 --height 915] [--timeout 20]

With --demo it starts the `status_demo` example (cargo build -p hintfed-daemon --examples)
on a free port and stops it afterwards. Exit status 0 when every check passed.
"""
import argparse
import base64
import select
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, deadline):
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"FAIL: {url} not answering")


class Cdp:
    """Chrome DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-framed)."""

    def __init__(self, chromium, width, height, profile):
        to_child_r, self.to_child_w = os.pipe()
        self.from_child_r, from_child_w = os.pipe()

        def setup():
            # Duplicate out of the way first: the pipes may already be fds 3..6, and
            # dup2(fd, fd) would keep their close-on-exec flag.
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3, inheritable=True)
            os.dup2(b, 4, inheritable=True)

        args = [
            chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
            "--remote-debugging-pipe", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", "about:blank",
        ]
        self.proc = subprocess.Popen(args, preexec_fn=setup, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self.buf = b""
        self.next_id = 0
        self.events = []
        self.session = None

    def send(self, method, params=None, session=True, timeout=15):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.to_child_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise SystemExit(f"FAIL: {method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def _read(self, deadline):
        while b"\0" not in self.buf:
            if time.monotonic() > deadline:
                raise SystemExit("FAIL: DevTools timeout")
            ready, _, _ = select.select([self.from_child_r], [], [], 0.2)
            if not ready:
                continue
            chunk = os.read(self.from_child_r, 1 << 16)
            if not chunk:
                raise SystemExit("FAIL: chromium exited")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def eval(self, expr):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True})
        return r.get("result", {}).get("value")

    def exceptions(self):
        return [e for e in self.events if e.get("method") == "Runtime.exceptionThrown"]

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except (SystemExit, OSError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def poll(cdp, expr, deadline, what):
    while time.monotonic() < deadline:
        v = cdp.eval(expr)
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"FAIL: {what}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--demo")
    ap.add_argument("--screenshot", default="status-page.png")
    ap.add_argument("--width", type=int, default=412)
    ap.add_argument("--height", type=int, default=915)
    ap.add_argument("--timeout", type=float, default=20)
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    a = ap.parse_args()
    # Clean up (finally blocks) when stopped by timeout(1) or a CI runner.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("FAIL: terminated"))
    if not a.chromium:
        raise SystemExit("SKIP: no chromium on PATH (Debian: apt-get install chromium)")
    deadline = time.monotonic() + a.timeout
    demo = None
    url = a.url
    if a.demo:
        port = free_port()
        demo = subprocess.Popen([a.demo, f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/"
    if not url:
        raise SystemExit("give --url or --demo")
    profile = tempfile.mkdtemp(prefix="hintfed-chromium-")
    cdp = None
    try:
        wait_http(url.rstrip("/") + "/healthz", deadline)
        cdp = Cdp(a.chromium, a.width, a.height, profile)
        target = cdp.send("Target.createTarget", {"url": "about:blank"}, session=False)
        att = cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, session=False)
        cdp.session = att["sessionId"]
        cdp.send("Runtime.enable")
        cdp.send("Page.enable")
        cdp.send("Emulation.setDeviceMetricsOverride", {
            "width": a.width, "height": a.height, "deviceScaleFactor": 1, "mobile": a.width < 700})
        cdp.send("Page.navigate", {"url": url})
        rows = poll(cdp, "document.querySelectorAll('#devices tbody tr[data-key]').length",
                    deadline, "device table never filled from /api/state")
        print(f"ok: {rows} device rows loaded")
        poll(cdp, "document.getElementById('live').textContent === 'live'", deadline,
             "event stream never connected")
        cdp.eval("window.__hintfedMarker = 42")
        before = cdp.eval("document.querySelector('#devices tbody').innerText")
        poll(cdp, "document.querySelector('#devices tbody').innerText !== " + json.dumps(before),
             deadline, "no live update reached the table")
        if cdp.eval("window.__hintfedMarker") != 42:
            raise SystemExit("FAIL: the page reloaded instead of updating live")
        print("ok: live update applied without reload")
        cols = cdp.eval("Array.from(document.querySelectorAll('#devices thead th')).map(t => t.textContent)")
        print(f"ok: columns {cols}")
        lamps = cdp.eval("getComputedStyle(document.querySelector('#devices .lamp.NOT_INUSE, #devices .lamp.INUSE')).backgroundColor")
        print(f"ok: lamp colour {lamps}")
        shot = cdp.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        with open(a.screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print(f"ok: screenshot {a.screenshot}")
        errs = cdp.exceptions()
        if errs:
            raise SystemExit(f"FAIL: JavaScript exceptions: {json.dumps(errs)[:2000]}")
        print("PASS")
    finally:
        if cdp:
            cdp.close()
        if demo:
            demo.terminate()
            demo.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
