"""httpx's parsed URL, read for the origin key of every request.

``httpx.URL`` keeps its parse as a named tuple, ``_uri_reference``, whose host is
already lower-cased: three attribute reads name a request's origin without a
Python call per part. The public properties are the fallback should a later
httpx drop it; the canary in ``tests/test_compat.py`` fails first.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import httpx

__all__ = ["OriginKey", "origin_key", "uses_parsed_url"]

OriginKey = tuple[str, str, int | None]
"""An origin as (scheme, host, port); port ``None`` when the URL does not give one."""


def _public_origin_key(url: httpx.URL) -> OriginKey:
    return (url.scheme, url.host, url.port)


# Every request looks its origin up. httpx's parsed URL (a named tuple, lower-cased
# host) answers that without a Python call per part; the public properties are the
# fallback should a later httpx drop it.
origin_key: Callable[[httpx.URL], OriginKey] = _public_origin_key
if hasattr(httpx.URL("http://origin.test"), "_uri_reference"):
    origin_key = operator.attrgetter(
        "_uri_reference.scheme", "_uri_reference.host", "_uri_reference.port"
    )


def uses_parsed_url() -> bool:
    """Whether :func:`origin_key` reads httpx's parsed URL (``False``: the public fallback)."""
    return origin_key is not _public_origin_key
