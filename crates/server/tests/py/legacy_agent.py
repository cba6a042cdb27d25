#!/usr/bin/env python3
"""A zmq-ami-broker agent (its util.py wire format) for hintfed-server's legacy bridge test.

Usage: legacy_agent.py PULL_ENDPOINT PUB_ENDPOINT NAME WANT_DEVICE [WANT_STATE]

PUSHes some garbage first (the server must count and drop it), then, every 100 ms, a
DeviceStateChange of SIP/200 (INUSE) plus two states the original agents never replicated
(a Custom: device and an UNKNOWN state), all with origin NAME. SUBscribes with "[*]" and
"[NAME]" like the original agents. Prints "ready" once its sockets exist; when an
AsteriskEvent for WANT_DEVICE from another origin arrived and one of its own messages came
back (the server republishes legacy messages unchanged), prints the former as JSON
{"target", "body", "own_seen"}, sends one oversize message (to be dropped) and exits 0 (1 after 15 s without both). With WANT_STATE,
only an event with that State counts.
"""
import json
import sys
import time
import uuid

import zmq


def event(origin, device, state):
    return json.dumps({
        "msg_type": "AsteriskEvent",
        "uuid": uuid.uuid4().hex,
        "origin": origin,
        "x_data": {"Event": "DeviceStateChange", "Device": device, "State": state},
    }).encode()


def main():
    pull_ep, pub_ep, name, want = sys.argv[1:5]
    want_state = sys.argv[5] if len(sys.argv) > 5 else None
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(pull_ep)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"[*]")
    sub.setsockopt(zmq.SUBSCRIBE, f"[{name}]".encode())
    sub.connect(pub_ep)
    # Garbage: one frame; a body that is not JSON; a target that is not [..].
    push.send(b"garbage")
    push.send_multipart([b"[*]", b"not json"])
    push.send_multipart([b"nope", b"{}"])
    print("ready", flush=True)
    own_seen = 0
    found = None
    deadline = time.time() + 15
    next_push = 0.0
    while time.time() < deadline:
        now = time.time()
        if now >= next_push:
            push.send_multipart([b"[*]", event(name, "SIP/200", "INUSE")])
            push.send_multipart([b"[*]", event(name, "Custom:SIP/201", "INUSE")])
            push.send_multipart([b"[*]", event(name, "SIP/202", "UNKNOWN")])
            next_push = now + 0.1
        if sub.poll(50):
            target, body = sub.recv_multipart()[:2]
            msg = json.loads(body)
            if msg.get("origin") == name:
                own_seen += 1
                continue
            x = msg.get("x_data") or {}
            if (msg.get("msg_type") == "AsteriskEvent" and x.get("Device") == want
                    and want_state in (None, x.get("State"))):
                found = {"target": target.decode(), "body": msg}
        if found is not None and own_seen > 0:
            found["own_seen"] = own_seen
            # Last, an oversize message: the server drops it (and this connection).
            push.setsockopt(zmq.LINGER, 2000)
            push.send_multipart([b"[*]", b"x" * 100000])
            push.close()
            print(json.dumps(found), flush=True)
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
