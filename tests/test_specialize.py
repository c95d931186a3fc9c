"""The drivers are recompiled for their stages, and behave exactly as written."""

from __future__ import annotations

import asyncio
import dis
import itertools
import linecache
import os
import threading
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest

import resilient
from resilient import _specialize
from resilient._specialize import specialize


def make(stage: object, flag: bool, other: object) -> Callable[[int], Any]:
    """A small template in the drivers' style: absent parts None, features flags."""
    counted = [0]

    def run(x: int) -> Any:
        out = []
        if stage is not None:
            out.append(("stage", stage))
        if flag and x > 0:
            out.append("flag and positive")
        if x > 0 and flag:
            out.append("positive and flag")
        if not flag or x < 0:
            out.append("no flag, or negative")
        if other is None:
            out.append("no other")
        picked = "stage" if stage is not None else "none"
        value = stage is None or x
        either = flag or x
        both = flag and x
        counted[0] += 1
        return out, picked, value, either, both, other is not None

    return run


def read(fn: Callable[..., Any]) -> set[str]:
    """The free names ``fn``'s code reads (dead code still lists its names as free)."""
    loads = ("LOAD_DEREF", "LOAD_CLOSURE")
    return {i.argval for i in dis.get_instructions(fn) if i.opname in loads}


def test_a_specialised_template_returns_what_the_template_returns() -> None:
    """Every mix of None, True, False and objects gives the template's own results."""
    for stage, flag, other, x in itertools.product(
        (None, "s"), (True, False), (None, "o"), (-1, 0, 1)
    ):
        template = make(stage, flag, other)
        specialised = specialize(template)
        assert specialised is not template
        assert specialised(x) == template(x), (stage, flag, other, x)


def test_folded_names_are_gone_from_the_closure() -> None:
    """What the constants decided costs nothing: the names are no longer read."""
    assert read(specialize(make(None, False, None))) == {"counted"}
    assert read(specialize(make("s", True, "o"))) == {"stage", "counted"}  # only `is`-tested
    assert read(make(None, False, None)) == {"stage", "flag", "other", "counted"}


def test_the_closure_cells_are_shared_with_the_template() -> None:
    """State the template's closure keeps is the same cells, not a copy."""
    template = make("s", True, None)
    specialised = specialize(template)
    specialised(1)
    specialised(1)
    cells = dict(zip(template.__code__.co_freevars, template.__closure__ or (), strict=True))
    counted = cells["counted"].cell_contents
    assert counted == [2]


def make_rebinding() -> tuple[Callable[[], str], Callable[[], None]]:
    enabled = False

    def run() -> str:
        return "on" if enabled else "off"

    def switch_on() -> None:
        nonlocal enabled
        enabled = True

    return run, switch_on


def test_a_name_another_closure_rebinds_is_never_folded() -> None:
    """``nonlocal`` rebinding elsewhere still reaches the specialised function."""
    run, switch_on = make_rebinding()
    specialised = specialize(run)
    assert specialised() == "off"
    switch_on()
    assert specialised() == "on"


def make_failing(check: object) -> Callable[[], None]:
    def run() -> None:
        if check is not None:
            raise ValueError("checked")
        raise KeyError("unchecked")

    return run


def test_tracebacks_show_the_templates_own_lines() -> None:
    """A debugger or a traceback reading the specialised code sees the file's lines."""
    template, specialised = make_failing(None), specialize(make_failing(None))
    frames = []
    for fn in (template, specialised):
        with pytest.raises(KeyError) as caught:
            fn()
        frames.append(traceback.extract_tb(caught.value.__traceback__)[-1])
    assert frames[0].lineno == frames[1].lineno
    assert frames[1].filename == __file__
    assert frames[1].line == 'raise KeyError("unchecked")'


def test_one_shape_is_compiled_once() -> None:
    """Building more drivers of a known shape shares one code object."""
    first, second = specialize(make("a", True, None)), specialize(make("b", True, None))
    assert first.__code__ is second.__code__
    assert specialize(make("a", False, None)).__code__ is not first.__code__


def test_without_its_source_a_template_runs_as_written() -> None:
    """Code compiled from a string (or a .pyc without .py) is returned unchanged."""
    namespace: dict[str, Any] = {}
    exec(
        "def make(part):\n    def run():\n        return part is None\n    return run\n",
        namespace,
    )
    template = namespace["make"](None)
    assert specialize(template) is template
    assert specialize(template)() is True


def test_a_source_file_changed_since_import_is_not_trusted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the file no longer compiles to the running code, the template runs as written."""
    template = make_failing(None)
    real = linecache.getlines(__file__)
    edited = [
        line.replace('raise KeyError("unchecked")', 'raise KeyError("edited")') for line in real
    ]
    assert edited != real
    monkeypatch.setattr(_specialize, "_templates", {})
    monkeypatch.setattr(_specialize, "_compiled", {})
    monkeypatch.setattr(linecache, "getlines", lambda filename, *rest: edited)
    assert specialize(template) is template


def make_with_comprehension(part: object) -> Callable[[], list[object]]:
    def run() -> list[object]:
        return [part for part in (1, 2) if part is not None]

    return run


def test_a_template_with_inner_scopes_is_left_alone() -> None:
    """A name bound in an inner scope might shadow a free name: nothing is folded."""
    template = make_with_comprehension(None)
    assert specialize(template) is template
    assert template() == [1, 2]


def test_a_function_without_a_closure_is_returned_as_it_is() -> None:
    def plain() -> int:
        return 1

    assert specialize(plain)() == 1


def test_policy_drivers_are_specialised() -> None:
    """The built drivers run the recompiled code: absent stages are not even read.

    Fails if the drivers' source stops matching their code (a compiler change, say),
    which would silently make every call slower.
    """

    def work() -> int:
        return 1

    async def awork() -> int:
        return 2

    policy = resilient.Policy(retry=resilient.Retry(attempts=2))
    for wrapped in (policy(work), policy(awork)):
        reads = read(wrapped)
        assert "take" not in reads
        assert "bounded" not in reads
        assert "slices" in reads
    assert policy(work)() == 1
    assert asyncio.run(policy(awork)()) == 2


# Second reading: what folding must not change ------------------------------------------

shadowed = "the module's"  # what a local read would find if it stopped being a local


def make_dead_binding(flag: bool) -> Callable[[], str]:
    def run() -> str:
        if flag:
            shadowed = "bound"
        try:
            return shadowed
        except UnboundLocalError:
            return "unbound"

    return run


def test_a_local_bound_only_in_a_dead_branch_stays_local() -> None:
    """Dropping the branch must not turn the name's other reads into global lookups."""
    for flag in (False, True):
        template = make_dead_binding(flag)
        specialised = specialize(template)
        assert specialised() == template() == ("bound" if flag else "unbound")
    assert specialize(make_dead_binding(False)) is not make_dead_binding(False)


def make_dead_yield(flag: bool) -> Callable[[], Any]:
    def run() -> Any:
        if flag:
            yield "item"
        return

    return run


def test_a_generator_whose_only_yield_is_dead_stays_a_generator() -> None:
    template, specialised = make_dead_yield(False), specialize(make_dead_yield(False))
    assert list(template()) == list(specialised()) == []
    assert list(specialize(make_dead_yield(True))()) == ["item"]


written = 0


def make_dead_global(flag: bool) -> Callable[[], int]:
    def run() -> int:
        if flag:
            global written
        written = 1
        return written

    return run


def test_a_global_declared_in_a_dead_branch_still_binds_the_global() -> None:
    global written
    written = 0
    assert specialize(make_dead_global(False))() == 1
    assert written == 1


def make_late(value: object, *, before_binding: bool) -> Callable[[], str]:
    def run() -> str:
        return "none" if part is None else "some"

    if before_binding:
        specialised = specialize(run)  # `part` is not bound yet: nothing is known of it
        part = value
        return specialised
    part = value
    return specialize(run)


def test_a_cell_bound_after_specialising_is_not_taken_for_a_known_object() -> None:
    """An empty cell's shape is its own: not that of a cell known to hold an object."""
    assert make_late("x", before_binding=False)() == "some"  # caches `part is None` -> False
    assert make_late(None, before_binding=True)() == "none"


def make_described(flag: bool) -> Callable[..., str]:
    def run(first: int = 1, *, second: str = "s") -> str:
        return f"{first}{second}" if flag else "off"

    run.described = "yes"  # type: ignore[attr-defined]
    return run


def test_the_specialised_function_keeps_annotations_defaults_and_attributes() -> None:
    template = make_described(True)
    specialised = specialize(template)
    assert specialised is not template
    assert specialised() == "1s"
    assert specialised.__annotations__ == template.__annotations__
    assert specialised.__annotations__ is not template.__annotations__
    assert specialised.__dict__ == {"described": "yes"}
    assert (specialised.__defaults__, specialised.__kwdefaults__) == ((1,), {"second": "s"})


@pytest.mark.parametrize(
    "edit",
    [
        lambda line: line.replace('raise KeyError("unchecked")', 'raise KeyError("\0")'),
        lambda line: line.replace('raise KeyError("unchecked")', "raise KeyError(1 is 1)"),
    ],
    ids=["null-byte", "warning-as-error"],
)
def test_a_source_file_that_no_longer_compiles_cleanly_is_not_trusted(
    monkeypatch: pytest.MonkeyPatch, edit: Callable[[str], str]
) -> None:
    """Whatever the compiler makes of a changed file, building a driver does not fail."""
    template = make_failing(None)
    edited = [edit(line) for line in linecache.getlines(__file__)]
    monkeypatch.setattr(_specialize, "_templates", {})
    monkeypatch.setattr(_specialize, "_compiled", {})
    monkeypatch.setattr(linecache, "getlines", lambda filename, *rest: edited)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert specialize(template) is template


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_compiles_can_specialise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No lock held across a compile: a forked child would find it held by nobody."""
    from tests.test_fork import run_in_fork

    monkeypatch.setattr(_specialize, "_templates", {})
    monkeypatch.setattr(_specialize, "_compiled", {})
    real = _specialize._compile
    slow = make("s", True, None).__code__
    compiling, finish = threading.Event(), threading.Event()

    def blocking(code: Any, values: Any) -> Any:
        if code is slow:
            compiling.set()
            finish.wait(30)
        return real(code, values)

    monkeypatch.setattr(_specialize, "_compile", blocking)
    thread = threading.Thread(target=specialize, args=(make("s", True, None),), daemon=True)
    thread.start()
    try:
        assert compiling.wait(5)
        run_in_fork(lambda: specialize(make_failing(None)))
    finally:
        finish.set()
        thread.join(5)


def make_dead_nonlocal(flag: bool) -> tuple[Callable[[], None], Callable[[], int]]:
    count = 0

    def run() -> None:
        if flag:
            nonlocal count
        count = 1

    return run, lambda: count


def test_a_nonlocal_declared_in_a_dead_branch_still_binds_the_cell() -> None:
    run, count = make_dead_nonlocal(False)
    specialize(run)()
    assert count() == 1
