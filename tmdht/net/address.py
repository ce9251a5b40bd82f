"""Addresses of cluster sockets."""

from __future__ import annotations

__all__ = ["Address", "format_address"]

Address = tuple[str, int]
"""(IP literal, UDP port) of a socket: a node's data plane or its Kademlia socket."""


def format_address(address: Address) -> str:
    """``('127.0.0.1', 80)`` -> ``'127.0.0.1:80'`` (IPv6 hosts in brackets)."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
