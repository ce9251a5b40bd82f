"""Hostile input for the overlay: datagrams and node_info answers it must refuse."""

from __future__ import annotations

from typing import Any

import umsgpack

from tmdht.net.overlay import PeerInfo

BAD_DATAGRAMS = [
    b"",
    b"\x00",
    b"\x00" + b"m" * 20,  # header only
    b"\x04" + b"m" * 20 + umsgpack.packb(["ping", [b"x" * 20]]),  # unknown type byte (0x02/0x03: stamped frames)
    b"\x00" + b"m" * 20 + b"\xc1",  # reserved msgpack code
    b"\x00" + b"m" * 20 + b"\x91" * 8000 + b"\xc0",  # nesting deeper than the recursion limit
    b"\x00" + b"m" * 20 + b"\xdd\xff\xff\xff\xff",  # array header announcing 4 G items
    b"\x00" + b"m" * 20 + b"\xd9\x03\xff\xfe\xfd",  # invalid utf-8 in a str
    b"\x00" + b"m" * 20 + b"\xd4\x05\x00",  # ext type
    b"\x00" + b"m" * 20 + umsgpack.packb({"ping": 1}),  # body not [method, args]
    b"\x00" + b"m" * 20 + umsgpack.packb(["ping", [1]]),  # sender id not 20 bytes
    b"\x00" + b"m" * 20 + umsgpack.packb(["find_node", [b"x" * 20, b"short"]]),
    b"\x00" + b"m" * 20 + umsgpack.packb(["find_node", [b"x" * 20]]),  # missing argument
    b"\x00" + b"m" * 20 + umsgpack.packb(["node_info", [b"x" * 20, b"extra"]]),
    b"\x00" + b"m" * 30000,  # larger than any overlay message
]


def info_answer(node_id: bytes, **changes: Any) -> dict[str, Any]:
    """A valid node_info answer of ``node_id``, with some fields changed."""
    return {**PeerInfo(node_id, "", 7000, 0, "1").to_wire(), **changes}


BAD_NODE_INFO: list[Any] = [
    None,
    [1, 2],
    "node",
    info_answer(b"x" * 20, v=2),
    info_answer(b"x" * 20, v=True),
    info_answer(b"x" * 19),
    info_answer(b"x" * 20, data_port=0),
    info_answer(b"x" * 20, data_port=70000),
    info_answer(b"x" * 20, data_port=True),
    info_answer(b"x" * 20, data_port="7000"),
    info_answer(b"x" * 20, metrics_port=-1),
    info_answer(b"x" * 20, data_host="example.com"),
    info_answer(b"x" * 20, version="v" * 1000),
    info_answer(b"x" * 20, version=b"1"),
]
