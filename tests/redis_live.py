"""Real redis-server processes for the tests, on 127.0.0.1 and ephemeral ports, always stopped.

::

    with RedisServer() as server:      # a fresh, empty redis-server
        client = server.client()
        server.kill()                  # mid-test: the degradation tests
        server.start()                 # the same port again, empty (nothing is saved)

or the pytest fixture ``redis_server`` (stopped after the test; import
``redis_server_fixture`` into the test module to have it). Each server runs
``redis-server --port P --save '' --appendonly no`` in a temporary directory, so
nothing touches the system's Redis or its files. ``make unit`` installs
``redis-server`` when it is missing; without it these tests fail with a message
saying so, rather than pass by skipping.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def _free_port(bus: bool = False) -> int:
    """A free ephemeral port; with ``bus``, one whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if not bus:
            return port
        if port + 10000 <= 65535:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class RedisServer:
    """One redis-server child process on 127.0.0.1; ``start``/``kill`` may be repeated."""

    def __init__(self, *options: str) -> None:
        self.options = options
        self.port = _free_port(bus="--cluster-enabled" in options)
        self._dir = tempfile.mkdtemp(prefix="resilient-redis-")
        self._process: subprocess.Popen[bytes] | None = None
        self._clients: list[Any] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not on PATH; `make unit` installs it (apt-get)")
        self._process = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--protected-mode",
                "no",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        probe = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    pytest.fail(f"redis-server on port {self.port} exited at start")
                try:
                    probe.ping()
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.kill()
                        pytest.fail(f"redis-server on port {self.port} did not start in 10 s")
                    time.sleep(0.02)
        finally:
            probe.close()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL): clients see refused connections from now on."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait(timeout=10)

    def client(self, **options: Any) -> redis.Redis:
        """A sync client as the stores want one: short timeouts, no retries of its own.

        redis-py retries a failed command three times with backoff by default, seconds
        in all; the stores fall back at once instead. Closed when the server is stopped.
        """
        client = redis.Redis(
            port=self.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
            **options,
        )
        self._clients.append(client)
        return client

    def stop(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisClusterNodes:
    """Three redis-server cluster nodes on 127.0.0.1, the slots split between them."""

    def __init__(self) -> None:
        self.nodes = [
            RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
            for _ in range(3)
        ]

    def __enter__(self) -> RedisClusterNodes:
        try:
            for node in self.nodes:
                node.start()
            clients = [node.client() for node in self.nodes]
            thirds = [(0, 5460), (5461, 10922), (10923, 16383)]
            for client, (first, last) in zip(clients, thirds, strict=True):
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            deadline = time.monotonic() + 30.0
            while not all(c.cluster("INFO")["cluster_state"] == "ok" for c in clients):
                if time.monotonic() > deadline:
                    pytest.fail("the three cluster nodes did not agree in 30 s")
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def client(self) -> redis.RedisCluster:
        from redis.cluster import ClusterNode

        client = redis.RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", node.port) for node in self.nodes],
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
        self.nodes[0]._clients.append(client)
        return client

    def __exit__(self, *exc_info: object) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(name="redis_server")
def redis_server_fixture() -> Iterator[RedisServer]:
    """A fresh redis-server for one test, stopped after it."""
    with RedisServer() as server:
        yield server
