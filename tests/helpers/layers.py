"""The architecture rules, checked on source files with ``ast`` under the names as installed.

The folders map to import names as pyproject.toml installs them: ``formats/`` is
``qtbuild.formats``, ``runtime/`` is ``qtbuild.runtime``, ``qtbuild/`` is ``qtbuild``.  Layers,
lowest first: ``qtbuild.formats`` < ``qtbuild.runtime`` < the rest of ``qtbuild``; the root
package ``qtbuild/__init__.py`` belongs to none.  :func:`check_tree` reports, one line each:

* an import of a higher layer (``qtbuild.formats`` importing ``qtbuild.runtime`` or the rest of
  ``qtbuild``; ``qtbuild.runtime`` importing the rest of ``qtbuild``);
* an import of the old top-level names ``formats`` or ``runtime``;
* anything of the project that ``qtbuild.runtime.sdk`` imports from outside itself (the SDK is
  exported and imported on its own, inside the enclave);
* every import cycle between modules (with the modules in import order).

:func:`private_imports` reports, one line each, a module using a private name (one leading
underscore, not a dunder) of another module of the project: ``from X import _name``,
``X._name`` on an imported module ``X``, or a private module ``P._mod`` imported from outside
its package ``P``.  A name other modules need is part of its module's contract: make it public
(with a docstring saying so) or move it to a helper both can import.

Every import counts: module level, inside functions, under ``if TYPE_CHECKING``, relative ones
resolved.  Importing ``a.b.c`` is an edge to ``a.b.c`` only (its parent packages' ``__init__``
run first, but they are not edges: a package that re-exports its submodules is no cycle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

#: Folder → import name, as pyproject.toml's package-dir maps them.
FOLDERS = {"qtbuild": "qtbuild", "formats": "qtbuild.formats", "runtime": "qtbuild.runtime"}
OLD_NAMES = ("formats", "runtime")
SDK = "qtbuild.runtime.sdk"


def module_names(root: Path) -> dict[str, Path]:
    """Installed module name → source file, for every .py file under the mapped folders."""
    modules = {}
    for folder, name in FOLDERS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of everything ``path`` imports, wherever the statement is.

    ``from X import name`` imports the module ``X.name`` when that is one of ``known``, else
    the attribute ``name`` of ``X`` (so ``X`` itself).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(package, node.module, node.level)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if submodule in known else base))
    return sorted(set(found))


def _absolute(package: str, name: str | None, level: int) -> str:
    if level == 0:
        return name or ""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)] if level - 1 <= len(parts) else []
    return ".".join([*base, *([name] if name else [])])


def layer(module: str) -> int | None:
    """0 for qtbuild.formats, 1 for qtbuild.runtime, 2 for the rest of qtbuild, None for the
    root package and anything outside the project."""
    if module == "qtbuild" or not module.startswith("qtbuild."):
        return None
    if _within(module, "qtbuild.formats"):
        return 0
    if _within(module, "qtbuild.runtime"):
        return 1
    return 2


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def check_tree(root: Path, *, allowed_cycles: Iterable[tuple[str, ...]] = ()) -> list[str]:
    """Every rule broken in the tree at ``root`` (see the module docstring), one line each.

    ``allowed_cycles``: groups of ``fnmatch`` patterns; a cycle whose modules all match one
    group's patterns is not reported.
    """
    modules = module_names(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        where = path.relative_to(root)
        for line, target in imports_of(module, path, set(modules)):
            if target.split(".")[0] in OLD_NAMES:
                problems.append(f"{where}:{line}: imports the old top-level name {target!r} "
                                f"(use qtbuild.{target})")
                continue
            if target not in modules:
                continue
            graph[module].add(target)
            mine, theirs = layer(module), layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{where}:{line}: {module} (layer {_LAYERS[mine]}) imports {target} "
                                f"(layer {_LAYERS[theirs]}): no layer imports a layer above it")
            if _within(module, SDK) and not _within(target, SDK):
                problems.append(f"{where}:{line}: {module} imports {target}: the SDK imports nothing "
                                f"of the project outside {SDK}")
    allowed = list(allowed_cycles)
    for cycle, group in cycles(graph):
        if any(all(any(fnmatch(name, pattern) for pattern in patterns) for name in group) for patterns in allowed):
            continue
        others = sorted(set(group) - set(cycle))
        more = f" (the same cycle group also holds {', '.join(others)})" if others else ""
        problems.append("import cycle: " + " -> ".join([*cycle, cycle[0]]) + more)
    return problems


_LAYERS = {0: "qtbuild.formats", 1: "qtbuild.runtime", 2: "qtbuild"}


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Per strongly connected component that has a cycle: one cycle (a path, each module once)
    and all the component's modules."""
    found = []
    for component in _strongly_connected(graph):
        members = set(component)
        start = min(component)
        if len(component) == 1 and start not in graph[start]:
            continue
        found.append((_cycle_through(start, graph, members), component))
    return sorted(found)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit on deep chains)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _cycle_through(start: str, graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & members):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return path[::-1]
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is in a component without a cycle")


def old_name_imports(files: Iterable[Path], root: Path) -> list[str]:
    """Imports of the old top-level names in files outside the package folders (tests, samples...)."""
    problems = []
    for path in files:
        for line, target in imports_of("__main__", path, set()):
            if target.split(".")[0] in OLD_NAMES:
                problems.append(f"{path.relative_to(root)}:{line}: imports the old top-level name {target!r} "
                                f"(use qtbuild.{target})")
    return problems


def sys_path_edits(files: Iterable[Path], root: Path) -> list[str]:
    """Statements that change ``sys.path`` (a call on it, an assignment to it or a ``+=``)."""
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in sorted(ast.walk(tree), key=lambda node: getattr(node, "lineno", 0)):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                targets = [node.func.value]
            elif isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(ast.unparse(target) == "sys.path" for target in targets):
                problems.append(f"{path.relative_to(root)}:{node.lineno}: edits sys.path "
                                "(the package is imported from its installed location)")
    return problems


def private_imports(root: Path) -> list[str]:
    """Every use of another project module's private name in the tree at ``root`` (see the
    module docstring), one line each: ``path:line: module uses the private name target``."""
    modules = module_names(root)
    known = set(modules)
    problems = []
    for module, path in modules.items():
        where = path.relative_to(root)
        for line, target in _private_uses(module, path, known):
            if _may_use(module, target, known):
                continue
            problems.append(f"{where}:{line}: {module} uses the private name {target} (make it public, "
                            "stating its contract, or move what both need to a shared public helper)")
    return problems


def _private_uses(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every private project name ``path`` imports or reads
    from an imported project module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    bound: dict[str, str] = {}  # local name -> project module it is bound to (file-wide)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if layer(alias.name) is None and alias.name != "qtbuild":
                    continue
                if any(_private(part) for part in alias.name.split(".")):
                    found.append((node.lineno, alias.name))
                local = alias.asname or alias.name.split(".")[0]
                bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(package, node.module, node.level)
            if layer(base) is None and base != "qtbuild":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if _private(alias.name) or any(_private(part) for part in base.split(".")):
                    found.append((node.lineno, target))
                if target in known:
                    bound[alias.asname or alias.name] = target
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            dotted = _dotted(node.value)
            if dotted is None or dotted.split(".")[0] not in bound:
                continue
            head, _, rest = dotted.partition(".")
            owner = ".".join(filter(None, (bound[head], rest)))
            if owner in known:
                found.append((node.lineno, f"{owner}.{node.attr}"))
    return sorted(set(found))


def _may_use(module: str, target: str, known: set[str]) -> bool:
    """Whether ``module`` may use ``target``: each private part of it is a private module used
    inside its package, or a private name used inside its own module."""
    parts = target.split(".")
    for index, part in enumerate(parts):
        if not _private(part):
            continue
        scope = ".".join(parts[:index])
        is_module = ".".join(parts[: index + 1]) in known
        if not (_within(module, scope) if is_module else module == scope):
            return False
    return True


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None
