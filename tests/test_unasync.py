"""The generator of the sync twins (scripts/unasync.py), and that the tree's twins are fresh."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync", ROOT / "scripts" / "unasync.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["unasync"] = module
    spec.loader.exec_module(module)
    return module


unasync = _load()

SOURCE = """\
def helper():
    pass


# unasync: begin
async def run_async(slots):
    await slots.acquire_async()
    # unasync: async-only {
    value = await fetch()
    # unasync: }
    # unasync: sync-only {
    # value = fetch_blocking()
    # unasync: }
    async with slots:
        return await _run_async(value)
# unasync: end
"""


def test_a_twin_is_written_after_its_source_with_the_directives_applied() -> None:
    text = unasync.unasync_text(SOURCE, "example.py")
    twin = text.split(unasync.GENERATED + "\n")[1].split(unasync.END_GENERATED)[0]
    assert twin == (
        "def run(slots):\n"
        "    slots.acquire()\n"
        "    value = fetch_blocking()\n"
        "    with slots:\n"
        "        return _run_sync(value)\n"
    )
    # The source region is kept as it was, and rewriting again changes nothing.
    assert text.startswith(SOURCE)
    assert unasync.unasync_text(text, "example.py") == text


def test_a_stale_twin_is_replaced_not_appended() -> None:
    text = unasync.unasync_text(SOURCE, "example.py")
    stale = text.replace("slots.acquire()\n", "slots.acquire()  # edited by hand\n")
    assert unasync.unasync_text(stale, "example.py") == text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("# unasync: async-only {\n# unasync: sync-only {\n", "do not nest"),
        ("# unasync: }\n", "closes nothing"),
        ("# unasync: sync-only {\nvalue = 1\n# unasync: }\n", "must be commented out"),
        ("# unasync: async-only {\nvalue = 1\n", "never closed"),
    ],
)
def test_malformed_directives_are_refused_with_where_and_why(body: str, message: str) -> None:
    with pytest.raises(unasync.UnasyncError, match=message):
        unasync.unasync_text(f"# unasync: begin\n{body}# unasync: end\n", "bad.py")


def test_a_region_without_an_end_is_refused() -> None:
    with pytest.raises(unasync.UnasyncError, match="has no"):
        unasync.unasync_text("# unasync: begin\nasync def f(): pass\n", "bad.py")


def test_the_trees_sync_twins_are_generated_from_their_async_sources() -> None:
    for name in unasync.FILES:
        text = (ROOT / name).read_text()
        assert unasync.BEGIN in text, name
        assert unasync.formatted(unasync.unasync_text(text, name), name) == text, (
            f"{name}: its sync twins are stale; run `make unasync`"
        )


NAMED = """\
class Sync:
    # unasync: twin io
    # unasync: end generated


class Async:
    # unasync: begin io
    async def send_async(self):
        await self._inner.aclose()
    # unasync: end
"""


def test_a_named_regions_twin_is_written_at_its_twin_line() -> None:
    text = unasync.unasync_text(NAMED, "example.py")
    sync_class = text.split("class Async:")[0]
    assert "    def send_async(self):\n        self._inner.close()\n" in sync_class
    # Rewriting replaces the twin in place rather than adding a second one.
    assert unasync.unasync_text(text, "example.py") == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (NAMED.replace("    # unasync: twin io\n", ""), "no '# unasync: twin NAME' line"),
        (NAMED.replace("twin io", "twin other"), "no region is named 'other'"),
        (NAMED.replace("    # unasync: end generated\n", "", 1), "has no '# unasync: end"),
        (NAMED + NAMED.split("\n\n\n")[1], "two regions are named 'io'"),
    ],
)
def test_named_regions_and_twin_lines_must_match(text: str, message: str) -> None:
    with pytest.raises(unasync.UnasyncError, match=message):
        unasync.unasync_text(text, "bad.py")
