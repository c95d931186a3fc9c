"""One span per HTTP request attempt, per OpenTelemetry's HTTP client semantic conventions.

:class:`HttpSpan` is the transport's attempt span (CLIENT, carrying its
``traceparent``) or its whole-request span (INTERNAL, when no span is current).
OpenTelemetry is imported when a span is made, never by importing this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import httpx

from resilient import tracing as _tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

__all__ = ["KNOWN_METHODS", "SECRET_PARAMS", "HttpSpan", "url_full"]


# The names OpenTelemetry's HTTP conventions know; others are reported as "_OTHER".
KNOWN_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY"}
)
# Query parameters the conventions ask to redact in url.full: signed-URL secrets.
SECRET_PARAMS: Final = ("AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature")


def url_full(url: httpx.URL) -> str:
    """``url.full`` as the conventions ask: credentials and URL signatures redacted."""
    if url.userinfo:
        url = url.copy_with(username="REDACTED", password="REDACTED")
    if url.query:
        params = url.params
        secrets = [name for name in SECRET_PARAMS if name in params]
        if secrets:
            for name in secrets:
                params = params.set(name, "REDACTED")
            url = url.copy_with(params=params)
    return str(url)


class HttpSpan:
    """A span per the OpenTelemetry HTTP client conventions, current until :meth:`end`.

    With ``attempt``, it is that attempt's CLIENT span: its ``traceparent`` goes
    in the request's headers (through the global propagator), and HTTP
    instrumentation is suppressed while it is sent: opentelemetry-instrumentation-httpx,
    had it patched the wrapped transport, would otherwise make a second span per
    attempt. Without, it is an INTERNAL span for the whole request.
    """

    __slots__ = ("span", "token")

    def __init__(self, tracer: Tracer, request: httpx.Request, attempt: int | None) -> None:
        from opentelemetry import context, propagate, trace

        url = request.url
        method = request.method
        port = url.port or (443 if url.scheme == "https" else 80)
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "server.address": url.host,
            "server.port": port,
            "url.full": url_full(url),
        }
        name = method
        if method not in KNOWN_METHODS:
            name = "HTTP"
            attributes["http.request.method"] = "_OTHER"
            attributes["http.request.method_original"] = method
        if attempt is None:
            self.span = span = tracer.start_span(
                name, kind=trace.SpanKind.INTERNAL, attributes=attributes
            )
            self.token = context.attach(trace.set_span_in_context(span))
            return
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        # Given at the start, as the conventions ask: samplers may decide on them.
        self.span = span = tracer.start_span(
            name, kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        ctx = trace.set_span_in_context(span)
        suppress = getattr(context, "_SUPPRESS_HTTP_INSTRUMENTATION_KEY", None)
        if suppress is not None:
            ctx = context.set_value(suppress, True, ctx)
        self.token = context.attach(ctx)
        propagate.inject(request.headers, context=ctx)

    def end(
        self,
        response: httpx.Response | None,
        error: BaseException | None,
        attempts: int | None = None,
    ) -> None:
        """The attempt, or the request after ``attempts``, got ``response`` or raised ``error``."""
        from opentelemetry import context, trace

        span = self.span
        context.detach(self.token)
        # Set in one call: the SDK takes a lock per call.
        attributes: dict[str, str | int] = {}
        if attempts is not None:
            attributes["resilient.attempts"] = attempts
        if response is not None:
            status = response.status_code
            attributes["http.response.status_code"] = status
            version = response.extensions.get("http_version")
            if isinstance(version, bytes) and version.startswith(b"HTTP/"):
                attributes["network.protocol.version"] = version[5:].decode("ascii")
            if status >= 400:
                attributes["error.type"] = str(status)
        else:
            assert error is not None
            attributes["error.type"] = _tracing.error_type(error)
            if isinstance(error, Exception):
                span.record_exception(error)
        span.set_attributes(attributes)
        if "error.type" in attributes:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end()
