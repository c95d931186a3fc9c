"""Child-process servers for the benchmarks: a free port, waiting for it, stopping them."""

from __future__ import annotations

import socket
import subprocess
import time

__all__ = ["free_port", "listening", "stop"]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def listening(server: subprocess.Popen[bytes], port: int, until: float) -> bool:
    """Poll the port until it accepts, up to ``until`` (monotonic); False if the server died."""
    while time.monotonic() < until:
        if server.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop(server: subprocess.Popen[bytes]) -> None:
    """Terminate the server, then kill it if it has not gone within 5 s."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
