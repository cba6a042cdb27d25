#!/usr/bin/env python3
"""Drive a hintfed status page in headless Chromium (stdlib only) for tests/tests/status_page.rs.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in,
fd 4 out, NUL-framed JSON), with a fresh profile and no network features.

Steps (each prints one `ok:` line; any failure prints `FAIL: ...` and exits 1):
 1. load URL in a phone-size viewport; wait until the device table has the row --key and
    the live indicator reads `live` (the /events stream is connected);
 2. check the cell of column --column in that row does NOT show --state yet, put a marker in
    `window`, print `READY` and flush: the caller now changes the phone's state on the
    simulated Asterisk;
 3. wait until that cell shows a lamp of class --state; the marker must still be there (the
    page updated live, it did not reload); check the lamp's colour is the BLF colour of
    that state;
 4. with --presence KEY --message TEXT: print `READY-PRESENCE`, wait until the presence row KEY
    shows TEXT (set by the caller), marker intact;
 5. with --lag-origin NAME: the Lag cell of origin NAME in the origins table shows a duration
    ("3 ms", "1.2 s"), not "–" and not "... ago";
 6. save a phone-size screenshot (--screenshot) and a desktop-size one (--screenshot-desktop);
    fail on any JavaScript exception or console error; print `PASS`.

The only DevTools client of the repository: it also drives the daemon crate's made-up demo
(`cargo run -p hintfed-daemon --example status_demo`, then --url with its address and a key it
shows). Exit status 0 when everything passed. Without Chromium it prints `SKIP: ...` and exits 77.
"""
import argparse
import base64
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# Expected lamp colours (crates/daemon/assets/status.css), as computed by Chromium.
COLOURS = {
    "NOT_INUSE": "rgb(46, 125, 50)",
    "INUSE": "rgb(211, 47, 47)",
    "BUSY": "rgb(127, 0, 0)",
    "ONHOLD": "rgb(94, 53, 177)",
    "RINGING": "rgb(255, 179, 0)",
    "UNAVAILABLE": "rgb(158, 158, 158)",
}

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--disable-extensions", "--mute-audio", "--hide-scrollbars",
    "--remote-debugging-pipe",
]


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


class Cdp:
    """Chrome DevTools protocol over --remote-debugging-pipe."""

    def __init__(self, chromium, profile):
        to_child_r, self.to_child_w = os.pipe()
        self.from_child_r, from_child_w = os.pipe()

        def setup():
            # Move the pipe ends to fds 3 and 4 (dup first: they may already sit on 3..6,
            # and dup2(fd, fd) would keep close-on-exec).
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3, inheritable=True)
            os.dup2(b, 4, inheritable=True)
            os.setsid()  # own process group: killed as a group below

        args = [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=setup, close_fds=False,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
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
                    fail(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def _read(self, deadline):
        while b"\0" not in self.buf:
            if time.monotonic() > deadline:
                fail("DevTools timeout")
            ready, _, _ = select.select([self.from_child_r], [], [], 0.2)
            if not ready:
                continue
            chunk = os.read(self.from_child_r, 1 << 16)
            if not chunk:
                fail("chromium exited")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def eval(self, expr):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True})
        if "exceptionDetails" in r:
            fail(f"evaluate {expr!r}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def errors(self):
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(e["params"]["exceptionDetails"])
            elif e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error":
                out.append(e["params"])
        return out

    def viewport(self, width, height, mobile):
        self.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})

    def screenshot(self, path):
        # Full page: a long table is captured whole.
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print(f"ok: screenshot {path}", flush=True)

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except SystemExit:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # helpers (zygote, gpu) too
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait()


def poll(cdp, expr, deadline, what):
    while time.monotonic() < deadline:
        v = cdp.eval(expr)
        if v:
            return v
        time.sleep(0.05)
    fail(what)


def cell_js(key, column):
    """JS expression: the lamp element in row `key`, column headed `column` (or null)."""
    return (
        "(() => {"
        f" const heads = Array.from(document.querySelectorAll('#devices thead th')).map(t => t.textContent);"
        f" const col = heads.indexOf({json.dumps(column)});"
        f" const row = Array.from(document.querySelectorAll('#devices tbody tr')).find(r => r.dataset.key === {json.dumps(key)});"
        " if (col < 0 || !row || !row.cells[col]) return null;"
        " return row.cells[col].querySelector('.lamp'); })()"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True, help="device row, e.g. PJSIP/100")
    ap.add_argument("--column", required=True, help="column header (origin name or Aggregate)")
    ap.add_argument("--state", required=True, help="expected lamp class, e.g. INUSE")
    ap.add_argument("--presence", help="presence row key to wait for after the device")
    ap.add_argument("--message", help="presence message expected in that row")
    ap.add_argument("--lag-origin", help="origin whose Lag cell must show a duration")
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--screenshot-desktop")
    ap.add_argument("--timeout", type=float, default=20)
    ap.add_argument("--chromium", default=os.environ.get("HINTFED_CHROMIUM")
                    or shutil.which("chromium") or shutil.which("chromium-browser"))
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: fail("terminated"))
    if not a.chromium:
        print("SKIP: no chromium on PATH (Debian: apt-get install chromium)", flush=True)
        sys.exit(77)
    deadline = time.monotonic() + a.timeout
    profile = tempfile.mkdtemp(prefix="hintfed-chromium-")
    cdp = None
    try:
        cdp = Cdp(a.chromium, profile)
        target = cdp.send("Target.createTarget", {"url": "about:blank"}, session=False)
        att = cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
                       session=False)
        cdp.session = att["sessionId"]
        cdp.send("Runtime.enable")
        cdp.send("Page.enable")
        cdp.viewport(412, 915, True)
        cdp.send("Page.navigate", {"url": a.url})
        lamp = cell_js(a.key, a.column)
        poll(cdp, f"{lamp} !== null", deadline,
             f"row {a.key} / column {a.column} never appeared (from /api/state)")
        poll(cdp, "document.getElementById('live').textContent === 'live'", deadline,
             "the /events stream never connected")
        rows = cdp.eval("document.querySelectorAll('#devices tbody tr[data-key]').length")
        heads = cdp.eval("Array.from(document.querySelectorAll('#devices thead th')).map(t => t.textContent)")
        print(f"ok: page loaded: {rows} device rows, columns {heads}", flush=True)
        before = cdp.eval(f"{lamp}.className")
        if a.state in before.split():
            fail(f"{a.key} already shows {a.state} before the change ({before})")
        cdp.eval("window.__hintfedMarker = 'no-reload'")
        print(f"ok: {a.key} on {a.column} shows {before!r}", flush=True)
        print("READY", flush=True)

        poll(cdp, f"{lamp} !== null && {lamp}.classList.contains({json.dumps(a.state)})", deadline,
             f"{a.key} never showed {a.state} on column {a.column}")
        if cdp.eval("window.__hintfedMarker") != "no-reload":
            fail("the page reloaded instead of updating live")
        colour = cdp.eval(f"getComputedStyle({lamp}).backgroundColor")
        want = COLOURS.get(a.state)
        if want and colour != want:
            fail(f"{a.state} lamp colour {colour}, want {want}")
        print(f"ok: {a.key} turned {a.state} live (no reload), lamp colour {colour}", flush=True)

        if a.presence:
            print("READY-PRESENCE", flush=True)
            row = ("Array.from(document.querySelectorAll('#presence tbody tr'))"
                   f".find(r => r.dataset.key === {json.dumps(a.presence)})")
            poll(cdp, f"(({row}) || {{innerText: ''}}).innerText.includes({json.dumps(a.message or '')})",
                 deadline, f"presence {a.presence} never showed {a.message!r}")
            if cdp.eval("window.__hintfedMarker") != "no-reload":
                fail("the page reloaded instead of updating live")
            print(f"ok: presence {a.presence} shows {a.message!r} live", flush=True)

        if a.lag_origin:
            lag = ("(() => {"
                   " const heads = Array.from(document.querySelectorAll('#origins thead th')).map(t => t.textContent);"
                   " const col = heads.indexOf('Lag');"
                   " const row = Array.from(document.querySelectorAll('#origins tbody tr'))"
                   f".find(r => r.dataset.key === {json.dumps(a.lag_origin)});"
                   " return col < 0 || !row || !row.cells[col] ? null : row.cells[col].textContent; })()")
            pattern = r"^\d+(\.\d+)? (ms|s|min|h)$"
            poll(cdp, f"new RegExp({json.dumps(pattern)}).test({lag} || '')", deadline,
                 f"the Lag cell of origin {a.lag_origin} never showed a duration "
                 f"(it shows {cdp.eval(lag)!r})")
            print(f"ok: origin {a.lag_origin} lag cell shows {cdp.eval(lag)!r}", flush=True)

        # Let the row flash animation (1.2 s) finish, so the screenshot shows the plain colours.
        cdp.eval("document.getAnimations().forEach(a => { if (a.animationName === 'flash') a.finish(); })")
        cdp.screenshot(a.screenshot)
        overflow = cdp.eval("document.documentElement.scrollWidth > window.innerWidth")
        if overflow:
            fail("the page is wider than a phone screen (horizontal scroll of the whole page)")
        print("ok: no page-wide horizontal scroll at 412 px", flush=True)
        if a.screenshot_desktop:
            cdp.viewport(1280, 800, False)
            cdp.screenshot(a.screenshot_desktop)
        errs = cdp.errors()
        if errs:
            fail(f"JavaScript errors: {json.dumps(errs)[:2000]}")
        print("PASS", flush=True)
    finally:
        if cdp:
            cdp.close()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
