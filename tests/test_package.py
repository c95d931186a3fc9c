"""The package's public surface."""

from __future__ import annotations

import importlib
import pkgutil
import types
from typing import ParamSpec, TypeVar

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


def test_root_all_is_exactly_the_public_names() -> None:
    """Every public name of the root is in __all__, and nothing else is (as httpx checks)."""
    public = {
        name
        for name, value in vars(resilient).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(resilient.__all__) == public
    assert resilient.__version__ == importlib.metadata.version("resilient")


def modules() -> list[types.ModuleType]:
    found = []
    for info in pkgutil.walk_packages(resilient.__path__, "resilient."):
        found.append(importlib.import_module(info.name))
    return found


def test_every_module_all_names_every_public_class_and_function() -> None:
    """A class or function defined in a module is in its __all__ unless its name is private."""
    for module in modules():
        names = set(getattr(module, "__all__", ()))
        for name, value in vars(module).items():
            if name.startswith("_") or isinstance(value, TypeVar | ParamSpec):
                continue
            if getattr(value, "__module__", None) == module.__name__ and callable(value):
                assert name in names, f"{module.__name__}.{name} is public but not in __all__"


def test_every_module_all_is_sorted() -> None:
    """Each module keeps its own __all__ sorted and truthful too."""
    for module in modules():
        info = module
        names = getattr(module, "__all__", None)
        assert names is not None, f"{info.__name__} has no __all__"
        assert list(names) == sorted(names, key=isort_order), info.__name__
        for name in names:
            assert hasattr(module, name), f"{info.__name__}.{name}"


def test_package_ships_type_information() -> None:
    """py.typed is present, so type checkers use the inline annotations."""
    assert importlib.resources.files("resilient").joinpath("py.typed").is_file()
