"""tmdht.records (versioned soft-state records), their wire messages, and the vnet directory's
record formats (tmdht.vdirectory)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmdht import wire
from tmdht.auth import Authenticator, ClusterKey, KeyRing
from tmdht.errors import DecodeError, UsageError
from tmdht.records import MAX_ENTRIES_PER_KEY, MAX_VALUE_BYTES, RecordStatus, RecordStore
from tmdht.vdirectory import (
    decode_location,
    decode_member,
    encode_location,
    encode_member,
    location_key,
    network_key,
    newest_location,
)
from tmdht.vswitch import LocationRecord, MemberRecord

KEY = b"k" * 32
NOW = 1000.0
AUTH = Authenticator.keyed(KeyRing(ClusterKey(3, bytes(range(32)))))


def test_higher_versions_win_lower_ones_are_stale() -> None:
    store = RecordStore()
    assert store.put(KEY, 0, 2, 30, b"two", NOW) == (RecordStatus.STORED, 2)
    assert store.put(KEY, 0, 1, 30, b"one", NOW) == (RecordStatus.STALE, 2)
    assert store.put(KEY, 0, 2, 30, b"two", NOW + 1) == (RecordStatus.RENEWED, 2)
    assert store.put(KEY, 0, 3, 30, b"three", NOW + 2) == (RecordStatus.STORED, 3)
    [entry] = store.get(KEY, NOW + 2)
    assert (entry.entry_id, entry.version, entry.value) == (0, 3, b"three")


def test_leases_expire_and_take_the_version_with_them() -> None:
    store = RecordStore()
    store.put(KEY, 0, 5, 10, b"old", NOW)
    store.put(KEY, 1, 1, 30, b"other", NOW)
    assert {e.entry_id for e in store.get(KEY, NOW + 11)} == {1}
    assert store.put(KEY, 0, 1, 10, b"new", NOW + 11) == (RecordStatus.STORED, 1)
    store.sweep(NOW + 100)
    assert len(store) == 0 and store.get(KEY, NOW + 100) == []


def test_renewal_extends_the_lease() -> None:
    store = RecordStore()
    store.put(KEY, 0, 1, 10, b"v", NOW)
    store.put(KEY, 0, 1, 10, b"v", NOW + 8)
    assert store.get(KEY, NOW + 15)
    store.sweep(NOW + 15)
    assert len(store) == 1


def test_limits_refuse_instead_of_evicting() -> None:
    store = RecordStore(max_records=3)
    for entry in range(3):
        assert store.put(KEY, entry, 1, 10, b"", NOW)[0] is RecordStatus.STORED
    assert store.put(b"x" * 32, 0, 1, 10, b"", NOW) == (RecordStatus.FULL, 0)
    assert store.put(KEY, 0, 2, 10, b"", NOW)[0] is RecordStatus.STORED  # replacing is fine
    big = RecordStore()
    for entry in range(MAX_ENTRIES_PER_KEY):
        big.put(KEY, entry, 1, 10, b"", NOW)
    assert big.put(KEY, 999, 1, 10, b"", NOW)[0] is RecordStatus.FULL
    with pytest.raises(UsageError):
        big.put(KEY, 0, 1, 10, bytes(MAX_VALUE_BYTES + 1), NOW)
    with pytest.raises(UsageError):
        big.put(b"short", 0, 1, 10, b"", NOW)


U64 = st.integers(0, (1 << 64) - 1)
VALUES = st.binary(max_size=MAX_VALUE_BYTES)
RECORD_MESSAGES = st.one_of(
    st.builds(wire.RecordPut, request_id=U64, key=st.binary(min_size=32, max_size=32),
              entry_id=U64, version=U64, ttl_ms=st.integers(1, 3_600_000), value=VALUES),
    st.builds(wire.RecordPutResult, request_id=U64, status=st.sampled_from(list(RecordStatus)),
              version=U64),
    st.builds(wire.RecordGet, request_id=U64, key=st.binary(min_size=32, max_size=32)),
    st.builds(wire.Records, request_id=U64, entries=st.lists(
        st.builds(wire.RecordEntry, U64, U64, st.integers(0, 3_600_000), VALUES),
        max_size=MAX_ENTRIES_PER_KEY).map(tuple)),
)


@settings(max_examples=300, deadline=None)
@given(RECORD_MESSAGES)
def test_record_messages_round_trip_in_the_smallest_datagram(message: wire.Message) -> None:
    datagram = wire.encode(message, max_datagram=wire.MIN_DATAGRAM, auth=AUTH, now=NOW)
    decoded = wire.decode(datagram, max_datagram=wire.MIN_DATAGRAM,
                          auth=Authenticator.keyed(KeyRing(ClusterKey(3, bytes(range(32))))),
                          now=NOW)
    assert decoded == message


@settings(max_examples=300, deadline=None)
@given(RECORD_MESSAGES, st.data())
def test_bad_record_bodies_raise_decode_error(message: wire.Message,
                                              data: st.DataObject) -> None:
    datagram = bytearray(wire.encode(message, max_datagram=wire.MAX_DATAGRAM,
                                     auth=Authenticator.open_mode(), now=NOW))
    body = bytes(datagram[wire.HEADER_SIZE:-34])
    cut = data.draw(st.integers(0, max(0, len(body) - 1)))
    new_body = body[:cut] + data.draw(st.binary(max_size=5))
    header = bytes(datagram[:16]) + len(new_body).to_bytes(4, "big")
    forged = Authenticator.open_mode().seal(header + new_body, NOW)
    with contextlib.suppress(DecodeError):
        wire.decode(forged, max_datagram=wire.MAX_DATAGRAM, auth=Authenticator.open_mode(),
                    now=NOW)


def test_location_and_member_values_round_trip() -> None:
    value = encode_location(7, "10.0.0.1", 7410)
    assert decode_location(value, 3) == LocationRecord(7, "10.0.0.1", 7410, 3, False)
    assert decode_location(encode_location(7, "h", 1, gone=True), 4).gone
    assert decode_member(9, encode_member("h2", 7411, "dc-b")) == MemberRecord(9, "h2", 7411,
                                                                               "dc-b")
    for bad in (b"", b"\x02" + bytes(20), value + b"x", value[:-1]):
        with pytest.raises(DecodeError):
            decode_location(bad, 1)
    with pytest.raises(DecodeError):
        decode_member(0, encode_member("h", 1, "s"))


def test_newest_location_prefers_versions_then_agent_ids_and_skips_garbage() -> None:
    answers = [(1, encode_location(9, "a", 1)), (2, encode_location(3, "b", 1)),
               (2, encode_location(4, "c", 1)), (5, b"garbage")]
    best = newest_location(answers)
    assert best is not None and (best.agent, best.version) == (4, 2)
    assert newest_location([]) is None


def test_keys_separate_networks_and_kinds() -> None:
    mac = bytes.fromhex("525400000001")
    assert location_key(1, mac) != location_key(2, mac) != network_key(1)
    assert len(network_key(1)) == 32
    with pytest.raises(UsageError):
        location_key(1, b"short")
