"""tmdht.net.credentials: re-reading a key file for a rotation step (SIGHUP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmdht.errors import ConfigError
from tmdht.net.credentials import ClusterCredentials

OLD, NEW = "11" * 32, "22" * 32


def test_reloaded_reads_the_file_again(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_text(f"1:{OLD}\n")
    first = ClusterCredentials.from_file(path)
    path.write_text(f"2:{NEW}\n1:{OLD}\n")
    again = first.reloaded(path)
    assert [k.key_id for k in again.keys] == [2, 1]
    assert again.overlay_key == bytes.fromhex(NEW)


@pytest.mark.parametrize(
    ("content", "why"),
    [(None, "No such file"), ("not a key\n", "cluster key file"), ("", "cluster key file")],
)
def test_a_bad_file_is_refused_with_the_reason(tmp_path: Path, content: str | None,
                                               why: str) -> None:
    path = tmp_path / "cluster.key"
    first = ClusterCredentials.from_key(OLD)
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=why):
        first.reloaded(path)


def test_keys_not_from_a_file_or_open_mode_cannot_reload(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_text(f"{NEW}\n")
    with pytest.raises(ConfigError, match="did not come from a file"):
        ClusterCredentials.from_key(OLD).reloaded(None)
    with pytest.raises(ConfigError, match="running open"):
        ClusterCredentials.open_mode().reloaded(path)
