#!/usr/bin/env python3
"""libzmq peers (via pyzmq) for hintfed-transport's interoperability tests.

Usage: peer.py MODE PORT [options]. Every mode prints "ready" once its sockets are bound or
connected, then runs until killed (or, for the client modes, until done: exit status 0 on
success, 1 on timeout).

  rep PORT [--answer N]   REP like res_zmq_manager's command socket: each request is one JSON
                          object, the reply one JSON array. After N replies (default: no limit)
                          it keeps the socket open but stops answering, as the real module does
                          when its Asterisk dies.
  pub PORT                PUB like res_zmq_manager's event socket: one compact JSON object per
                          frame every 20 ms, plus a non-JSON frame that a "{" subscriber must
                          never see.
  router_pub PORT [--xpub] [--zmtp-heartbeat MS]
                          ROUTER on PORT + PUB on PORT+1, a hub stand-in: answers the transport
                          ping, publishes heartbeats, echoes every other message back to its
                          sender as ["echo", *frames] and publishes ["dev.fan", last frame].
                          --xpub: an XPUB instead of the PUB; --zmtp-heartbeat MS: the
                          publisher sends ZMTP PING commands every MS ms and drops a peer
                          silent for 3 * MS ms.
  legacy_agent PULL_PORT PUB_PORT NAME
                          a zmq-ami-broker agent: PUSHes ["[*]", AsteriskEvent JSON] to the
                          server's PULL until its SUB ("[*]" and "[NAME]") receives a message
                          addressed to it; prints that message as JSON and exits 0.
  dealer_sub PORT         DEALER to PORT + SUB (prefix "dev.") to PORT+1, an agent stand-in:
                          sends ["dev.in", "hello"] until it gets a reply and a fan-out message,
                          prints both as JSON and exits 0.
"""
import json
import sys
import time

import zmq

PING = b"\x00hintfed-ping"
PONG = b"\x00hintfed-pong"
HEARTBEAT = b"\x00hintfed-hb"


def ready():
    print("ready", flush=True)


def rep(ctx, port, answer_limit):
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    ready()
    answered = 0
    while True:
        if answer_limit is not None and answered >= answer_limit:
            time.sleep(3600)
        raw = sock.recv()
        try:
            action = json.loads(raw)
            name = action.get("Action")
        except (ValueError, AttributeError):
            name = None
        if name == "Ping":
            reply = [{"Response": "Success", "Ping": "Pong", "Timestamp": "1795414926.102700"}]
        elif name is None:
            reply = [{"Response": "Error"}, {"Message": "Internal error."}]
        else:
            reply = [{"Response": "Success", "Message": "Echo", "Action": name}]
        sock.send(json.dumps(reply, separators=(",", ":")).encode())
        answered += 1


def pub(ctx, port):
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    ready()
    n = 0
    while True:
        n += 1
        event = {"Event": "DeviceStateChange", "Privilege": "call,all", "SystemName": "pbx-z",
                 "Device": "PJSIP/100", "State": "INUSE", "Seq": str(n)}
        sock.send(json.dumps(event, separators=(",", ":")).encode())
        sock.send(b"not json, filtered by the subscription")
        time.sleep(0.02)


def router_pub(ctx, port, xpub=False, heartbeat_ms=None):
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"tcp://127.0.0.1:{port}")
    publisher = ctx.socket(zmq.XPUB if xpub else zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    if heartbeat_ms is not None:
        publisher.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        publisher.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
    publisher.bind(f"tcp://127.0.0.1:{port + 1}")
    ready()
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    if xpub:
        poller.register(publisher, zmq.POLLIN)
    next_hb = 0.0
    while True:
        now = time.monotonic()
        if now >= next_hb:
            publisher.send(HEARTBEAT)
            next_hb = now + 0.2
        events = dict(poller.poll(50))
        if events.get(publisher):
            publisher.recv()  # an XPUB's subscription messages
        if events.get(router):
            identity, *frames = router.recv_multipart()
            if frames == [PING]:
                router.send_multipart([identity, PONG])
                continue
            router.send_multipart([identity, b"echo", *frames])
            publisher.send_multipart([b"dev.fan", frames[-1]])


def dealer_sub(ctx, port):
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"dev.")
    sub.connect(f"tcp://127.0.0.1:{port + 1}")
    ready()
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(sub, zmq.POLLIN)
    reply = fanout = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (reply is None or fanout is None):
        if reply is None:
            dealer.send_multipart([b"dev.in", b"hello"])
        events = dict(poller.poll(100))
        if events.get(dealer):
            reply = [f.decode() for f in dealer.recv_multipart()]
        if events.get(sub):
            fanout = [f.decode() for f in sub.recv_multipart()]
    if reply is None or fanout is None:
        print(json.dumps({"reply": reply, "fanout": fanout}), flush=True)
        sys.exit(1)
    print(json.dumps({"reply": reply, "fanout": fanout}), flush=True)


def legacy_agent(ctx, pull_port, pub_port, name):
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"tcp://127.0.0.1:{pull_port}")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"[*]")
    sub.setsockopt(zmq.SUBSCRIBE, f"[{name}]".encode())
    sub.connect(f"tcp://127.0.0.1:{pub_port}")
    ready()
    event = {"msg_type": "AsteriskEvent", "uuid": "0123abcd", "origin": name,
             "x_data": {"Event": "DeviceStateChange", "Device": "SIP/100", "State": "INUSE"}}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        push.send_multipart([b"[*]", json.dumps(event).encode()])
        if sub.poll(100):
            target, body = sub.recv_multipart()
            print(json.dumps({"target": target.decode(), "body": json.loads(body)}), flush=True)
            return
    sys.exit(1)


def main():
    mode, port = sys.argv[1], int(sys.argv[2])
    ctx = zmq.Context()
    if mode == "rep":
        limit = None
        if "--answer" in sys.argv:
            limit = int(sys.argv[sys.argv.index("--answer") + 1])
        rep(ctx, port, limit)
    elif mode == "pub":
        pub(ctx, port)
    elif mode == "router_pub":
        heartbeat_ms = None
        if "--zmtp-heartbeat" in sys.argv:
            heartbeat_ms = int(sys.argv[sys.argv.index("--zmtp-heartbeat") + 1])
        router_pub(ctx, port, "--xpub" in sys.argv, heartbeat_ms)
    elif mode == "legacy_agent":
        legacy_agent(ctx, port, int(sys.argv[3]), sys.argv[4])
    elif mode == "dealer_sub":
        dealer_sub(ctx, port)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
