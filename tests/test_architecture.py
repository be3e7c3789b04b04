"""The layering of ARCHITECTURE.md, checked on the source: no upward imports, no cycles.

Every ``import specquant...`` / ``from specquant... import`` in every module (function-local
imports included) is read with ``ast`` and mapped to the part it belongs to; each part may
import only the parts listed in ``ALLOWED`` (and itself).  The part graph is a DAG, and the
module-level import graph has no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import specquant

PKG = Path(specquant.__file__).parent

# part -> the parts it may import (besides itself).  Read bottom-up: files and core import
# nothing of specquant; the face (cli, the package root and ``python -m specquant``) sits on top.
ALLOWED: dict[str, set[str]] = {
    "_version": set(),
    "files": set(),  # io/files.py: the one atomic writer and strict JSON
    "core": {"_version"},
    "eval": set(),  # evaluation protocols (perplexity): tensors and models in, figures out
    "hf_compat": set(),  # hf_compat.py: transformers' Conv1D as nn.Linear (module surgery, no imports)
    "models": {"files", "eval"},
    "algorithms": {"core"},
    "nn": {"core"},
    "engine": {"core", "algorithms", "hf_compat"},
    "io": {"core", "nn", "models", "files", "_version", "hf_compat"},
    "export": {"core", "nn", "models", "files", "_version"},  # writers for other runtimes (ONNX, GGUF)
    "mixed": {"core", "algorithms", "engine", "files"},
    "diagnostics": {"core", "algorithms", "engine", "files"},
    "report": {"files"},
    "qat": {"core", "algorithms", "engine", "nn", "models", "files"},  # fake-quant training from a PTQ result
    "outofcore": {"algorithms", "engine", "io", "models", "files", "hf_compat"},  # a model folder, block by block
    "cli": {"_version", "files", "hf_compat", "core", "eval", "models", "algorithms", "nn", "engine", "io", "export",
            "mixed", "diagnostics", "report", "qat", "outofcore", "root"},
    "root": {"_version", "files", "hf_compat", "core", "eval", "models", "algorithms", "nn", "engine", "io", "export",
             "mixed", "diagnostics", "report", "qat", "outofcore"},
    "entry": {"cli"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _part(module: str) -> str:
    """The part a module ``specquant.x.y`` belongs to."""
    bits = module.split(".")
    if len(bits) == 1:
        return "root"
    if bits[1] == "__main__":  # ``python -m specquant``
        return "entry"
    if bits[1] == "io" and len(bits) > 2 and bits[2] == "files":
        return "files"
    return bits[1]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported specquant module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            names += [f"{node.module}.{a.name}" for a in node.names]  # "from specquant import io"
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n == "specquant" or n.startswith("specquant."):
                found.append((n, id(node) in top))
    return found


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import name refers to (a module, or the package holding the name)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_every_part_is_known():
    unknown = {_part(m) for m in _sources()} - set(ALLOWED)
    assert not unknown, f"parts missing from the layering table (and ARCHITECTURE.md): {sorted(unknown)}"


def test_no_upward_imports():
    modules = _sources()
    bad = []
    for mod, path in modules.items():
        src = _part(mod)
        for name, _ in _imports(path):
            target = _resolve(name, modules)
            if target is None:
                continue
            dst = _part(target)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{mod} ({src}) imports {target} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(set(bad)))


def test_the_part_graph_is_acyclic():
    seen: dict[str, int] = {}

    def visit(p: str, stack: tuple) -> None:
        assert p not in stack, f"cycle between parts: {' -> '.join(stack + (p,))}"
        if seen.get(p):
            return
        for q in ALLOWED[p]:
            visit(q, stack + (p,))
        seen[p] = 1

    for p in ALLOWED:
        visit(p, ())


def test_no_module_level_import_cycles():
    modules = _sources()
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        for name, at_top in _imports(path):
            target = _resolve(name, modules)
            if at_top and target and target != mod and not mod.startswith(target + "."):
                graph[mod].add(target)
    state: dict[str, int] = {}

    def visit(m: str, stack: list) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("module import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if not state.get(n):
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [m])


def test_core_and_algorithms_never_touch_modules_above_them():
    """The two rules the issue names, spelled out (they also follow from ALLOWED)."""
    modules = _sources()
    for mod, path in modules.items():
        part = _part(mod)
        for name, _ in _imports(path):
            target = _resolve(name, modules)
            if target is None:
                continue
            if part == "core":
                assert _part(target) in ("core", "_version"), f"{mod} imports {target}"
            if part == "algorithms":
                assert _part(target) not in ("engine", "nn", "models", "io"), f"{mod} imports {target}"
            if part in ("io", "files", "export"):
                assert target != "specquant", f"{mod} imports the package root"
