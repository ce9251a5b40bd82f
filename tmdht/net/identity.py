"""A node's identity: its 160-bit id, kept in ``<data dir>/node.json`` across restarts."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Final

from tmdht.errors import ConfigError
from tmdht.files import atomic_write
from tmdht.net.overlay import ID_SIZE

__all__ = ["NODE_FILE", "load_or_create_node_id"]

log = logging.getLogger("tmdht.net")

NODE_FILE: Final = "node.json"
"""Name of the identity file in the node's data directory."""
_NODE_FILE_FORMAT: Final = 1


def load_or_create_node_id(data_dir: Path) -> bytes:
    """The node's 160-bit id from ``data_dir/node.json``, drawn and saved on first use.

    The file is created atomically and never overwritten (hard link of a fsynced temp file), so
    two processes racing on one directory agree on one id. A damaged file raises ConfigError: a
    node must not silently take a new place in the ring.
    """
    path = data_dir / NODE_FILE
    try:
        return _read_node_file(path)
    except FileNotFoundError:
        pass
    node_id = secrets.token_bytes(ID_SIZE)
    text = json.dumps({"format": _NODE_FILE_FORMAT, "node_id": node_id.hex()}, indent=2) + "\n"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text, exclusive=True)
    except FileExistsError:
        return _read_node_file(path)  # another process won the race: use its id
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    log.info("new node id %s saved in %s", node_id.hex(), path)
    return node_id


def _read_node_file(path: Path) -> bytes:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read node id from {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _NODE_FILE_FORMAT:
        raise ConfigError(f"{path} is not a tmdht node file of format {_NODE_FILE_FORMAT}")
    hex_id = data.get("node_id")
    try:
        node_id = bytes.fromhex(hex_id) if isinstance(hex_id, str) else b""
    except ValueError:
        node_id = b""
    if len(node_id) != ID_SIZE:
        raise ConfigError(f"{path}: node_id must be {ID_SIZE * 2} hex digits")
    return node_id
