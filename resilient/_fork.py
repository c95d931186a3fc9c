"""Fork safety: locks that other threads held when the process forked are remade in the child.

``os.fork()`` copies the whole memory but only the thread that called it. A lock that
another thread held at that instant stays held in the child forever, because its holder
does not exist there, so the child's first use of the object owning it would hang. Every
object of ``resilient`` that holds a lock therefore registers in its constructor, and one
``os.register_at_fork(after_in_child=...)`` hook, run in the child before ``fork()``
returns there, remakes them all:

* :func:`register_lock` for a lock whose object needs nothing else: the hook reinitialises
  the lock in place, as CPython does for its own locks, so every reference to it (a module
  global, a closure) sees the fresh one;
* :func:`register` for an object whose state also refers to other threads (a bulkhead's
  waiters, a map's in-flight creations): the hook calls its ``_after_fork_in_child()``.

Both hold their entries weakly, so registering keeps nothing alive; it costs one weak
reference per object, in constructors only, never on the per-call path.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Protocol, TypeVar

__all__ = ["ForkAware", "register", "register_lock"]

_L = TypeVar("_L")


class ForkAware(Protocol):
    """An object that puts its own state right in a forked child."""

    def _after_fork_in_child(self) -> None:
        """Remake this object's locks and forget what belonged to the parent's other threads."""
        ...


# Locks (threading.Lock, RLock, Condition) to reinitialise in the child.
_locks: weakref.WeakSet[Any] = weakref.WeakSet()
# Objects to call in the child, as weak references keyed by their id: a WeakSet would need
# the objects to be hashable, and a mapping (ShardedMap) is not.
_objects: dict[int, weakref.ref[ForkAware]] = {}


def _forget(ref: weakref.ref[ForkAware]) -> None:
    _objects.pop(id(ref), None)


def register_lock(lock: _L) -> _L:
    """Have ``lock`` reinitialised, unlocked, in a forked child; returns ``lock``."""
    _locks.add(lock)
    return lock


def register(obj: ForkAware) -> None:
    """Have ``obj._after_fork_in_child()`` called in a forked child."""
    ref = weakref.ref(obj, _forget)
    _objects[id(ref)] = ref


def _after_fork_in_child() -> None:
    # Locks first: an object's hook may take its own locks. list() because a hook may
    # create objects that register themselves.
    for lock in list(_locks):
        lock._at_fork_reinit()
    for ref in list(_objects.values()):
        obj = ref()
        if obj is not None:
            obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX system has it
    os.register_at_fork(after_in_child=_after_fork_in_child)
