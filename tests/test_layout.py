"""The package's layout: imports run one way, from the commands down to the BraTS core, and never in a cycle.

Layers, lowest first: ``core`` (BraTS naming, labels, errors, io) < ``data`` < ``model`` < ``training`` and
``inference`` (side by side, neither imports the other) < ``evaluation`` < ``tools`` and ``entry`` (the config
entry points) < ``__main__`` (the command line). A module may import its own subpackage and any lower layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "custom"
LAYERS = {
    "core": 0,
    "data": 1,
    "model": 2,
    "training": 3,
    "inference": 3,
    "evaluation": 4,
    "tools": 5,
    "entry": 5,
    "__main__": 6,
}
LAZY_ALLOWED = ("tools", "__main__")  # commands may import on demand (start-up time), still only downwards


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _group(module: str) -> str | None:
    """The layer name of ``custom.<group>...``; None for the package root ``custom``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """``(imported custom module, line, at module level)`` of every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    top_level = {id(node) for node in tree.body}
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in targets:
            if target == "custom" or target.startswith("custom."):
                while target not in MODULES:  # a name inside a module: the module itself
                    target = target.rsplit(".", 1)[0]
                found.append((target, node.lineno, id(node) in top_level))
    return found


def test_every_module_is_in_a_layer():
    groups = {_group(m) for m in MODULES} - {None}
    assert groups <= set(LAYERS), f"modules outside the layer table of this test: {sorted(groups - set(LAYERS))}"
    root = _imports("custom")
    assert not root, f"custom/__init__.py must import nothing of the package (every import runs it): {root}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _group(m)))
def test_imports_point_down(module):
    own = _group(module)
    for target, line, top in _imports(module):
        other = _group(target)
        where = f"{module} (line {line}) imports {target}"
        if other is None or other == own:
            continue
        assert (
            LAYERS[other] < LAYERS[own]
        ), f"{where}: {own} (layer {LAYERS[own]}) may not import {other} (layer {LAYERS[other]})"
        if own not in LAZY_ALLOWED:
            assert top, f"{where} inside a function: import at the top of the module"


def test_no_import_cycle():
    graph = {m: sorted({t for t, _, _ in _imports(m) if t != m}) for m in MODULES}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule above would catch a core module importing the inference layer (a checker that cannot fail is no check)."""
    fake = PACKAGE / "core" / "naming.py"
    monkeypatch.setitem(MODULES, "custom.core.naming", tmp_path / "naming.py")
    (tmp_path / "naming.py").write_text(fake.read_text() + "\nfrom custom.inference.segment import segment_cases\n")
    with pytest.raises(AssertionError, match="core .* may not import inference"):
        test_imports_point_down("custom.core.naming")
