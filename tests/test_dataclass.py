"""``dimse_async.lazy_dataclass.dataclass``: the classes of :func:`dataclasses.dataclass`,
their ``__init__``/``__repr__``/``__eq__``/``__hash__`` made on first use.

Each test compares with the standard decorator: parameters across their range, and
every dataclass of the package as it is defined (two fresh interpreters, one with the
standard decorator in place of ours)."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from dimse_async.lazy_dataclass import dataclass as lazy_dataclass

ROOT = Path(__file__).resolve().parents[1]


def _define(decorator: Any, **params: Any) -> type:
    @decorator(**params)
    class Point:
        """A point."""

        x: int
        y: int = 2
        tags: list[str] = dataclasses.field(default_factory=list)
        note: str = dataclasses.field(default="", compare=False, repr=False)
        derived: int = dataclasses.field(default=0, init=False, hash=False)

    return Point


def _behaviour(cls: type) -> dict[str, Any]:
    """What a user can see of the class and its instances."""
    out: dict[str, Any] = {
        "params": repr(cls.__dataclass_params__),  # type: ignore[attr-defined]
        "fields": [repr(f) for f in dataclasses.fields(cls)],
        "match_args": getattr(cls, "__match_args__", None),
        "slots": getattr(cls, "__slots__", None),
        "doc": cls.__doc__,
        "hashable": cls.__hash__ is not None,  # type: ignore[comparison-overlap]
    }
    try:
        a, b, c = cls(1, 2, ["t"], "n"), cls(1, 2, ["t"], "other"), cls(1, 3)
        out["made"] = True
    except TypeError as exc:  # kw_only: positional arguments refused
        out["made"] = str(exc)
        a, b, c = cls(x=1, y=2, tags=["t"], note="n"), cls(x=1, y=2, tags=["t"], note="other"), cls(x=1, y=3)
    out["signature"] = str(inspect.signature(cls))
    out["repr"] = repr(a)
    out["eq"] = [a == b, a == c, a != c, a == object()]
    if out["hashable"]:
        try:
            out["hash"] = [hash(a) == hash(b), hash(cls(x=1, y=2, tags=(), note="")) == hash(cls(x=1, y=2, tags=()))]
        except TypeError as exc:  # a list field in the hash
            out["hash"] = str(exc)
    out["replace"] = repr(dataclasses.replace(a, y=5))
    out["asdict"] = dataclasses.asdict(a)
    try:
        a.x = 9
        out["set"] = a.x
    except dataclasses.FrozenInstanceError:
        out["set"] = "frozen"
    return out


PARAMS = [
    dict(zip(("frozen", "unsafe_hash", "slots", "kw_only"), combo))
    for combo in itertools.product((False, True), repeat=4)
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: ",".join(k for k, v in p.items() if v) or "plain")
def test_a_class_behaves_as_the_standard_dataclass(params: dict[str, bool]) -> None:
    ours, std = _define(lazy_dataclass, **params), _define(dataclasses.dataclass, **params)
    assert _behaviour(ours) == _behaviour(std)
    # used once, the methods are the generated ones, with their signatures
    for name in ("__init__", "__repr__", "__eq__"):
        assert str(inspect.signature(ours.__dict__[name])) == str(inspect.signature(std.__dict__[name]))
        assert ours.__dict__[name].__qualname__ == std.__dict__[name].__qualname__


def test_the_methods_are_made_on_first_use_one_by_one() -> None:
    Point = _define(lazy_dataclass)
    stand_ins = {name: Point.__dict__[name] for name in ("__init__", "__repr__", "__eq__")}
    p = Point(1)
    assert Point.__dict__["__init__"] is not stand_ins["__init__"]
    assert Point.__dict__["__repr__"] is stand_ins["__repr__"]  # not used yet
    assert repr(p) == "_define.<locals>.Point(x=1, y=2, tags=[], derived=0)"
    assert Point.__dict__["__repr__"] is not stand_ins["__repr__"]
    assert Point.__dict__["__eq__"] is stand_ins["__eq__"]
    made = Point.__dict__["__init__"]
    Point(2)
    assert Point.__dict__["__init__"] is made  # made once


def test_subclasses_and_post_init_behave_as_the_standard_dataclass() -> None:
    def define(decorator: Any) -> tuple[type, type]:
        @decorator(frozen=True)
        class Base:
            """Base."""

            a: int
            b: int = 1

        @decorator(frozen=True)
        class Child(Base):
            """Child."""

            c: int = 3

            def __post_init__(self) -> None:
                if self.c < 0:
                    raise ValueError("negative")

        return Base, Child

    (ob, oc), (_, sc) = define(lazy_dataclass), define(dataclasses.dataclass)
    assert repr(oc(1, 2, 3)).split(".")[-1] == repr(sc(1, 2, 3)).split(".")[-1]
    assert oc(1, 2, 3) == oc(1, 2, 3) and oc(1, 2, 3) != ob(1, 2)
    assert hash(oc(1, 2, 3)) == hash(sc(1, 2, 3))
    assert str(inspect.signature(oc)) == str(inspect.signature(sc))
    with pytest.raises(ValueError, match="negative"):
        oc(1, 2, -1)


def test_classes_it_cannot_serve_take_the_standard_decorator() -> None:
    @lazy_dataclass
    class NoDoc:
        x: int

    @lazy_dataclass(order=True)
    class Ordered:
        """Ordered."""

        x: int

    @lazy_dataclass
    class WithClassVar:
        """A class variable is not a field."""

        x: int
        kind: ClassVar[str] = "k"

    @lazy_dataclass
    class OwnRepr:
        """Its own repr."""

        x: int

        def __repr__(self) -> str:
            return "mine"

    assert NoDoc.__doc__ == "NoDoc(x: 'int')"
    assert Ordered(1) < Ordered(2)
    assert WithClassVar(1) == WithClassVar(1) and WithClassVar.kind == "k"
    assert repr(OwnRepr(1)) == "mine" and OwnRepr(1) == OwnRepr(1)
    for cls in (NoDoc, Ordered, WithClassVar, OwnRepr):  # nothing stands in
        assert "*args" not in str(inspect.signature(cls.__dict__["__init__"]))


#: Describes every dataclass of the package, after using each one, as JSON.
_DESCRIBE = r"""
import dataclasses, importlib, inspect, json, pkgutil, re, sys
if sys.argv[1] == "standard":
    import types
    sys.modules["dimse_async.lazy_dataclass"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
import dimse_async
out = {}
for info in pkgutil.walk_packages(dimse_async.__path__, "dimse_async."):
    if info.name.endswith("__main__") or info.name == "dimse_async.lazy_dataclass":
        continue
    module = importlib.import_module(info.name)
    for name, cls in sorted(vars(module).items()):
        if not (isinstance(cls, type) and cls.__module__ == info.name and dataclasses.is_dataclass(cls)):
            continue
        fields = dataclasses.fields(cls)
        row = {"params": repr(cls.__dataclass_params__), "fields": [repr(f) for f in fields],
               "match_args": getattr(cls, "__match_args__", None), "slots": getattr(cls, "__slots__", None),
               "doc": cls.__doc__, "hashable": cls.__hash__ is not None,
               "dict": sorted(k for k in vars(cls) if k not in ("__init__", "__repr__", "__eq__", "__hash__"))}
        args = {f.name: f"v{i}" for i, f in enumerate(fields) if f.init}
        try:
            a, b = cls(**args), cls(**args)
        except Exception as exc:
            row["made"] = f"{type(exc).__name__}: {exc}"
        else:
            row["repr"] = repr(a)
            row["eq"] = [a == b, a != b, a == object()]
            if row["hashable"]:
                try:
                    row["hash"] = hash(a) == hash(b)
                except TypeError as exc:
                    row["hash"] = str(exc)
            for f in fields:
                if f.init:
                    c = cls(**{**args, f.name: "other"})
                    row.setdefault("differs", []).append(a == c)
        row["signature"] = str(inspect.signature(cls))
        out[f"{info.name}.{name}"] = row
print(re.sub(" at 0x[0-9a-f]+", "", json.dumps(out, sort_keys=True, default=repr)))
"""


def _describe(which: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
    res = subprocess.run(
        [sys.executable, "-c", _DESCRIBE, which], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    described: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return described


def test_every_dataclass_of_the_package_behaves_as_with_the_standard_decorator() -> None:
    ours, std = _describe("ours"), _describe("standard")
    assert len(std) >= 60, sorted(std)
    assert ours.keys() == std.keys()
    for name in std:
        assert ours[name] == std[name], name


def test_a_plain_init_is_the_code_dataclasses_compiles() -> None:
    """Fields that are all plain arguments: ``__init__`` comes from a template with the
    names replaced; its instructions, names, defaults and annotations are the standard's."""

    def define(decorator: Any) -> list[type]:
        @decorator(slots=True)
        class Empty:
            """No fields."""

        @decorator(slots=True)
        class Two:
            """Two fields."""

            data: bytes
            more: int = 5

        @decorator
        class Three:
            """Three fields, defaults."""

            a: str = "x"
            b: object = None
            c: float = 1.5

        return [Empty, Two, Three]

    for ours, std in zip(define(lazy_dataclass), define(dataclasses.dataclass), strict=True):
        made = ours()  if ours.__name__ != "Two" else ours(b"d")
        fn, ref = ours.__dict__["__init__"], std.__dict__["__init__"]
        assert made is not None and "*args" not in str(inspect.signature(fn))
        assert fn.__code__.co_code == ref.__code__.co_code
        assert fn.__code__.co_names == ref.__code__.co_names
        assert fn.__code__.co_varnames == ref.__code__.co_varnames
        assert (fn.__defaults__, fn.__kwdefaults__, fn.__annotations__) == (
            ref.__defaults__,
            ref.__kwdefaults__,
            ref.__annotations__,
        )
        assert (fn.__qualname__, fn.__module__, fn.__closure__) == (ref.__qualname__, ref.__module__, ref.__closure__)


def test_what_dataclasses_refuses_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):

        @lazy_dataclass
        class Bad:
            """A default, then none."""

            a: int = 1
            b: int

    with pytest.raises(ValueError, match="mutable default"):

        @lazy_dataclass
        class Mutable:
            """A list as a default."""

            a: list[int] = []  # noqa: RUF012


def test_an_init_var_of_a_base_takes_the_standard_decorator() -> None:
    @dataclasses.dataclass
    class Base:
        """With an InitVar."""

        seed: dataclasses.InitVar[int]
        value: int = 0

        def __post_init__(self, seed: int) -> None:
            self.value = seed * 2

    @lazy_dataclass
    class Child(Base):
        """Inherits it."""

        name: str = "c"

    assert Child(3).value == 6 and Child(3, 1, "n").name == "n"
