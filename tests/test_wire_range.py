"""RANGE_HASH / RANGE_HASHES (anti-entropy range hashes) in the wire format."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmdht import wire
from tmdht.auth import AUTH_OVERHEAD, Authenticator
from tmdht.errors import DecodeError
from tmdht.wire import (
    MAX_BUCKET_BITS,
    MAX_DATAGRAM,
    MIN_DATAGRAM,
    InvalidMessageError,
    MessageDecodeError,
    RangeHashes,
    RangeHashQuery,
)

OPEN = Authenticator.open_mode()
_HEADER = struct.Struct(">BBHQHHI")


def encode(msg: wire.Message, max_datagram: int = MAX_DATAGRAM) -> bytes:
    return wire.encode(msg, max_datagram=max_datagram, auth=OPEN, now=0.0)


def decode(data: bytes, max_datagram: int = MAX_DATAGRAM) -> wire.Message:
    return wire.decode(data, max_datagram=max_datagram, auth=OPEN, now=0.0)


@st.composite
def ranges(draw: st.DrawFn, max_groups: int) -> tuple[int, int, int, int]:
    bucket_bits = draw(st.integers(1, 16))
    group_bits = draw(st.integers(0, min(bucket_bits, 8)))
    total = 1 << (bucket_bits - group_bits)
    groups = draw(st.integers(1, min(total, max_groups)))
    first = draw(st.integers(0, total - groups)) << group_bits
    return bucket_bits, group_bits, first, groups


@st.composite
def queries(draw: st.DrawFn) -> RangeHashQuery:
    bucket_bits, group_bits, first, groups = draw(ranges(64))
    bits = groups << group_bits
    value = draw(st.integers(0, (1 << bits) - 1))
    return RangeHashQuery(
        request_id=draw(st.integers(0, 2**64 - 1)), bucket_bits=bucket_bits,
        group_bits=group_bits, first=first, groups=groups,
        mask=value.to_bytes((bits + 7) // 8, "little"),
    )


@st.composite
def answers(draw: st.DrawFn) -> RangeHashes:
    bucket_bits, group_bits, first, groups = draw(ranges(200))
    entries = draw(
        st.lists(
            st.tuples(st.integers(0, 2**32 - 1), st.binary(min_size=32, max_size=32)),
            min_size=groups, max_size=groups,
        )
    )
    return RangeHashes(request_id=draw(st.integers(0, 2**64 - 1)), bucket_bits=bucket_bits,
                       group_bits=group_bits, first=first, entries=tuple(entries))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(queries(), answers()))
def test_roundtrip(msg: wire.Message) -> None:
    datagram = encode(msg)
    decoded = decode(datagram)
    assert decoded == msg
    assert dataclasses.replace(decoded) == decoded
    end = len(datagram) - AUTH_OVERHEAD
    assert encode(decoded)[:end] == datagram[:end]  # canonical (the auth block aside)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(queries(), answers()), st.data())
def test_mutated_datagrams_decode_or_raise_decode_error(msg: wire.Message, data: st.DataObject) -> None:
    datagram = bytearray(encode(msg))
    body_end = len(datagram) - AUTH_OVERHEAD
    at = data.draw(st.integers(20, max(20, body_end - 1)))
    datagram[at] = data.draw(st.integers(0, 255))
    try:
        decoded = decode(bytes(datagram))
    except DecodeError:
        return
    assert dataclasses.replace(decoded) == decoded


def _query(**changes: object) -> RangeHashQuery:
    fields: dict[str, object] = dict(
        request_id=7, bucket_bits=16, group_bits=12, first=0, groups=16, mask=b"\xff" * 8192
    )
    fields.update(changes)
    return RangeHashQuery(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"bucket_bits": 0},
        {"bucket_bits": MAX_BUCKET_BITS + 1},
        {"group_bits": 17},
        {"groups": 0, "mask": b""},
        {"first": 1},  # not aligned to the group size
        {"first": 4096},  # runs past the key space
        {"mask": b"\xff" * 8191},
        {"groups": 1, "group_bits": 2, "mask": b"\x10"},  # an unused bit set
    ],
)
def test_bad_queries_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidMessageError):
        _query(**changes)


def test_bad_answers_are_refused() -> None:
    with pytest.raises(InvalidMessageError):
        RangeHashes(request_id=1, bucket_bits=16, group_bits=0, first=0, entries=((1, b"x"),))
    with pytest.raises(InvalidMessageError):
        RangeHashes(request_id=1, bucket_bits=16, group_bits=0, first=0, entries=())
    with pytest.raises(InvalidMessageError):
        RangeHashes(request_id=1, bucket_bits=16, group_bits=0, first=0,
                    entries=((2**32, bytes(32)),))


def test_decoding_a_short_mask_is_a_message_decode_error() -> None:
    datagram = bytearray(encode(_query(groups=1, group_bits=3, mask=b"\x01")))
    # Claim 2 groups (16 bits, two mask bytes) while one byte follows.
    datagram[20 + 6 : 20 + 8] = (2).to_bytes(2, "big")
    with pytest.raises(MessageDecodeError) as caught:
        decode(bytes(datagram))
    assert caught.value.request_id == 7


def test_limits_size_queries_to_one_datagram() -> None:
    for max_datagram in (MIN_DATAGRAM, 32768, MAX_DATAGRAM):
        groups = wire.max_range_groups(max_datagram)
        answer = RangeHashes(request_id=1, bucket_bits=16, group_bits=0, first=0,
                             entries=((1, bytes(32)),) * groups)
        assert len(encode(answer, max_datagram)) <= max_datagram
        mask_bytes = wire.max_range_mask_bytes(max_datagram)
        bits = 1 << (mask_bytes * 8).bit_length() - 1  # the largest power of two that fits
        group_bits = min(16, bits.bit_length() - 1)
        query = _query(group_bits=group_bits, groups=1, mask=b"\xff" * ((1 << group_bits) // 8))
        assert len(encode(query, max_datagram)) <= max_datagram
