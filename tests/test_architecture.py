"""The import rules of docs/architecture.md, read from the source: every `import` statement of
tuner/ and trials/, those inside functions included (they are imports all the same, only later).

- `trials` never imports `tuner`: a trial runs standalone (`python -m trials.sft`);
- `ray` is imported only under tuner/backends/;
- outside tuner/backends/, a backend is reached only through the registry (the package itself)
  and its contract (base.py), never by importing one;
- only tuner/store/ opens a store or an artifact store by hand;
- outside tuner/store/, the store is reached through its face (`tuner.store`) only;
- every module sits in a layer's folder, and imports only its own layer and those below;
- no import cycles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tuner", "trials")
# What opens a store without going through tuner.store.
STORE_OPENERS = {
    "RDBStorage",
    "create_engine",
    "JournalStorage",
    "FileSystemArtifactStore",
    "AtomicFileStore",
    "Boto3ArtifactStore",
    "PrefixedBoto3Store",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports: a module, or the package a name comes from
    line: int


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports() -> Iterator[Import]:
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(module, alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"{path}:{node.lineno}: relative import"
                for alias in node.names:
                    # `from tuner.store import attrs` imports the module tuner.store._attrs.
                    submodule = f"{node.module}.{alias.name}"
                    target = submodule if submodule in MODULES else node.module
                    yield Import(module, target, node.lineno)


IMPORTS = list(_imports())


def _where(i: Import) -> str:
    return f"{MODULES[i.module].relative_to(ROOT)}:{i.line} imports {i.target}"


def _top(name: str) -> str:
    return name.split(".")[0]


# The layers, top to bottom: a folder each (docs/architecture.md). `tuner` itself, the public API,
# is the Face's; `trials`, the workload, imports nothing of tuner and sits below every layer.
LAYERS = {
    "face": ("tuner", "tuner.__main__", "tuner.face"),
    "core": ("tuner.core",),
    "backends": ("tuner.backends",),
    "trial": ("tuner.trial",),
    "store": ("tuner.store",),
    "space": ("tuner.space",),
    "search": ("tuner.search",),
    "common": ("tuner.common",),
    "workload": ("trials",),
}
# Imports that run up a layer on purpose, each with its reason. Empty today: add one only with
# a reason a reader accepts, never to make a new import pass.
UPWARD: dict[tuple[str, str], str] = {}


def _layer(module: str) -> int | None:
    """The layer's rank (0 is the top), or None for a module outside tuner and trials."""
    for rank, prefixes in enumerate(LAYERS.values()):
        if any(module == p or module.startswith(f"{p}.") for p in prefixes if p != "tuner"):
            return rank
        if module == "tuner" and "tuner" in prefixes:
            return rank
    return None


def test_the_rules_see_the_code() -> None:
    """The reader finds what it must: were it blind, every rule below would pass."""
    targets = {(i.module, i.target) for i in IMPORTS}
    assert ("tuner.backends.ray", "ray") in targets
    assert ("tuner.core.study", "tuner.backends") in targets
    assert ("tuner.backends.worker", "tuner.trial.objective") in targets  # a layer down
    assert ("trials.sft", "trials.data") in targets
    assert any(  # from inside a function, through the store's face
        i.module == "tuner.backends.worker" and i.target == "tuner.store" for i in IMPORTS
    )
    assert "tuner.store._rdb" in MODULES and "trials.sft" in MODULES
    assert _layer("tuner.face.cli") == 0 and _layer("trials.sft") == len(LAYERS) - 1
    in_store = set().union(*(_calls(p) for m, p in MODULES.items() if m.startswith("tuner.store")))
    assert {"create_engine", "AtomicFileStore", "PrefixedBoto3Store"} <= in_store


def test_trials_never_import_tuner() -> None:
    bad = [_where(i) for i in IMPORTS if _top(i.module) == "trials" and _top(i.target) == "tuner"]
    assert not bad, bad


def test_ray_is_imported_only_by_the_backends() -> None:
    bad = [
        _where(i)
        for i in IMPORTS
        if _top(i.target) == "ray" and not i.module.startswith("tuner.backends.")
    ]
    assert not bad, bad


def test_backends_are_reached_through_the_registry() -> None:
    allowed = {"tuner.backends", "tuner.backends.base"}
    bad = [
        _where(i)
        for i in IMPORTS
        if i.target.startswith("tuner.backends.")
        and i.target not in allowed
        and not i.module.startswith("tuner.backends")
    ]
    assert not bad, bad


def test_only_the_store_opens_a_store() -> None:
    bad = [
        f"{path.relative_to(ROOT)} calls {name}"
        for module, path in MODULES.items()
        if not module.startswith("tuner.store")
        for name in sorted(_calls(path) & STORE_OPENERS)
    ]
    assert not bad, bad


def _calls(path: Path) -> set[str]:
    """The names the module calls: `f(...)` and `x.f(...)` give `f`."""
    return {
        getattr(node.func, "attr", None) or getattr(node.func, "id", None)
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call)
    }


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for i in IMPORTS:
        if i.target in MODULES and i.target != i.module:
            graph[i.module].add(i.target)
    cycles = _cycles(graph)
    assert not cycles, [" -> ".join([*cycle, cycle[0]]) for cycle in cycles]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_sits_in_a_layer() -> None:
    """No module lies loose in tuner/: each is in the folder of its layer."""
    loose = [
        str(path.relative_to(ROOT))
        for module, path in MODULES.items()
        if _layer(module) is None
        or path.parent == ROOT / "tuner"
        and path.name not in ("__init__.py", "__main__.py")
    ]
    assert not loose, f"modules in no layer's folder: {loose}"


def test_a_module_imports_only_its_own_layer_and_those_below() -> None:
    bad = [
        f"{_where(i)} (layer {_name(i.module)} -> {_name(i.target)})"
        for i in IMPORTS
        if _top(i.target) in PACKAGES
        and _layer(i.target) < _layer(i.module)
        and (i.module, i.target) not in UPWARD
    ]
    assert not bad, bad


def test_the_listed_upward_imports_are_still_there() -> None:
    """An exception the code no longer needs goes from the list, so that it cannot hide a new
    import of the same kind."""
    targets = {(i.module, i.target) for i in IMPORTS}
    assert not set(UPWARD) - targets, set(UPWARD) - targets


def test_the_store_is_reached_through_its_face() -> None:
    bad = [
        _where(i)
        for i in IMPORTS
        if i.target.startswith("tuner.store.") and not i.module.startswith("tuner.store")
    ]
    assert not bad, bad


def _name(module: str) -> str:
    return list(LAYERS)[_layer(module)]
