"""The package's folders are its layers: a module imports only from its own layer or a lower one, never across two
packages of one layer, and no chain of imports comes back to where it started (docs/ARCHITECTURE.md).

Every `import` / `from ... import` in ds4cupy's sources counts, also those inside functions (a lazy import is still a
dependency). The check reads the sources with `ast`; it imports nothing."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ds4cupy"

# package (first folder under ds4cupy/) -> layer; higher layers may import lower ones only
LAYERS = {
    "format": 0,
    "text": 1, "memory": 1,
    "engines": 2,
    "tools": 3,
    "server": 4,
    "": 5,            # ds4cupy/__init__.py, cli.py, __main__.py
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    sub = parts[1]
    return sub if (PKG / sub).is_dir() else ""


def imports_of(path: Path) -> set[str]:
    """ds4cupy modules this file imports (absolute names; `from X import Y` also yields X.Y when Y is a module)."""
    module = module_name(path)
    is_pkg = path.name == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "ds4cupy")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ds4cupy":
                continue
            out.add(target)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() or (PKG.parent / sub.replace(".", "/")).is_dir():
                    out.add(sub)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def test_every_package_has_a_layer():
    pkgs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert pkgs <= set(LAYERS), f"packages without a layer in this test: {sorted(pkgs - set(LAYERS))}"


def test_no_upward_or_sideways_import():
    bad = []
    for mod, deps in graph().items():
        src = package_of(mod)
        for dep in deps:
            dst = package_of(dep)
            if dst == src or dep == "ds4cupy":
                continue
            if LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] and dst != src):
                bad.append(f"{mod} ({src or 'top'}, layer {LAYERS[src]}) imports {dep} "
                           f"({dst or 'top'}, layer {LAYERS[dst]})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    g = graph()
    # package __init__ imports of their own submodules are re-exports, not dependencies of the submodules
    edges = {m: {d for d in deps if d in g and d != m and not m.startswith(d + ".")} for m, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The check can fail: an upward import planted in a copy of a format module is reported."""
    src = (PKG / "format" / "config.py").read_text()
    planted = PKG / "format" / "_planted_upward_import.py"
    planted.write_text(src + "\nfrom ..server import protocol  # planted\n")
    try:
        deps = imports_of(planted)
        assert "ds4cupy.server.protocol" in deps
        with pytest.raises(AssertionError, match="_planted_upward_import"):
            test_no_upward_or_sideways_import()
    finally:
        planted.unlink()
