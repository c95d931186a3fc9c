"""A KV node with server-side faults that can be switched while it runs.

``python demo/node.py --port PORT [--data DIR] [--delay S] [--fail-rate P]`` serves a
:mod:`resilient.rpc.kv` node wrapped in :class:`resilient.chaos.FaultMiddleware`, and
prints ``ready URL`` once listening, as ``python -m resilient.rpc.kv`` does. Faults:

* ``--delay S``: every request waits S seconds before the node sees it (a slow node).
* ``--fail-rate P``: that share of requests is answered 503 without reaching the node.
* ``POST /_faults`` with a JSON object changes them while it runs:
  ``{"delay": 0.3}``, ``{"fail_rate": 0.3}``, ``{}`` (none). The control path itself
  suffers no faults.

SIGTERM or SIGINT stops it cleanly (the log synced and closed); SIGKILL is a crash.
The demo (``demo/cluster.py``) and the cluster tests start it as a real process.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from resilient.chaos import FaultMiddleware
from resilient.rpc.kv import Node, app, bind, serve

CONTROL = "/_faults"


def configure(faults: FaultMiddleware, delay: float, fail_rate: float) -> None:
    """Put ``delay`` and ``fail_rate`` in force on every path (zero: none)."""
    faults.clear()
    settings: dict[str, Any] = {}
    if delay:
        settings.update(latency_rate=1.0, delay=delay)
    if fail_rate:
        settings.update(status_rate=fail_rate, status=503)
    if settings:
        faults.set("/", **settings)


class Controlled:
    """The faulty app, with ``POST /_faults`` outside the faults to change them."""

    def __init__(self, faults: FaultMiddleware) -> None:
        self.faults = faults

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == CONTROL:
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            try:
                settings = json.loads(body or b"{}")
                configure(
                    self.faults,
                    float(settings.get("delay", 0.0)),
                    float(settings.get("fail_rate", 0.0)),
                )
                status, answer = 200, b'{"ok": true}'
            except (ValueError, TypeError, AttributeError) as error:
                status, answer = 400, json.dumps({"error": str(error)}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": answer})
            return
        await self.faults(scope, receive, send)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    sock = bind("127.0.0.1", args.port)
    port = sock.getsockname()[1]
    with sock, Node(data=args.data, node_id=f"127.0.0.1:{port}") as node:
        faults = FaultMiddleware(app(node), random=args.seed)
        configure(faults, args.delay, args.fail_rate)
        # kv.serve, not a plain uvicorn.Server: that one re-raises SIGTERM once it has
        # shut down, so the process would die of it before the log is closed.
        serve(Controlled(faults), sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
