"""The shipped sample configs, filled in for a test: every address in them is a placeholder that
cannot work (``REPLACE-...``), so a test must say which addresses to use instead, and never
runs anything from the file as it is."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

from tmdht.config import NodeConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_SAMPLE = REPO_ROOT / "deploy" / "systemd" / "node.toml"
PLACEHOLDER = "REPLACE-"
PLACEHOLDER_KEYS = frozenset({"advertise_host", "seeds"})
"""The settings of the sample that name addresses: each must be replaced to use the file."""


def fill_sample(text: str, **settings: Any) -> str:
    """The sample ``text`` with each ``key = value`` line of ``settings`` rewritten.

    Every placeholder must be replaced (else AssertionError, before anything can use the file),
    every key must already be in the sample once, and the result must be a valid node config.
    """
    missing = PLACEHOLDER_KEYS - set(settings)
    assert not missing, f"the sample's placeholders {sorted(missing)} need real values"
    for key, value in settings.items():
        pattern = re.compile(rf"^{re.escape(key)}\s*=.*$", re.M)
        assert len(pattern.findall(text)) == 1, f"{key} is not set once in the sample"
        text = pattern.sub(lambda _, k=key, v=value: f"{k} = {json.dumps(v)}", text)
    live = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    left = [line for line in live if PLACEHOLDER in line]
    assert not left, f"placeholders left: {left}"
    NodeConfig.from_sources(toml_text=text, flags={"data_dir": "/nonexistent"})
    return text


def unit_entries(text: str) -> dict[str, list[str]]:
    """'Section.Key' -> values, in order (repeated keys accumulate)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def check_key_reload(entries: dict[str, list[str]], tmp_path: Path, instance: str = "a") -> None:
    """A unit's `systemctl reload` must reach the key in /etc/tmdht, not the credential copied at
    start: ExecReload's first command (run as root, `+`) replaces the service's copy atomically
    with the runtime directory's owner and mode 0600, the second sends SIGHUP. Run with the paths
    moved under ``tmp_path`` (%t -> tmp_path/run, %i -> ``instance``)."""
    first, second = entries["Service.ExecReload"]
    assert second == """/bin/sh -c 'kill -HUP "$MAINPID"'"""  # no /bin/kill on a minimal system
    assert first.startswith("+")
    runtime = tmp_path / "run"

    def expand(line: str) -> str:
        return line.replace("%i", instance).replace("%t", str(runtime))

    source = tmp_path / "etc-cluster.key"
    folder = runtime / expand(entries["Service.RuntimeDirectory"][0])
    folder.mkdir(parents=True)
    key = folder / "cluster.key"
    key.write_text("1:" + "a" * 64 + "\n")
    # The service reads the copy the reload replaces.
    assert f"--cluster-key-file {key}" in expand(entries["Service.ExecStart"][0])
    source.write_text("2:" + "b" * 64 + "\n1:" + "a" * 64 + "\n")
    command = expand(first[1:]).replace("/etc/tmdht/cluster.key", str(source))
    subprocess.run(shlex.split(command), check=True, timeout=30)
    assert key.read_text() == source.read_text()
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.stat().st_uid == folder.stat().st_uid
    assert sorted(p.name for p in folder.iterdir()) == ["cluster.key"]  # no .new left behind
    # A missing source fails the reload (no SIGHUP follows) and leaves the copy as it was.
    source.unlink()
    before = key.read_text()
    failed = subprocess.run(shlex.split(command), timeout=30, capture_output=True, check=False)
    assert failed.returncode != 0
    assert key.read_text() == before
