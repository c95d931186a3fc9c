"""Fixtures shared by the test modules."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from live_server import LiveServer
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from resilient.testing import record_sleeps


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Make the interpreter switch threads every few bytecodes so races actually happen."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@pytest.fixture
def record_waits() -> Iterator[list[float]]:
    """Record the drivers' retry waits instead of sleeping them (resilient.testing)."""
    with record_sleeps() as waits:
        yield waits


@pytest.fixture
def server() -> Iterator[LiveServer]:
    """A live server on 127.0.0.1 (tests/live_server.py), stopped after the test."""
    live = LiveServer()
    live.start()
    try:
        yield live
    finally:
        live.stop()


# OpenTelemetry SDK providers given explicitly (no global provider is set in tests) --


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield provider
    provider.shutdown()
