"""The import graph of dimse_async: arrows point down only, so there is no cycle.

Every module of the package has a place in LAYERS (lowest first). A module may import
only modules of lower layers; every import counts, including those under
``TYPE_CHECKING`` and inside functions. The archive application and the command line
are the top layers: the framework below never imports them. A new module needs a
line here, which is the point: placing it says what it may use.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import dimse_async

PACKAGE = Path(dimse_async.__file__).parent

LAYERS: list[set[str]] = [
    # pure helpers with no package imports
    {"lazy_dataclass"},
    {"uids", "log", "status", "keepalive", "proxy", "tls", "sop_classes", "inflate", "filewriter", "budget", "early_signals"},
    {"ratelimit", "space"},
    # the sans-I/O core: bytes <-> PDUs, the state machine, negotiation, DIMSE messages
    {"pdu_items", "fsm_table"},
    {"pdu"},
    {"fsm_outputs"},
    {"acse", "part10", "fsm", "dimse"},
    {"exceptions", "dataset_check", "codec"},
    {"session", "transcode", "contexts", "oplog"},
    # what services see of an association; response streams typed against it
    {"interface"},
    {"streams"},
    # the asyncio adapter
    {"messaging"},
    {"association"},
    # service classes, typed against the interface
    {"services.requests", "services.scp", "services.spool"},
    {"services.storage", "services.store_scu", "services.verification", "services.normalized"},
    {"services.qr", "services.commitment", "services.availability"},
    {"services.retrieve_scp"},
    # the association users hold, the listening side, the AE that wires it all
    {"operations"},
    {"handlers"},
    {"server"},
    {"acceptor"},
    {"ae"},
    # built on the AE
    {"services.send", "metrics", "pool"},
    {"health"},
    {"deploy", "workers"},
    {"", "services"},  # the package's public face
    # applications on top of the framework
    {"archive.date_ranges", "archive.budget"},
    {"archive.value_matching"},
    {"archive", "archive.matching", "archive.config"},
    {"archive.schema", "archive.backend"},
    {"archive.backend_sqlite", "archive.backend_pg", "archive.worklist"},
    {"archive.db"},
    {"archive.ingest", "archive.query"},
    {"archive.index", "archive.commitment", "archive.mpps"},
    {"archive.normalized"},
    {"cli.common"},  # one-line errors and checks shared by the commands and serve
    {"archive.serve"},
    {"cli.options", "cli.process"},
    {"cli.check", "cli.commit"},
    {"cli.progress", "cli.query"},
    {"cli.retrieve"},
    {"cli.find", "cli.get", "cli.move"},
    {"cli"},
    {"cli.conformance"},  # reads the tables of everything below
    {"__main__"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> set[str]:
    """The package modules an import statement names ("" is the package itself)."""
    out: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == "dimse_async" or alias.name.startswith("dimse_async."):
                out.add(alias.name.removeprefix("dimse_async").lstrip("."))
        return out
    if node.level == 0:
        if node.module is None or not (node.module == "dimse_async" or node.module.startswith("dimse_async.")):
            return out
        base = node.module.removeprefix("dimse_async").lstrip(".")
    else:
        parts = importer.split(".") if importer else []
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
        base = ".".join([*parts, *(node.module.split(".") if node.module else [])])
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        out.add(sub if sub in known else base)
    return out


@functools.cache
def parsed(path: Path) -> ast.Module:
    """The syntax tree of a module of the package (parsed once per run: the tests here
    only read the trees)."""
    return ast.parse(path.read_text(), str(path))


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Each module's imports of the package's modules (made once per run; read only)."""
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = parsed(path)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets |= resolve(name, path.name == "__init__.py", node, known)
        graph[name] = {t for t in targets if t != name}
    return graph


def rank() -> dict[str, int]:
    ranks: dict[str, int] = {}
    for i, layer in enumerate(LAYERS):
        for name in layer:
            assert name not in ranks, f"{name} is in two layers"
            ranks[name] = i
    return ranks


def test_every_module_has_a_layer():
    missing = sorted(set(modules()) - set(rank()))
    assert not missing, f"place these modules in tests/test_layers.py LAYERS: {missing}"


def test_imports_point_down_only():
    ranks = rank()
    upward = [
        f"dimse_async.{a or '__init__'} (layer {ranks[a]}) imports dimse_async.{b or '__init__'} (layer {ranks[b]})"
        for a, targets in import_graph().items()
        for b in targets
        if a in ranks and b in ranks and ranks[b] >= ranks[a]
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_framework_never_imports_the_applications():
    for name, targets in import_graph().items():
        if name.startswith(("archive", "cli")) or name == "__main__":
            continue
        apps = sorted(t for t in targets if t.startswith(("archive", "cli")))
        assert not apps, f"dimse_async.{name} imports {apps}"


def test_the_checker_sees_upward_imports():
    """The resolver is not vacuous: it finds known edges, both relative and absolute."""
    graph = import_graph()
    assert "session" in graph["messaging"] and "interface" in graph["services.storage"]
    assert "" in graph["archive.serve"] and "services.qr" in graph["operations"]
    tree = ast.parse("from ..archive import index\nimport dimse_async.cli\n")
    known = set(modules())
    found = set().union(*(resolve("services.qr", False, n, known) for n in tree.body))  # type: ignore[arg-type]
    assert found == {"archive.index", "cli"}


def _own_names(tree: ast.Module) -> set[str]:
    """Private names a module defines for itself: functions, classes, module and class
    variables, ``__slots__`` entries and ``self._x`` attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
        elif isinstance(node, ast.Assign) and _slots(node):
            assert isinstance(node.value, (ast.Tuple, ast.List))
            names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return {n for n in names if n.startswith("_")}


def _slots(node: ast.Assign) -> bool:
    """A ``__slots__ = (...)`` assignment."""
    is_slots = any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
    return is_slots and isinstance(node.value, (ast.Tuple, ast.List))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


#: Private names of the standard library used where no public name exists
#: (argparse and zlib types; namedtuple._replace and os._exit are documented API;
#: atexit._run_exitfuncs runs the exit handlers before the CLI's os._exit).
STDLIB_PRIVATE_TYPES = {"_SubParsersAction", "_Decompress", "_replace", "_exit", "_run_exitfuncs"}


def test_no_module_uses_another_modules_private_names():
    """A module reaches another only through public names: no ``from .x import _y``,
    no ``obj._attr`` unless this module defines ``_attr`` itself (the interface
    between layers is what they publish). ``self._x`` of a base class is allowed."""
    found = []
    for name, path in modules().items():
        tree = parsed(path)
        own = _own_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found += [f"{name}:{node.lineno} imports {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                if node.attr in STDLIB_PRIVATE_TYPES:
                    continue
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):  # a base's own
                    found.append(f"{name}:{node.lineno} uses {ast.unparse(node)}")
    assert not found, "\n".join(found)
