"""The package's shape: no import cycles (counting imports inside functions, which hide
them), package modules imported at the top of a module, a module map in docs/ that names
every module, and sizes: no module over 600 lines, no function over 80 lines or with over
12 parameters outside cli/."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_redrafter"
MODULE_MAP = PACKAGE.parent / "docs" / "module-map.md"
# Modules whose import pulls in a heavy optional stack: the server (starlette, uvicorn).
LAZY_OK = {"mlx_redrafter.server"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _imports(path: Path) -> dict[str, list[tuple[str, bool]]]:
    """Package modules `path` imports, each with whether the import sits inside a function."""
    module, tree = _module_name(path), ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend(
                    (name, in_function)
                    for name in _resolve(module, path.name == "__init__.py", child)
                )
            visit(child, inner)

    visit(tree, False)
    return {module: found}


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    local: dict[str, set[str]] = {m: set() for m in modules}
    for f in files:
        for module, found in _imports(f).items():
            for name, in_function in found:
                if name in modules and name != module:
                    edges[module].add(name)
                    if in_function:
                        local[module].add(name)
    return edges, local


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            # A package imports its own submodules to re-export them; that is not a cycle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_no_import_cycles():
    edges, _ = _graph()
    cycle = _cycle({m: {n for n in e if not n.startswith(m + ".")} for m, e in edges.items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_modules_are_imported_at_the_top():
    # Imports inside functions are for heavy optional dependencies (torch, matplotlib, mlx-lm,
    # the server's web stack), not for this package's own modules.
    _, local = _graph()
    hidden = {m: sorted(n - LAZY_OK) for m, n in local.items() if n - LAZY_OK}
    assert not hidden, f"package modules imported inside functions: {hidden}"


def test_module_map_names_every_module():
    text = MODULE_MAP.read_text()
    missing = [
        str(f.relative_to(PACKAGE.parent))
        for f in sorted(PACKAGE.rglob("*.py"))
        if f.name != "__init__.py" and f"`{f.relative_to(PACKAGE).as_posix()}`" not in text
    ]
    assert not missing, f"docs/module-map.md does not describe: {missing}"


# ---------------------------------------------------------------------------------------------
# Sizes: rooms one can hold in one's head

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80  # outside cli/, whose commands are mostly option declarations
MAX_PARAMETERS = 12  # outside cli/; self and cls not counted


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
            names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
            count = len([n for n in names if n not in ("self", "cls")])
            yield node.name, node.end_lineno - node.lineno + 1, count


def test_no_module_over_600_lines():
    big = {
        _module_name(f): n
        for f in sorted(PACKAGE.rglob("*.py"))
        if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_no_function_over_80_lines_or_12_parameters_outside_the_cli():
    long, wide = [], []
    for f in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(f)
        if module.startswith("mlx_redrafter.cli"):
            continue
        for name, lines, params in _functions(f):
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{module}.{name} ({lines} lines)")
            if params > MAX_PARAMETERS:
                wide.append(f"{module}.{name} ({params} parameters)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert not wide, f"functions with over {MAX_PARAMETERS} parameters: {wide}"
