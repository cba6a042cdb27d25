#!/usr/bin/env python3
"""Static check of deploy/ without a container engine.

What it verifies (each failure is one line; exit 1 when any):
  Containerfile  every COPY source exists in the build context (the repo root), the
                 binaries it copies are binary targets of the workspace, the ENTRYPOINT
                 is one of them, EXPOSE covers the hub and HTTP ports, the Rust image is
                 not older than the workspace's rust-version, Cargo.lock exists (--locked).
  compose.yaml   parses (PyYAML); every service's binary (entrypoint, or the image's
                 ENTRYPOINT) is one the Containerfile copies; every bind-mounted file
                 exists next to compose.yaml and is the file its command names; every
                 published container port is the [http] listen port of that service's
                 config; agents reach hubs and the simulator by service name on ports those
                 listen on; every hintfed-sim flag used exists in `hintfed-sim --help`.
  configs        with binaries (--bin-dir, default: $CARGO_TARGET_DIR or target, release
                 then debug), each mounted config passes `<binary> --check-config` under
                 the service's environment (compose's ${VAR:-default} expanded).
What it cannot verify: that the image builds, that containers start, networking, volumes'
permissions under read_only, systemd units (see deploy/systemd/README.md).

Usage: python3 deploy/check.py [--bin-dir DIR] [--static-only]
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
errors = []
notes = []


def fail(msg):
    errors.append(msg)


def workspace_bins():
    out = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    meta = json.loads(out)
    bins = set()
    for p in meta["packages"]:
        for t in p["targets"]:
            if "bin" in t["kind"]:
                bins.add(t["name"])
    rust_version = next((p.get("rust_version") for p in meta["packages"] if p.get("rust_version")), None)
    return bins, rust_version


def version_tuple(v):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def check_containerfile(bins, rust_version):
    path = DEPLOY / "container" / "Containerfile"
    text = path.read_text()
    # Join continuation lines.
    logical = re.sub(r"\\\n", " ", text)
    copied = set()
    entrypoint = None
    exposed = set()
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.search(r"rust:(\d+\.\d+)", rest)
            if m and rust_version and version_tuple(m.group(1)) < version_tuple(rust_version):
                fail(f"Containerfile: rust image {m.group(1)} older than rust-version {rust_version}")
        elif word == "COPY":
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            srcs = [a for a in args if not a.startswith("--")][:-1]
            for s in srcs:
                if not (ROOT / s).exists():
                    fail(f"Containerfile: COPY source {s!r} does not exist in the build context {ROOT}")
        elif word == "RUN":
            m = re.search(r"for b in ([^;]+);", rest)
            if m:
                copied.update(m.group(1).split())
            if "--locked" in rest and not (ROOT / "Cargo.lock").exists():
                fail("Containerfile: cargo build --locked but Cargo.lock is missing")
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)[0]
        elif word == "EXPOSE":
            exposed.update(int(p.split("/")[0]) for p in rest.split())
    if not copied:
        fail("Containerfile: no `for b in ...` list of binaries found")
    for b in sorted(copied - bins):
        fail(f"Containerfile: copies {b}, which is not a binary of the workspace")
    if entrypoint is None or Path(entrypoint).name not in copied:
        fail(f"Containerfile: ENTRYPOINT {entrypoint!r} is not a copied binary")
    for p in (5560, 9480):
        if p not in exposed:
            fail(f"Containerfile: EXPOSE lacks {p}")
    return copied, entrypoint


def expand(value, env):
    def sub(m):
        name, default = m.group(1), m.group(3)
        return env.get(name, default if default is not None else "")
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, str(value))


def ini_value(text, section, key):
    cur = None
    for line in text.splitlines():
        line = line.split(";", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            cur = line[1:-1].strip()
        elif "=" in line and cur == section:
            k, _, v = line.partition("=")
            if k.strip() == key:
                return v.strip()
    return None


def find_bin_dir(arg):
    if arg:
        return Path(arg)
    base = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    for sub in ("release", "debug"):
        if (base / sub / "hintfed-agent").exists():
            return base / sub
    return None


def check_compose(copied, image_entrypoint, bin_dir, static_only):
    cdir = DEPLOY / "compose"
    doc = yaml.safe_load((cdir / "compose.yaml").read_text())
    services = doc.get("services") or {}
    if not services:
        fail("compose.yaml: no services")
    listen_ports = {}  # service -> set of ports it listens on
    checks = []  # (service, binary, config path in repo, env)
    sim_flags = []
    for name, svc in services.items():
        ep = svc.get("entrypoint")
        binary = Path(ep[0] if isinstance(ep, list) else (ep or image_entrypoint)).name
        if binary not in copied:
            fail(f"compose.yaml: service {name}: binary {binary} is not in the image")
        cmd = [str(c) for c in (svc.get("command") or [])]
        env = {k: expand(v, {}) for k, v in (svc.get("environment") or {}).items()}
        mounts = {}
        for v in svc.get("volumes") or []:
            host, _, rest = str(v).partition(":")
            target = rest.split(":")[0]
            hp = (cdir / host).resolve()
            if not hp.exists():
                fail(f"compose.yaml: service {name}: mounted file {host} does not exist in deploy/compose")
            mounts[target] = hp
        named = []
        for i, c in enumerate(cmd):
            if c in ("--config", "-c") and i + 1 < len(cmd):
                named.append(cmd[i + 1])
            elif c.startswith("--extensions="):
                named.append(c.split("=", 1)[1])
        for n in named:
            if n not in mounts:
                fail(f"compose.yaml: service {name}: {n} is not mounted")
        ports = set()
        if binary == "hintfed-sim":
            sim_flags += [c.split("=", 1)[0] for c in cmd if c.startswith("--")]
            ports |= {int(c.rsplit(":", 1)[1]) for c in cmd if c.startswith("--listen=")}
        for n in named:
            if n.endswith(".ini") and n in mounts:
                text = mounts[n].read_text()
                for sect, key in (("http", "listen"), ("server", "listen")):
                    v = ini_value(text, sect, key)
                    if v:
                        ports.add(int(v.rsplit(":", 1)[1]))
                checks.append((name, binary, mounts[n], env, text))
        listen_ports[name] = ports
        for p in svc.get("ports") or []:
            container = int(str(p).rsplit(":", 1)[1].split("/")[0])
            if container not in ports:
                fail(f"compose.yaml: service {name}: publishes container port {container}, which it does not listen on ({sorted(ports)})")
    # Cross-service references in agent configs.
    for name, binary, path, env, text in checks:
        if binary != "hintfed-agent":
            continue
        for ep in (ini_value(text, "federation", "servers") or "").split(","):
            m = re.match(r"\s*tcp://([\w.-]+):(\d+)", ep)
            if not m:
                continue
            host, port = m.group(1), int(m.group(2))
            if host not in services:
                fail(f"compose.yaml: {name}: hub {host} is not a service")
            elif port not in listen_ports.get(host, set()):
                fail(f"compose.yaml: {name}: hub {host} does not listen on {port}")
        host = env.get("HINTFED_ASTERISK_HOST") or ini_value(text, "asterisk", "host")
        port = int(env.get("HINTFED_ASTERISK_PORT") or ini_value(text, "asterisk", "port") or 5038)
        if host not in services:
            fail(f"compose.yaml: {name}: Asterisk host {host} is not a service")
        elif port not in listen_ports.get(host, set()):
            fail(f"compose.yaml: {name}: {host} does not listen on {port}")
        depends = services[name].get("depends_on") or []
        if host not in depends:
            fail(f"compose.yaml: {name}: does not depend_on {host}")
    if static_only:
        notes.append("configs: --check-config not run (--static-only)")
        return
    if bin_dir is None:
        fail("no built binaries found (build them, pass --bin-dir, or use --static-only)")
        return
    if sim_flags:
        help_text = subprocess.run([str(bin_dir / "hintfed-sim"), "--help"], capture_output=True, text=True).stdout
        for f in sorted(set(sim_flags)):
            if f not in help_text:
                fail(f"compose.yaml: hintfed-sim has no flag {f}")
    for name, binary, path, env, _ in checks:
        full_env = dict(os.environ)
        full_env = {k: v for k, v in full_env.items() if not k.startswith("HINTFED_")}
        full_env.update(env)
        r = subprocess.run([str(bin_dir / binary), "--config", str(path), "--check-config"],
                           capture_output=True, text=True, env=full_env)
        if r.returncode != 0:
            fail(f"compose.yaml: service {name}: {binary} --check-config {path.name} exited {r.returncode}: {r.stderr.strip()}")
        else:
            notes.append(f"{name}: {binary} --check-config {path.name}: OK")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin-dir")
    ap.add_argument("--static-only", action="store_true")
    a = ap.parse_args()
    bins, rust_version = workspace_bins()
    copied, entrypoint = check_containerfile(bins, rust_version)
    check_compose(copied, entrypoint, None if a.static_only else find_bin_dir(a.bin_dir), a.static_only)
    for n in notes:
        print(n)
    for e in errors:
        print("FAIL", e)
    print("deploy check:", "FAILED" if errors else "OK")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
