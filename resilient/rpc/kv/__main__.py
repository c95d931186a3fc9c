"""Run one KV node under uvicorn: ``python -m resilient.rpc.kv --port PORT [--data DIR]``.

Prints ``ready http://HOST:PORT`` on stdout once it is listening (``--port 0``
picks a free port; the line gives the real one), logs to stderr, and stops
cleanly on SIGTERM or SIGINT (exit status 0): the server stops accepting,
finishes the requests in flight, and the log is synced and closed. Startup
failures (a corrupt log, a directory in use, a port taken) exit with status 1
and say why on stderr; a bad command line exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from resilient.rpc.kv import LogError, Node, app, bind, serve

__all__ = ["main", "parse_args"]

logger = logging.getLogger("resilient.rpc.kv")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked (argparse exits with status 2 on a bad one)."""
    parser = argparse.ArgumentParser(
        prog="python -m resilient.rpc.kv",
        description="Serve a versioned key-value node over JSON-RPC (resilient.rpc).",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--data", default=None, help="directory of the append-only log; memory only without it"
    )
    parser.add_argument("--node-id", default=None, help="the node's name (default: HOST:PORT)")
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="acknowledge writes before fsync (survives a crash of the process, not of the host)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="stderr logging level",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    return args


def _stop_early(sig: int, frame: FrameType | None) -> None:
    # A stop signal before uvicorn takes over (while the log replays): unwind cleanly.
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a node until SIGTERM or SIGINT; the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    previous = {sig: signal.signal(sig, _stop_early) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    try:
        sock = bind(args.host, args.port)
    except OSError as error:
        print(
            f"resilient.rpc.kv: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr
        )
        return 1
    with sock:
        port = sock.getsockname()[1]
        try:
            node = Node(
                data=args.data,
                node_id=args.node_id or f"{args.host}:{port}",
                fsync=not args.no_fsync,
            )
        except (LogError, OSError) as error:
            print(f"resilient.rpc.kv: cannot open --data {args.data}: {error}", file=sys.stderr)
            return 1
        with node:
            if node.log is not None and node.log.replayed:
                logger.info("replayed %d record(s) from %s", node.log.replayed, node.log.path)
            serve(app(node), sock, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
