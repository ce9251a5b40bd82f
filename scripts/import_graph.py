#!/usr/bin/env python3
"""Print the import graph between tmdht's layers, and check the rules that keep them apart.

    python scripts/import_graph.py            # the graph: layer -> layers it imports (modules)
    python scripts/import_graph.py --check    # exit 1, naming each offending import, if a rule
                                              # is broken
    python scripts/import_graph.py --modules  # every module-level edge instead of layers

Layers (the source folders, as pyproject.toml maps them): ``core`` (tmdht/, sans-IO: the
formats, the cluster layer tmdht.net, the migration cores), ``aio`` (aio/ -> tmdht.aio, the
asyncio skins node and client share), ``node``, ``client``, ``vnet`` (the virtual network
agent), ``cli``, ``lab``. Every import
counts, including those inside functions (lazy imports) and under ``TYPE_CHECKING``.

The rules: the core imports no other layer; aio imports only the core; node, client and vnet
import the core and aio, and never each other; lab imports only the core; cli may import
anything.
Only the standard library is needed (``ast``), so it runs without installing the project.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

LAYERS = {
    "tmdht": "core",
    "aio": "aio",
    "node": "node",
    "client": "client",
    "vnet": "vnet",
    "cli": "cli",
    "lab": "lab",
}
"""Source folder -> layer; each folder is the package tmdht.<folder> (tmdht/ itself: tmdht)."""
ALLOWED = {
    "core": set(),
    "aio": {"core"},
    "node": {"core", "aio"},
    "client": {"core", "aio"},
    "vnet": {"core", "aio"},
    "lab": {"core"},
    "cli": {"core", "aio", "node", "client", "vnet", "lab"},
}
"""Which other layers each layer may import."""


def module_name(root: Path, path: Path) -> str:
    """tmdht module name of a source file (aio/overlay.py -> tmdht.aio.overlay)."""
    folder, *rest = path.relative_to(root).with_suffix("").parts
    parts = [] if folder == "tmdht" else [folder]
    parts += [p for p in rest if p != "__init__"]
    return ".".join(["tmdht", *parts])


def layer_of(module: str) -> str | None:
    """The layer a tmdht module belongs to (None: not tmdht)."""
    parts = module.split(".")
    if parts[0] != "tmdht":
        return None
    return LAYERS.get(parts[1], "core") if len(parts) > 1 and parts[1] in LAYERS else "core"


def sources(root: Path) -> Iterator[tuple[str, Path]]:
    """(module, file) of every source file of every layer."""
    for folder in LAYERS:
        for path in sorted((root / folder).rglob("*.py")):
            yield module_name(root, path), path


def imports(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in a file, lazy ones included; ``known``: the
    tmdht modules (``from tmdht import wire`` imports the module tmdht.wire)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names]
            yield from ((n, node.lineno) for n in submodules if n in known)
            yield target, node.lineno


def edges(root: Path) -> list[tuple[str, str, Path, int]]:
    """(importing module, imported tmdht module, file, line) for every import between modules."""
    out = []
    files = list(sources(root))
    known = {module for module, _ in files}
    for module, path in files:
        for target, line in imports(module, path, known):
            if layer_of(target) is not None and target != module:
                out.append((module, target, path, line))
    return out


def violations(root: Path) -> list[str]:
    """Every import that breaks a layer rule, as ``file:line: a imports b (x -> y)``."""
    found = []
    for module, target, path, line in edges(root):
        src, dst = layer_of(module), layer_of(target)
        assert src is not None and dst is not None
        if src != dst and dst not in ALLOWED[src]:
            where = path.relative_to(root)
            found.append(f"{where}:{line}: {module} imports {target} ({src} -> {dst})")
    return sorted(set(found))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--check", action="store_true", help="exit 1 if a layer rule is broken")
    parser.add_argument("--modules", action="store_true", help="print module-level edges")
    args = parser.parse_args()
    if args.check:
        broken = violations(args.root)
        for line in broken:
            print(line)
        print(f"{len(broken)} imports break the layer rules" if broken else "layer rules hold")
        return 1 if broken else 0
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for module, target, _, _ in edges(args.root):
        if args.modules:
            graph[module][target].add(module)
        else:
            src, dst = layer_of(module), layer_of(target)
            assert src is not None and dst is not None
            if src != dst:
                graph[src][dst].add(module)
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            users = graph[src][dst]
            print(f"{src} -> {dst}" + ("" if args.modules else f"  ({len(users)} modules)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
