"""A base for small value classes created at import (pure code).

``@dataclass`` generates each class's methods from source text when the module is
imported, about 0.3 ms per class: dozens of them are a good part of a short
command-line run's start-up. A :class:`Record` subclass names its fields in
``__slots__`` and writes its ``__init__`` (compiled with the module, so free at
import); equality and ``repr`` come from here, with a dataclass's semantics.
"""

from __future__ import annotations

__all__ = ["Record"]


class Record:
    """Equality (same class, equal fields) and ``repr`` over the fields in ``__slots__``;
    unhashable, as a dataclass with ``eq=True``."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        names: tuple[str, ...] = self.__slots__
        return all(getattr(self, name) == getattr(other, name) for name in names)

    # (defining __eq__ makes instances unhashable, as Python does for any class)

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__qualname__}({fields})"


class FrozenRecord(Record):
    """A :class:`Record` whose fields cannot change once set (as a frozen dataclass):
    ``__init__`` sets them with ``object.__setattr__``; hashable by its fields."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a {type(self).__qualname__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a {type(self).__qualname__}")

    def __hash__(self) -> int:
        names: tuple[str, ...] = self.__slots__
        return hash(tuple(getattr(self, name) for name in names))
