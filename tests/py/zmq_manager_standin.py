#!/usr/bin/env python3
"""A stand-in for Asterisk's res_zmq_manager module, built on pyzmq (libzmq).

It fronts one AMI server (hintfed-sim in the tests) exactly the way the real module fronts its
Asterisk, as recorded in shared/fixtures/res_zmq_manager/:

* PUB socket (addr_evt): every AMI event as one frame, a compact JSON object, every value a
  string, "Event" first (subscribers filter with the prefix "{").
* REP socket (addr_cmd): one JSON action object per request; the reply is always a JSON array of
  AMI messages (the response, then list events up to and including ...ListComplete), without
  ActionID; repeated keys collapse (the last wins). A request that is not JSON, or an unknown
  action, is answered [{"Response":"Error"},{"Message":"Internal error."}].
* Getvar crashes the real Asterisk: the stand-in prints "CRASH: Getvar" to stderr and exits
  with status 139 without answering, so a test sees at once that somebody sent it.
* SIGUSR1 toggles "blackhole": requests are read but never answered and no event is published,
  like a module whose Asterisk hangs. Killing the process is a dead Asterisk: both sockets go.

Usage: zmq_manager_standin.py --ami HOST:PORT --username U --secret S --evt ENDPOINT --cmd ENDPOINT
It prints "ready" on stdout once both sockets are bound and the AMI login succeeded.
"""

import argparse
import json
import queue
import signal
import socket
import sys
import threading

import zmq

INTERNAL_ERROR = [{"Response": "Error"}, {"Message": "Internal error."}]
blackhole = threading.Event()


def read_messages(sock):
    """Yields AMI messages (lists of (key, value)) from a socket, the banner skipped."""
    buf = b""
    banner_seen = False
    current = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.rstrip(b"\r").decode("utf-8", "replace")
            if not banner_seen:
                banner_seen = True
                continue
            if line == "":
                if current:
                    yield current
                    current = []
                continue
            key, _, value = line.partition(":")
            current.append((key.strip(), value[1:] if value.startswith(" ") else value))


def to_json_object(headers):
    obj = {}
    for key, value in headers:
        if key.lower() == "actionid":
            continue
        obj[key] = value
    return obj


def encode_action(obj, action_id):
    lines = []
    for key, value in obj.items():
        if key.lower() == "actionid":
            continue
        lines.append(f"{key}: {value}")
    lines.append(f"ActionID: {action_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ami", required=True)
    ap.add_argument("--username", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--evt", required=True)
    ap.add_argument("--cmd", required=True)
    args = ap.parse_args()

    signal.signal(signal.SIGUSR1, lambda *_: blackhole.clear() if blackhole.is_set() else blackhole.set())

    host, port = args.ami.rsplit(":", 1)
    ami = socket.create_connection((host, int(port)))
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(args.evt)
    rep = ctx.socket(zmq.REP)
    rep.bind(args.cmd)

    replies = queue.Queue()
    pending = {"id": None, "items": [], "list": False}
    logged_in = threading.Event()

    def reader():
        for msg in read_messages(ami):
            headers = dict((k.lower(), v) for k, v in msg)
            aid = headers.get("actionid")
            if aid == "login":
                if headers.get("response") == "Success":
                    logged_in.set()
                else:
                    print("login failed", file=sys.stderr, flush=True)
                    sys.exit(1)
                continue
            if aid is not None and aid == pending["id"]:
                pending["items"].append(to_json_object(msg))
                if "response" in headers:
                    pending["list"] = headers.get("eventlist", "").lower() == "start"
                    if headers.get("response") == "Error" and headers.get("message", "").startswith("Invalid/unknown command"):
                        pending["items"] = list(INTERNAL_ERROR)
                        replies.put(pending["items"])
                        continue
                    if not pending["list"]:
                        replies.put(pending["items"])
                elif headers.get("eventlist", "").lower() == "complete":
                    replies.put(pending["items"])
                continue
            if "event" in headers and not blackhole.is_set():
                pub.send_string(json.dumps(to_json_object(msg), separators=(",", ":")))
        print("AMI connection closed", file=sys.stderr, flush=True)
        import os
        os._exit(2)

    ami.sendall(encode_action({"Action": "Login", "Username": args.username, "Secret": args.secret, "Events": "on"}, "login"))
    threading.Thread(target=reader, daemon=True).start()
    if not logged_in.wait(10):
        print("no login answer", file=sys.stderr, flush=True)
        sys.exit(1)
    print("ready", flush=True)

    counter = 0
    while True:
        raw = rep.recv()
        if blackhole.is_set():
            # Never answer: the REQ peer waits forever, as with a hung Asterisk. Keep reading
            # would violate REP's state machine, so stay here until the process is killed.
            blackhole.wait()
            while blackhole.is_set():
                signal.pause()
        try:
            action = json.loads(raw)
            if not isinstance(action, dict) or "Action" not in action:
                raise ValueError("not an action")
        except ValueError:
            rep.send_string(json.dumps(INTERNAL_ERROR, separators=(",", ":")))
            continue
        if str(action.get("Action", "")).lower() == "getvar":
            print("CRASH: Getvar", file=sys.stderr, flush=True)
            import os
            os._exit(139)
        counter += 1
        pending["id"] = f"z{counter}"
        pending["items"] = []
        ami.sendall(encode_action({k: str(v) for k, v in action.items()}, pending["id"]))
        try:
            items = replies.get(timeout=30)
        except queue.Empty:
            items = INTERNAL_ERROR
        rep.send_string(json.dumps(items, separators=(",", ":")))


if __name__ == "__main__":
    main()
