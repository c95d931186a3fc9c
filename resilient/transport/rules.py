"""What the httpx transport retries, after RFC 9110: methods, statuses, failures, ``Retry-After``.

* :data:`IDEMPOTENT_METHODS`: sending them twice does no harm; :func:`is_idempotent`
  also takes a POST or PATCH with an ``Idempotency-Key`` or marked idempotent.
* :data:`NOT_SENT` failures happened before the request went out (retried for any
  method); :data:`MAYBE_SENT` ones after it may have reached the server (retried
  only when idempotent); :data:`CALLER_FAULTS` say nothing about the server.
* :data:`RETRY_STATUSES` say "try again later"; a :class:`ResponseFailure` carries
  such a response through the retries, with its :func:`parse_retry_after` wait.
"""

from __future__ import annotations

import datetime
import email.utils
import time
from typing import Final

import httpx

from resilient.errors import DeadlineExceeded

__all__ = [
    "CALLER_FAULTS",
    "IDEMPOTENT_METHODS",
    "MAYBE_SENT",
    "NOT_SENT",
    "RETRY_AFTER_STATUSES",
    "RETRY_STATUSES",
    "ResponseFailure",
    "is_idempotent",
    "parse_retry_after",
]


#: Methods RFC 9110 defines as idempotent: sending them twice does no harm.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: Statuses that say "try again later" for an idempotent request.
RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
RETRY_AFTER_STATUSES: Final = frozenset({429, 503})

#: Failures that happen before a byte of the request went out: safe for any method.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: Failures after the request may have reached the server: only for idempotent requests.
MAYBE_SENT = (
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    DeadlineExceeded,  # an async attempt cancelled at attempt_timeout
)
#: The caller's mistakes, which say nothing about the server's health.
CALLER_FAULTS = (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.InvalidURL)


class ResponseFailure(Exception):
    """A response the breaker counts as a failure (5xx but 501, 429, ``retry_statuses``).

    The transport never lets it out: when retries end, the caller gets the
    response itself, its body unread (as plain httpx returns it). ``on_retry`` hooks
    see it as ``event.exception``, with the response in ``.response`` (status and
    headers; its body is still unread, and is drained or closed before the retry is
    sent) and its request in ``.request``. ``.asked_wait`` is the seconds its
    ``Retry-After`` asks for (429 and 503), else ``None``.
    """

    def __init__(self, response: httpx.Response, request: httpx.Request) -> None:
        super().__init__(f"{request.method} {request.url} answered {response.status_code}")
        self.response = response
        self.request = request
        # Parsed once: both the retry rule and the wait read it.
        self.asked_wait: float | None = None
        if response.status_code in RETRY_AFTER_STATUSES:
            value = response.headers.get("retry-after")
            if value is not None:
                self.asked_wait = parse_retry_after(value)


def parse_retry_after(value: str, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` value asks for, or ``None`` if it is not a valid one.

    Accepts delay-seconds (ASCII digits only: no sign, no fraction) and an HTTP
    date; a date in the past means now (``0.0``). Anything else, and values too
    large to be meant, give ``None``.
    """
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value) if len(value) <= 9 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is read so too
        when = when.replace(tzinfo=datetime.UTC)
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)


def is_idempotent(request: httpx.Request, retry_non_idempotent: bool) -> bool:
    method = request.method
    if method in IDEMPOTENT_METHODS or retry_non_idempotent:
        return True
    if "idempotency-key" in request.headers:
        return True
    options = request.extensions.get("resilient")
    return bool(options and options.get("idempotent"))
