"""Write the sync twins of the async healthy paths, so each is maintained once.

The drivers' healthy paths are inlined for speed, so the sync and the async
versions cannot call one shared function: they are written once, async, and
this script writes the sync twin beside each (httpcore's ``scripts/unasync.py``
is the model). A source region and its twin look like this::

    # unasync: begin
    async def run_async(...):
        ...
    # unasync: end
    # unasync: generated from the async code above by scripts/unasync.py; do not edit
    def run(...):
        ...
    # unasync: end generated

A named region (``# unasync: begin NAME``) writes its twin where the line
``# unasync: twin NAME`` stands instead (in another class, say), between that
line and the next ``# unasync: end generated`` (write both; the script fills
what is between them).

Inside a source region, ``async``/``await`` are dropped, the names in
``RENAMES`` are replaced whole-word, and two directives cover what is not a
mechanical rewrite::

    # unasync: async-only {      lines kept only in the async code
    # unasync: sync-only {       lines written commented out ("# code"), kept only
                                 in the sync code, uncommented
    # unasync: }                 ends either

``python scripts/unasync.py`` rewrites the twins (then ``ruff format`` as the
tree is formatted); ``--check`` (run by ``make test``) exits 1 naming each file
whose twins are stale.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The files holding source regions.
FILES = ("resilient/_driver.py", "resilient/transport/__init__.py", "resilient/rpc/client.py")

#: Async names and their sync twins, replaced as whole words.
RENAMES = {
    "run_async": "run",
    "resume_async": "resume",
    "_wait_for_slot_async": "_wait_for_slot",
    "_run_async": "_run_sync",
    "acquire_async": "acquire",
    "async_sleep": "sleep",
    "handle_async_request": "handle_request",
    "aclose": "close",
    "aread": "read",
    "_release_async": "_release",
    "aiter_raw": "iter_raw",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "AsyncIterator": "Iterator",
    "AsyncByteStream": "SyncByteStream",
    "AsyncBaseTransport": "BaseTransport",
    "AsyncResilientTransport": "ResilientTransport",
    "AsyncClient": "Client",
    "AsyncBatch": "Batch",
}

BEGIN = "# unasync: begin"
END = "# unasync: end"
GENERATED = "# unasync: generated from the async code above by scripts/unasync.py; do not edit"
END_GENERATED = "# unasync: end generated"
TWIN = "# unasync: twin"
ASYNC_ONLY = "# unasync: async-only {"
SYNC_ONLY = "# unasync: sync-only {"
CLOSE = "# unasync: }"

_SUBSTITUTIONS = [
    (re.compile(r"\basync def\b"), "def"),
    (re.compile(r"\basync with\b"), "with"),
    (re.compile(r"\basync for\b"), "for"),
    (re.compile(r"\bawait "), ""),
    *((re.compile(rf"\b{re.escape(old)}\b"), new) for old, new in RENAMES.items()),
]


class UnasyncError(ValueError):
    """A source region the script cannot read: says where and why."""


def unasync_lines(lines: list[str], where: str) -> list[str]:
    """The sync twin of one source region's lines (each ending in a newline)."""
    out: list[str] = []
    mode = None  # None, "async" or "sync"
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped in (ASYNC_ONLY, SYNC_ONLY):
            if mode is not None:
                raise UnasyncError(f"{where}+{number}: directives do not nest")
            mode = "async" if stripped == ASYNC_ONLY else "sync"
            continue
        if stripped == CLOSE:
            if mode is None:
                raise UnasyncError(f"{where}+{number}: '{CLOSE}' closes nothing")
            mode = None
            continue
        if mode == "async":
            continue
        if mode == "sync":
            indent = line[: len(line) - len(line.lstrip())]
            body = line[len(indent) :]
            if not body.startswith("#"):
                raise UnasyncError(f"{where}+{number}: a sync-only line must be commented out")
            line = indent + body[1:].removeprefix(" ")
        for pattern, replacement in _SUBSTITUTIONS:
            line = pattern.sub(replacement, line)
        out.append(line)
    if mode is not None:
        raise UnasyncError(f"{where}: a directive is never closed")
    return out


def unasync_text(text: str, name: str) -> str:
    """``text`` with every generated twin rewritten from its source region."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    named: dict[str, list[str]] = {}  # a named region's twin, for its twin line
    index = 0
    while index < len(lines):
        line = lines[index]
        out.append(line)
        index += 1
        if line.strip() != BEGIN and not line.strip().startswith(BEGIN + " "):
            continue
        label = line.strip()[len(BEGIN) :].strip()
        start = index
        while index < len(lines) and lines[index].strip() != END:
            index += 1
        if index == len(lines):
            raise UnasyncError(f"{name}:{start}: '{BEGIN}' has no '{END}'")
        region = lines[start:index]
        indent = line[: len(line) - len(line.lstrip())]
        out.extend(region)
        out.append(lines[index])  # END
        index += 1
        twin = unasync_lines(region, f"{name}:{start}")
        if label:
            if label in named:
                raise UnasyncError(f"{name}:{start}: two regions are named {label!r}")
            named[label] = twin
            continue
        # Replace the old twin, if there is one, with the new.
        index = _skip_twin(lines, index, GENERATED, name, start)
        out.append(f"{indent}{GENERATED}\n")
        out.extend(twin)
        out.append(f"{indent}{END_GENERATED}\n")
    return _place_named(out, named, name)


def _skip_twin(lines: list[str], index: int, opener: str, name: str, start: int) -> int:
    """Past the twin that starts at ``lines[index]`` with ``opener``, if one does."""
    if index < len(lines) and lines[index].strip() == opener:
        while index < len(lines) and lines[index].strip() != END_GENERATED:
            index += 1
        if index == len(lines):
            raise UnasyncError(f"{name}:{start}: a generated twin has no '{END_GENERATED}'")
        index += 1
    return index


def _place_named(lines: list[str], named: dict[str, list[str]], name: str) -> str:
    """``lines`` with each named twin written after its twin line (the old one dropped)."""
    out: list[str] = []
    index = 0
    placed = set()
    while index < len(lines):
        line = lines[index]
        index += 1
        stripped = line.strip()
        if not stripped.startswith(TWIN + " "):
            out.append(line)
            continue
        label = stripped[len(TWIN) :].strip()
        if label not in named:
            raise UnasyncError(f"{name}:{index}: no region is named {label!r}")
        if label in placed:
            raise UnasyncError(f"{name}:{index}: the twin of {label!r} stands twice")
        placed.add(label)
        indent = line[: len(line) - len(line.lstrip())]
        out.append(line)
        out.extend(named[label])
        out.append(f"{indent}{END_GENERATED}\n")
        # Drop the old twin (empty the first time), up to its end line.
        while index < len(lines) and lines[index].strip() != END_GENERATED:
            if lines[index].strip().startswith((TWIN + " ", BEGIN)):
                break
            index += 1
        if index == len(lines) or lines[index].strip() != END_GENERATED:
            raise UnasyncError(f"{name}: the twin line of {label!r} has no '{END_GENERATED}'")
        index += 1
    missing = set(named) - placed
    if missing:
        raise UnasyncError(f"{name}: no '{TWIN} NAME' line for {sorted(missing)}")
    return "".join(out)


def formatted(text: str, name: str) -> str:
    """``text`` as ``ruff format`` leaves it: a twin may fit on fewer lines than its source."""
    ruff = Path(sys.executable).parent / "ruff"
    command = str(ruff) if ruff.exists() else shutil.which("ruff")
    if command is None:
        raise UnasyncError("ruff is not installed: run this script with the project's .venv")
    done = subprocess.run(
        [command, "format", "--stdin-filename", name, "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise UnasyncError(f"ruff format failed on {name}: {done.stderr.strip()}")
    return done.stdout


def main(argv: list[str]) -> int:
    check = argv == ["--check"]
    if argv and not check:
        print("usage: python scripts/unasync.py [--check]", file=sys.stderr)
        return 2
    stale = []
    for name in FILES:
        path = ROOT / name
        text = path.read_text()
        if BEGIN not in text:
            print(f"{name}: no '{BEGIN}' region", file=sys.stderr)
            return 1
        new = formatted(unasync_text(text, name), name)
        if new != text:
            stale.append(name)
            if not check:
                path.write_text(new)
    if check and stale:
        for name in stale:
            print(f"{name}: its sync twins are stale; run `make unasync`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
