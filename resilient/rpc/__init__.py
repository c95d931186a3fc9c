"""JSON-RPC 2.0 over HTTP that carries one deadline across the wire.

:class:`Server` is an ASGI app (served by uvicorn) that runs each handler inside
its caller's deadline; :class:`Client` and :class:`AsyncClient` call it through
the resilient httpx transport. :class:`ClusterClient` and :class:`AsyncClusterClient`
replicate keys over the nodes of :mod:`resilient.rpc.kv` with read and write quorums.
Errors are one class per code on both sides of the wire (:mod:`resilient.rpc.errors`).
Needs the ``rpc`` extra (``pip install resilient[rpc]``: msgspec and uvicorn).
"""

from __future__ import annotations

from resilient.rpc.client import AsyncBatch, AsyncClient, Batch, Client, Method, Pending, Proxy
from resilient.rpc.cluster import (
    AsyncClusterClient,
    ClusterClient,
    ClusterStats,
    ReadResult,
    default_node_breaker,
)
from resilient.rpc.errors import (
    RESERVED,
    SERVER_ERRORS,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    Overloaded,
    ParseError,
    ProtocolError,
    RemoteBulkheadFull,
    RemoteCircuitOpen,
    RemoteDeadlineExceeded,
    RemoteError,
    RemoteRateLimited,
    RPCError,
    ServerError,
    error_for,
)
from resilient.rpc.server import Server

__all__ = [
    "RESERVED",
    "SERVER_ERRORS",
    "AsyncBatch",
    "AsyncClient",
    "AsyncClusterClient",
    "Batch",
    "Client",
    "ClusterClient",
    "ClusterStats",
    "InternalError",
    "InvalidParams",
    "InvalidRequest",
    "Method",
    "MethodNotFound",
    "Overloaded",
    "ParseError",
    "Pending",
    "ProtocolError",
    "Proxy",
    "RPCError",
    "ReadResult",
    "RemoteBulkheadFull",
    "RemoteCircuitOpen",
    "RemoteDeadlineExceeded",
    "RemoteError",
    "RemoteRateLimited",
    "Server",
    "ServerError",
    "default_node_breaker",
    "error_for",
]
