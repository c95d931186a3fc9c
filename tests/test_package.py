"""The package's public surface."""

from __future__ import annotations

import importlib
import pkgutil

import resilient


def isort_order(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions."""
    if name.isupper():
        return (0, name)
    return (1 if name[0].isupper() else 2, name)


def test_all_is_sorted_and_complete() -> None:
    """__all__ stays sorted, names only what exists, and lists no private name."""
    assert resilient.__all__ == sorted(resilient.__all__, key=isort_order)
    for name in resilient.__all__:
        assert hasattr(resilient, name), name
        assert not name.startswith("_")


def test_every_module_all_is_sorted() -> None:
    """Each public module keeps its own __all__ sorted and truthful too."""
    for info in pkgutil.iter_modules(resilient.__path__):
        module = importlib.import_module(f"resilient.{info.name}")
        names = getattr(module, "__all__", None)
        assert names is not None, f"resilient.{info.name} has no __all__"
        assert list(names) == sorted(names, key=isort_order), info.name
        for name in names:
            assert hasattr(module, name), f"resilient.{info.name}.{name}"


def test_package_ships_type_information() -> None:
    """py.typed is present, so type checkers use the inline annotations."""
    assert importlib.resources.files("resilient").joinpath("py.typed").is_file()
