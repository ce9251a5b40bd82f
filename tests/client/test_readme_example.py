"""The README's client example runs as pasted, against a real cluster."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from support.cluster import FAST_NODE_ARGS

from tmdht.node.local import LocalCluster
from tmdht.pages import digest_page

README = Path(__file__).resolve().parents[2] / "README.md"


def client_example() -> str:
    section = README.read_text().split("## The client library", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block under 'The client library'"
    return match.group(1)


def test_readme_client_example_runs_as_pasted(tmp_path: Path) -> None:
    code = client_example()
    assert "from tmdht.client import" in code and "asyncio.run(main(" in code
    (tmp_path / "example.py").write_text(code)
    with LocalCluster(tmp_path / "cluster", 3, extra_args=FAST_NODE_ARGS) as cluster:
        proc = subprocess.run(
            [sys.executable, "example.py", "{}:{}".format(*cluster.seed), str(cluster.key_file)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    unknown = digest_page(b"a page nobody stored".ljust(4096, b".")).hex()
    assert proc.stdout.splitlines() == [
        "stored 1 page(s): 3 new replica copies",
        "resolved 1, unavailable 1",
        "3 members",
        f"get_many: 1 pages unavailable from every replica (first {unknown[:16]})",
    ]
