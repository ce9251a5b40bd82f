"""The overlay's sans-IO half (tmdht.net.overlay, tmdht.net.identity): config, datagram
format, answer parsers, the node identity file."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.overlay import BAD_NODE_INFO, info_answer

from tmdht.errors import ConfigError, DecodeError
from tmdht.net.identity import NODE_FILE, load_or_create_node_id
from tmdht.net.overlay import (
    OverlayConfig,
    Request,
    Response,
    decode_datagram,
    derive_tag_key,
    encode_request,
    encode_response,
    parse_contacts,
    parse_peer_info,
)


def test_damaged_node_file_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / NODE_FILE
    for text in (
        "{not json",
        '{"format": 1, "node_id": "abcd"}',
        '{"format": 9, "node_id": ""}',
        "[]",
    ):
        path.write_text(text)
        with pytest.raises(ConfigError):
            load_or_create_node_id(tmp_path)
        assert path.read_text() == text
    path.unlink()
    created = load_or_create_node_id(tmp_path)
    assert load_or_create_node_id(tmp_path) == created
    assert [p.name for p in tmp_path.iterdir()] == [NODE_FILE]  # the temp file is gone


def test_config_is_validated() -> None:
    bad: list[dict[str, Any]] = [
        {"data_port": 0},
        {"data_port": 70000},
        {"data_port": 1, "host": "localhost"},
        {"data_port": 1, "seeds": (("10.0.0.1", 0),)},
        {"data_port": 1, "rpc_timeout": 0},
        {"data_port": 1, "max_failures": 0},
        {"data_port": 1, "ksize": 65},
        {"data_port": 1, "cluster_key": b"short"},
    ]
    for values in bad:
        with pytest.raises(ConfigError):
            OverlayConfig(**values)
    assert OverlayConfig(data_port=0, join=False).data_port == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_decoding_random_bytes_raises_only_decode_error(data: bytes) -> None:
    for datagram in (data, b"\x00" + b"m" * 20 + data, b"\x01" + b"m" * 20 + data):
        with contextlib.suppress(DecodeError):  # anything else fails the test
            decode_datagram(datagram)


@given(
    st.lists(
        st.one_of(st.binary(max_size=40), st.integers(0, 2**32), st.text(max_size=20)), max_size=8
    )
)
def test_encode_decode_round_trip(args: list[Any]) -> None:
    key = derive_tag_key(b"k" * 32)
    assert decode_datagram(encode_request(b"i" * 20, "find_node", args)) == Request(
        b"i" * 20, "find_node", tuple(args)
    )
    assert decode_datagram(encode_response(b"i" * 20, args, key), key) == Response(b"i" * 20, args)


def test_parsers_refuse_bad_answers() -> None:
    for raw in BAD_NODE_INFO:
        with pytest.raises(DecodeError):
            parse_peer_info(raw)
    assert parse_peer_info(info_answer(b"x" * 20, data_host="10.0.0.7")).data_host == "10.0.0.7"
    for raw in (
        [[b"x" * 20, "10.0.0.1"]],
        [[b"x" * 20, "host", 1]],
        [[b"x" * 20, "10.0.0.1", 0]],
        [[b"x", "10.0.0.1", 1]],
        {"a": 1},
        [[b"x" * 20, "10.0.0.1", 1]] * 65,
    ):
        with pytest.raises(DecodeError):
            parse_contacts(raw)
