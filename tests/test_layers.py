"""The layers stay apart: node, client and vnet never import each other, the core imports no other
layer, the shared asyncio skins (aio) only the core (scripts/import_graph.py --check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "import_graph.py"


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--root", str(root)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_layer_rules_hold() -> None:
    result = check(ROOT)
    assert result.returncode == 0, result.stdout


def test_the_graph_has_the_expected_edges() -> None:
    graph = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    edges = {line.split("  (")[0] for line in graph.splitlines()}
    assert {"node -> aio", "client -> aio", "aio -> core", "node -> core", "client -> core"} <= edges
    assert "vnet -> aio" in edges
    assert not {"node -> client", "client -> node", "core -> aio", "aio -> node", "vnet -> node",
                "vnet -> client", "lab -> vnet", "lab -> node"} & edges


@pytest.mark.parametrize(
    ("where", "code", "broken"),
    [
        ("node/x.py", "from tmdht.client.store import TemplateStoreClient\n", "node -> client"),
        ("client/x.py", "def f():\n    import tmdht.node.service\n", "client -> node"),
        ("client/x.py", "from ..node import storage\n", "client -> node"),
        ("tmdht/net/x.py", "from tmdht import aio\n", "core -> aio"),
        ("aio/x.py", "if True:\n    from tmdht.client import errors\n", "aio -> client"),
        ("vnet/x.py", "from tmdht.node.http import HealthServer\n", "vnet -> node"),
        ("lab/x.py", "from tmdht.vnet import control\n", "lab -> vnet"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path: Path, where: str, code: str, broken: str) -> None:
    for folder in ("tmdht/net", "aio", "node", "client", "vnet", "cli", "lab"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / where).write_text(code)
    result = check(tmp_path)
    assert result.returncode == 1 and f"({broken})" in result.stdout, result.stdout
