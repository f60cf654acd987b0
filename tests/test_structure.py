"""The import structure: the layer contracts in pyproject.toml ([tool.importlinter]) hold, and no modules of ours
import each other in a circle (directly or through others; function-level imports count)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dream_export", "runtime", "calibration")


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.is_file(), "import-linter is not installed: pip install -e '.[dev]' (the test environment has it)"
    done = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def _ignored_imports() -> set[tuple[str, str]]:
    """The imports the contracts ignore (``importer -> imported``): a circle they are part of is known and listed
    there, not here."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    pairs = set()
    for contract in config["contracts"]:
        for expression in contract.get("ignore_imports", []):
            importer, imported = (part.strip() for part in expression.split("->"))
            pairs.add((importer, imported))
    return pairs


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, without recursion)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_circles_are_found():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _circles(edges) == [["a", "b", "c"]]


def test_no_import_circles():
    grimp = pytest.importorskip("grimp")
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    ignored = _ignored_imports()
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d in graph.modules and (m, d) not in ignored}
             for m in graph.modules}
    report = []
    for circle in _circles(edges):
        members = set(circle)
        report.append(" <-> ".join(circle) + ": " + "; ".join(
            f"{a} -> {b} (line {', '.join(str(d['line_number']) for d in graph.get_import_details(importer=a, imported=b))})"
            for a in circle for b in sorted(edges[a] & members)))
    assert not report, "import circles:\n" + "\n".join(report)


def _private_imports(source: str, module: str) -> list[str]:
    """``from <one of our modules> import _name`` in ``source`` (the module ``module``): a private name of another
    module of ours, which makes that module's internals part of its interface."""
    import ast

    found = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # relative: resolve against this module's package
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        if target.split(".")[0] not in PACKAGES:
            continue
        found += [f"{module}: from {target} import {a.name}" for a in node.names
                  if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_private_imports_are_found():
    src = "from .validate import _session, check\nfrom onnx import _private\nfrom runtime.kv import _Hidden\n"
    assert _private_imports(src, "dream_export.export.draft_tree") == [
        "dream_export.export.draft_tree: from dream_export.export.validate import _session",
        "dream_export.export.draft_tree: from runtime.kv import _Hidden"]


def test_no_private_name_is_imported_across_modules():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            if rel.name == "__init__":
                module += ".__init__"  # its relative imports resolve against the package itself
            found += _private_imports(path.read_text(), module)
    assert not found, "\n".join(found)
