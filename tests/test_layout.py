"""The house rules of the code's layout, checked on the source: no module reaches into another's private names,
the package imports form no cycle, and the CLI only parses arguments (it imports no model, store or loop code at
module level)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"attncache": ROOT / "attncache", "attncache_cli": ROOT / "cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path, module_level_only: bool):
    """(imported module, imported names) of every import in a module, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(0, node.level - 1)):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _resolve(importer: str, target: str, names: list[str]) -> list[str]:
    """The modules of this project an import statement loads. Python loads a module's packages first, and a
    package's `__init__` loads what it imports: `from ..codecs.base import X` loads `attncache.codecs` (and so every
    codec module) before `codecs.base`. So an import is an edge to each package above its module too, except the
    packages the importer is itself inside (they are already loading: not an edge of the import's making)."""
    modules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    if target in MODULES and (len(modules) < len(names) or not _inside(importer, target)):
        modules.append(target)  # a name from a package's __init__, or a module of another package
    out = set(modules)
    for module in modules:
        parts = module.split(".")
        out |= {p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in MODULES
                and not _inside(importer, p)}
    return sorted(out - {importer})


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{name}: from {target} import {n}" for name, path in MODULES.items()
                 for target, names in _imports(name, path, module_level_only=False)
                 if target.split(".")[0] in PACKAGES for n in names
                 if n.startswith("_") and not n.endswith("__")]
    assert offenders == []


def _cycles(module_level_only: bool) -> list[list[str]]:
    graph = {name: sorted({m for t, ns in _imports(name, path, module_level_only) for m in _resolve(name, t, ns)})
             for name, path in MODULES.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    return cycles


def _shown(cycles: list[list[str]]) -> str:
    return "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_module_imports_form_no_cycle():
    cycles = _cycles(module_level_only=True)
    assert cycles == [], _shown(cycles)


def test_no_cycle_even_through_deferred_imports():
    """Imports inside functions defer loading; they still must not make two modules depend on each other."""
    cycles = _cycles(module_level_only=False)
    assert cycles == [], _shown(cycles)


def test_the_cli_is_argument_parsing_only():
    """At module level the CLI imports only typer and the lightweight parts of the package (errors, the mode
    table's names, the version): each command imports the API it wraps when it runs."""
    allowed = {"attncache", "attncache.errors", "attncache.train.modes", "attncache_cli.options"}
    for name in ("attncache_cli.main", "attncache_cli.options"):
        imported = {t for t, _ in _imports(name, MODULES[name], module_level_only=True)
                    if t.split(".")[0] in PACKAGES}
        assert imported <= allowed, imported - allowed


def test_every_package_is_installed():
    """pyproject.toml lists its packages by name: a new subpackage missing from the list is absent from the wheel
    (an editable install hides it)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("attncache", *p.parent.relative_to(ROOT / "attncache").parts))
             for p in (ROOT / "attncache").rglob("__init__.py")} | {"attncache_cli"}
    assert found == listed
