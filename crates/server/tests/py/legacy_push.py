#!/usr/bin/env python3
"""PUSH one zmq-ami-broker AsteriskEvent DeviceStateChange and exit (a legacy agent that
then falls silent).

Usage: legacy_push.py PULL_ENDPOINT NAME DEVICE STATE
"""
import json
import sys
import uuid

import zmq


def main():
    pull_ep, name, device, state = sys.argv[1:5]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(pull_ep)
    body = {"msg_type": "AsteriskEvent", "uuid": uuid.uuid4().hex, "origin": name,
            "x_data": {"Event": "DeviceStateChange", "Device": device, "State": state}}
    push.send_multipart([b"[*]", json.dumps(body).encode()])
    push.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
