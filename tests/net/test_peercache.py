"""The peer cache file format: bounded, strict, round-trips."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tmdht.errors import DecodeError
from tmdht.net.membership import Member
from tmdht.net.peercache import (
    MAX_CACHED_PEERS,
    CachedPeer,
    decode_peer_cache,
    encode_peer_cache,
    to_cache,
)


def member(i: int, seen: float) -> Member:
    return Member(bytes([i]) * 20, "10.0.0.1", 4000 + i, "10.0.0.1", 5000 + i, 0, "1", seen)


def test_the_cache_keeps_the_most_recently_heard_others_bounded() -> None:
    me = bytes([0]) * 20
    members = [member(i, seen=float(i)) for i in range(100)]
    peers = to_cache(members, me)
    assert len(peers) == MAX_CACHED_PEERS
    assert peers[0] == CachedPeer(bytes([99]) * 20, "10.0.0.1", 4099)
    assert me not in {p.node_id for p in peers}
    assert decode_peer_cache(encode_peer_cache(peers)) == peers


@pytest.mark.parametrize(
    "doc",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        json.dumps({"format": "other", "version": 1, "peers": []}).encode(),
        json.dumps({"format": "tmdht-peers", "version": 2, "peers": []}).encode(),
        json.dumps({"format": "tmdht-peers", "version": 1, "peers": {}}).encode(),
        json.dumps(
            {"format": "tmdht-peers", "version": 1, "peers": [{"id": "ab", "host": "1.2.3.4"}]}
        ).encode(),
        json.dumps(
            {
                "format": "tmdht-peers",
                "version": 1,
                "peers": [{"id": "00" * 20, "host": "example.org", "port": 1}],
            }
        ).encode(),
        json.dumps(
            {
                "format": "tmdht-peers",
                "version": 1,
                "peers": [{"id": "00" * 20, "host": "::1", "port": 70000}],
            }
        ).encode(),
        json.dumps(
            {
                "format": "tmdht-peers",
                "version": 1,
                "peers": [{"id": "00" * 20, "host": "::1", "port": 1}] * (MAX_CACHED_PEERS + 1),
            }
        ).encode(),
        b" " * (64 * 1024 + 1),
    ],
)
def test_anything_else_is_a_decode_error(doc: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_peer_cache(doc)


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_peer_cache(data)
