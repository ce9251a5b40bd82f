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

from tmdht.auth import ReplayWindow
from tmdht.errors import (
    ClockSkewError,
    ConfigError,
    DecodeError,
    ReplayError,
    UnauthenticatedError,
)
from tmdht.net.identity import NODE_FILE, load_or_create_node_id
from tmdht.net.overlay import (
    STAMP_SIZE,
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


def test_stamped_frames_round_trip_and_replays_are_refused() -> None:
    """Version 2 frames carry a replay stamp under the tag; version 1 frames still decode."""
    key = derive_tag_key(b"k" * 32)
    now = 1_800_000_000.0
    stamp = (int(now * 1000), 5)
    window = ReplayWindow(window=10)
    request = encode_request(b"i" * 20, "ping", [b""], key, stamp)
    assert request[0] == 0x02 and len(request) == len(encode_request(b"i" * 20, "ping", [b""],
                                                                      key)) + STAMP_SIZE
    assert decode_datagram(request, key, replay=window, now=now) == Request(
        b"i" * 20, "ping", (b"",), stamped=True
    )
    with pytest.raises(ReplayError):
        decode_datagram(request, key, replay=window, now=now + 1)  # the same nonce again
    with pytest.raises(ClockSkewError):  # stale: outside the window
        decode_datagram(encode_request(b"i" * 20, "ping", [b""], key, (stamp[0], 6)), key,
                        replay=window, now=now + 11)
    tampered = bytearray(request)
    tampered[21] ^= 1  # the timestamp is under the tag
    with pytest.raises(UnauthenticatedError):
        decode_datagram(bytes(tampered), key, replay=window, now=now)
    answer = encode_response(b"i" * 20, [1, 2], key, (stamp[0], 9))
    assert answer[0] == 0x03
    assert decode_datagram(answer, key, replay=window, now=now) == Response(
        b"i" * 20, [1, 2], stamped=True
    )
    legacy = encode_request(b"j" * 20, "ping", [b""], key)
    assert decode_datagram(legacy, key, replay=window, now=now).stamped is False
    with pytest.raises(ReplayError):
        decode_datagram(legacy, key, replay=window, now=now, require_stamped=True)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decoding_random_stamped_bytes_raises_only_decode_error(data: bytes) -> None:
    window = ReplayWindow(window=10)
    for datagram in (b"\x02" + b"m" * 20 + data, b"\x03" + b"m" * 20 + data):
        with contextlib.suppress(DecodeError):
            decode_datagram(datagram, replay=window, now=1_800_000_000.0)


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
