"""``dataclass`` as :func:`dataclasses.dataclass`, its generated methods made on first use.

``dataclasses.dataclass`` writes a class's ``__init__``, ``__repr__``, ``__eq__`` (and
``__hash__``) as Python source and compiles it while the class is defined: ~2 M
instructions per class, which made up most of this package's import time (a
one-instance ``send`` loaded 56 dataclasses, most of which it never instantiates,
prints or compares). Here the class is made by ``dataclasses.dataclass`` itself
(fields, ``__match_args__``, slots, frozen ``__setattr__``, ``__dataclass_params__``
as asked), with stand-ins for those methods; the first call of any of them has
``dataclasses.dataclass`` make them, on a twin class with the same fields and
parameters, and puts them on the class, where later calls find them directly.
Instances, ``fields``, ``replace``, ``asdict``, equality, hashing and ``repr`` are
those of the plain dataclass; before the first call ``inspect.signature`` of the class
shows ``(*args, **kwargs)``.

A class with a method of those names of its own, without a docstring (``dataclass``
would build one from the signature), with ``order=True``, ``init``/``repr``/``eq`` off,
or with ``ClassVar``/``InitVar`` fields takes ``dataclasses.dataclass`` unchanged.
Nothing outside the decorated classes is touched.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from types import CodeType, FunctionType
from typing import TYPE_CHECKING, Any

__all__ = ["dataclass"]

#: The standard decorator and field list, untyped here (mypy checks the decorated
#: classes as dataclasses: see the end of this module).
_std: Any = dataclasses.dataclass
_fields: Any = dataclasses.fields

#: The methods made on first use.
LAZY = ("__init__", "__repr__", "__eq__", "__hash__")


#: What ``dataclasses.dataclass`` is asked for on the twin, per method: only that method
#: (a frozen class's ``__init__`` sets its fields through ``object.__setattr__``; a hash
#: is made from the fields by ``unsafe_hash``, whatever else the class asked for).
_TWIN: dict[str, dict[str, bool]] = {
    "__init__": {"init": True, "repr": False, "eq": False},
    "__repr__": {"init": False, "repr": True, "eq": False},
    "__eq__": {"init": False, "repr": False, "eq": True},
    "__hash__": {"init": False, "repr": False, "eq": False, "unsafe_hash": True},
}


#: ``def __init__(self, a0, .., an): self.a0 = a0 ..`` compiled once per number of fields.
_PLAIN_INIT: dict[int, CodeType] = {}


def _plain_init(cls: type, fields: tuple[Any, ...]) -> Any:
    """The ``__init__`` of a class whose fields are all plain arguments (no factory, no
    keyword-only, not frozen, no ``__post_init__``): the code ``dataclasses.dataclass``
    compiles for it, ``self.<name> = <name>`` for each field in order, taken from a
    template with the names replaced, with its defaults, annotations and names."""
    names = tuple(f.name for f in fields)
    template = _PLAIN_INIT.get(len(names))
    if template is None:
        args = [f"a{i}" for i in range(len(names))]
        body = "".join(f"  self.{a}={a}\n" for a in args) or "  pass\n"
        ns: dict[str, Any] = {}
        exec(f"def __init__(self{''.join(',' + a for a in args)}):\n{body}", {}, ns)
        template = _PLAIN_INIT[len(names)] = ns["__init__"].__code__
    code = template.replace(co_varnames=("self", *names), co_names=names)
    module = sys.modules.get(cls.__module__)
    fn = FunctionType(code, module.__dict__ if module is not None else {}, "__init__")
    fn.__defaults__ = tuple(f.default for f in fields if f.default is not dataclasses.MISSING) or None
    fn.__annotations__ = {**{f.name: f.type for f in fields}, "return": None}
    fn.__qualname__ = f"{cls.__qualname__}.__init__"
    return fn


def _method(cls: type, name: str, frozen: bool, slots: bool) -> Any:
    """The method ``name`` that ``dataclasses.dataclass`` gives ``cls``'s fields, made on
    a twin class (same name, module, fields and ``__post_init__``)."""
    fields = _fields(cls)
    if (
        name == "__init__"
        and not frozen
        and not hasattr(cls, "__post_init__")
        and "self" not in (f.name for f in fields)
        and all(f.init and not f.kw_only and f.default_factory is dataclasses.MISSING for f in fields)
    ):
        return _plain_init(cls, fields)
    ns: dict[str, Any] = {
        "__annotations__": {f.name: f.type for f in fields},
        "__qualname__": cls.__qualname__,
        "__module__": cls.__module__,
        "__doc__": cls.__doc__,
    }
    for f in fields:
        ns[f.name] = dataclasses.field(
            default=f.default,
            default_factory=f.default_factory,
            init=f.init,
            repr=f.repr,
            hash=f.hash,
            compare=f.compare,
            metadata=f.metadata,
            kw_only=f.kw_only,
        )
    if hasattr(cls, "__post_init__"):
        ns["__post_init__"] = cls.__post_init__
    twin: type = type(cls.__name__, (), ns)
    if name == "__init__":
        # with slots, a field left out of __init__ is given its default there
        slots = slots and any(not f.init and f.default is not dataclasses.MISSING for f in fields)
        twin = _std(twin, frozen=frozen, slots=slots, **_TWIN[name])
    else:
        _std(twin, **_TWIN[name])
    return twin.__dict__[name]


def _make_lazy(cls: Any, frozen: bool, hashed: bool, slots: bool) -> None:
    """Stand-ins for :data:`LAZY` on ``cls``: the first call of each makes the method,
    puts it on ``cls`` in its place and calls it."""

    def real(name: str) -> Any:
        fn = cls.__dict__[name]
        if getattr(fn, "stand_in", False):
            fn = _method(cls, name, frozen, slots)
            setattr(cls, name, fn)
        return fn

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        real("__init__")(self, *args, **kwargs)

    def __repr__(self: Any) -> str:
        return str(real("__repr__")(self))

    def __eq__(self: Any, other: object) -> Any:
        return real("__eq__")(self, other)

    def __hash__(self: Any) -> int:
        return int(real("__hash__")(self))

    stand_ins: tuple[Any, ...] = (__init__, __repr__, __eq__, __hash__)
    for fn in stand_ins:
        fn.__qualname__ = f"{cls.__qualname__}.{fn.__name__}"
        fn.stand_in = True
    cls.__init__ = __init__
    cls.__repr__ = __repr__
    cls.__eq__ = __eq__
    # dataclasses' hash rules for eq=True (PEP 557): frozen or unsafe_hash, a hash of
    # the fields; otherwise unhashable.
    cls.__hash__ = __hash__ if hashed else None


def _lazy_ok(cls: type, params: dict[str, Any]) -> bool:
    return (
        cls.__doc__ is not None
        and params["init"]
        and params["repr"]
        and params["eq"]
        and not params["order"]
        and not any(name in cls.__dict__ for name in LAZY)
        # no pseudo-fields (ClassVar, InitVar), however they are spelt, here or in a base
        and not any("Var" in str(t) for t in inspect.get_annotations(cls).values())
        and not any(
            len(base.__dict__["__dataclass_fields__"]) != len(_fields(base))
            for base in cls.__mro__[1:]
            if "__dataclass_fields__" in base.__dict__
        )
    )


def _process(cls: type, params: dict[str, Any]) -> Any:
    if not _lazy_ok(cls, params):
        return _std(cls, **params)
    made = _std(cls, **{**params, "init": False, "repr": False, "eq": False, "unsafe_hash": False})
    # what dataclasses checks while it writes __init__ (PEP 557)
    seen_default = ""
    for f in _fields(made):
        if f.init and not f.kw_only:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                seen_default = f.name
            elif seen_default:
                raise TypeError(f"non-default argument {f.name!r} follows default argument")
    p = made.__dataclass_params__
    p.init, p.repr, p.eq, p.unsafe_hash = True, True, True, params["unsafe_hash"]
    _make_lazy(made, params["frozen"], params["frozen"] or params["unsafe_hash"], params["slots"])
    return made


if TYPE_CHECKING:
    from dataclasses import dataclass as dataclass
else:

    def dataclass(
        cls=None,
        /,
        *,
        init=True,
        repr=True,
        eq=True,
        order=False,
        unsafe_hash=False,
        frozen=False,
        match_args=True,
        kw_only=False,
        slots=False,
        weakref_slot=False,
    ):
        """:func:`dataclasses.dataclass`, its ``__init__``, ``__repr__``, ``__eq__`` and
        ``__hash__`` made on first use (module docstring)."""
        params = {
            "init": init,
            "repr": repr,
            "eq": eq,
            "order": order,
            "unsafe_hash": unsafe_hash,
            "frozen": frozen,
            "match_args": match_args,
            "kw_only": kw_only,
            "slots": slots,
            "weakref_slot": weakref_slot,
        }

        def wrap(cls):
            return _process(cls, params)

        return wrap if cls is None else wrap(cls)
