"""tmdht.tunnel: round trips (authenticated and encrypted), fuzzing, keys, replay, limits."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmdht import tunnel, wire
from tmdht.auth import AuthenticationError, Authenticator, ClusterKey, KeyRing, ReplayError
from tmdht.errors import DecodeError, UsageError
from tmdht.ethernet import MAX_FRAME, MIN_FRAME
from tmdht.tunnel import (
    DATAGRAM_OVERHEAD,
    MAX_FLOWS,
    MAX_SACK_RANGES,
    Abort,
    Frame,
    FrameFlags,
    HandoverAck,
    HandoverBegin,
    HandoverFrame,
    Hello,
    InvalidMessageError,
    Location,
    LocationFlags,
    Prepare,
    PrepareReply,
    PrepareStatus,
    Security,
    TunnelCodec,
)

NOW = 1_700_000_000.0
KEYS = [ClusterKey(1, bytes(range(32)))]
U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)
MACS = st.binary(min_size=6, max_size=6)
FRAMES = st.binary(min_size=MIN_FRAME, max_size=200) | st.binary(min_size=MAX_FRAME,
                                                                  max_size=MAX_FRAME)
HOSTS = st.text("abcdefghijklmnopqrstuvwxyz0123456789.-:", max_size=tunnel.MAX_HOST_BYTES)
SITES = st.text("abcxyz-_0123", max_size=tunnel.MAX_SITE_BYTES)
FLAGS = st.sampled_from([0, 1, 2, 3])


@st.composite
def acks(draw: st.DrawFn) -> HandoverAck:
    acked = draw(st.integers(0, 1 << 40))
    ranges, low = [], acked + 1
    for _ in range(draw(st.integers(0, MAX_SACK_RANGES))):
        first = low + 1 + draw(st.integers(0, 50))
        last = first + draw(st.integers(0, 50))
        ranges.append((first, last))
        low = last + 1
    return HandoverAck(handover=draw(U64), acked=acked, resumed=draw(st.booleans()),
                       version=draw(U64), ranges=tuple(ranges))


MESSAGES = st.one_of(
    st.builds(Frame, vnet=U32, origin=U64, seq=U64, src_version=U64, fence=U64, flags=FLAGS,
              frame=FRAMES),
    st.builds(HandoverBegin, handover=U64, vnet=U32, mac=MACS, version=U64,
              flows=st.lists(st.tuples(U64, U64), max_size=MAX_FLOWS).map(tuple)),
    st.builds(HandoverFrame, handover=U64, hseq=st.integers(1, (1 << 64) - 1), origin=U64,
              seq=U64, flags=FLAGS, frame=FRAMES),
    acks(),
    st.builds(Prepare, handover=U64, vnet=U32, mac=MACS),
    st.builds(PrepareReply, handover=U64, status=st.sampled_from(list(PrepareStatus)),
              version=U64),
    st.builds(Location, vnet=U32, mac=MACS, agent=U64, version=U64,
              flags=st.sampled_from([LocationFlags(0), LocationFlags.GONE,
                                     LocationFlags.NOT_HERE]), host=HOSTS,
              port=st.integers(0, 65535)),
    st.builds(Hello, vnet=U32, leaving=st.booleans(), host=HOSTS, port=st.integers(0, 65535),
              site=SITES),
    st.builds(Abort, handover=U64),
)


def codecs(keys: list[ClusterKey] | None = KEYS) -> tuple[TunnelCodec, TunnelCodec]:
    return TunnelCodec(11, keys), TunnelCodec(22, keys)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES, st.booleans())
def test_round_trip(message: tunnel.Message, encrypt: bool) -> None:
    sender, receiver = codecs()
    datagram = sender.encode(message, now=NOW, encrypt=encrypt)
    envelope = receiver.decode(datagram, now=NOW)
    assert envelope.message == message
    assert envelope.sender == 11
    assert envelope.security is (Security.ENCRYPTED if encrypt else Security.AUTHENTICATED)
    assert len(datagram) >= DATAGRAM_OVERHEAD


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES)
def test_open_mode_round_trip(message: tunnel.Message) -> None:
    sender, receiver = codecs(None)
    assert receiver.decode(sender.encode(message, now=NOW), now=NOW).message == message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES, st.booleans(), st.data())
def test_any_corruption_raises_decode_error(message: tunnel.Message, encrypt: bool,
                                            data: st.DataObject) -> None:
    sender, receiver = codecs()
    datagram = bytearray(sender.encode(message, now=NOW, encrypt=encrypt))
    position = data.draw(st.integers(0, len(datagram) - 1))
    datagram[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(DecodeError):
        receiver.decode(bytes(datagram), now=NOW)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    for receiver in (codecs()[1], codecs(None)[1]):
        with pytest.raises(DecodeError):
            receiver.decode(data, now=NOW)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES, st.data())
def test_bodies_of_authentic_datagrams_decode_or_raise_decode_error(
        message: tunnel.Message, data: st.DataObject) -> None:
    """A sender with the key but a broken encoder: whatever the body, only DecodeError."""
    sender, receiver = codecs()
    datagram = sender.encode(message, now=NOW)
    header, body = datagram[:tunnel.HEADER_SIZE], datagram[tunnel.HEADER_SIZE:-34]
    new_body = data.draw(st.binary(max_size=80) | st.just(body[: len(body) // 2]))
    header = header[:12] + struct.pack(">H", len(new_body))
    forged = sender.auth.seal(header + new_body, NOW)
    with contextlib.suppress(DecodeError):
        receiver.decode(forged, now=NOW)


def test_replayed_datagrams_are_refused() -> None:
    sender, receiver = codecs()
    for encrypt in (False, True):
        datagram = sender.encode(Abort(handover=5), now=NOW, encrypt=encrypt)
        receiver.decode(datagram, now=NOW)
        with pytest.raises(ReplayError):
            receiver.decode(datagram, now=NOW)


def test_wrong_key_and_mode_mismatches_are_refused() -> None:
    other = [ClusterKey(1, bytes(32))]
    sender, _ = codecs()
    stranger = TunnelCodec(33, other)
    open_sender, open_receiver = codecs(None)
    for encrypt in (False, True):
        with pytest.raises(AuthenticationError):
            stranger.decode(sender.encode(Abort(handover=1), now=NOW, encrypt=encrypt), now=NOW)
        with pytest.raises(AuthenticationError):
            open_receiver.decode(sender.encode(Abort(handover=1), now=NOW, encrypt=encrypt),
                                 now=NOW)
    with pytest.raises(AuthenticationError):
        sender.decode(open_sender.encode(Abort(handover=1), now=NOW), now=NOW)
    with pytest.raises(UsageError):
        open_sender.encode(Abort(handover=1), now=NOW, encrypt=True)


def test_replaced_keys_take_effect_and_forget_cached_ciphers() -> None:
    """A re-read key file (SIGHUP) replaces the codec's keys; a key id that now names another
    secret is not decrypted with the cipher cached for the old one."""
    sender, receiver = codecs()
    # The receiver caches key 1's cipher for sender 11.
    receiver.decode(sender.encode(Abort(handover=1), now=NOW, encrypt=True), now=NOW)
    rotated = [ClusterKey(1, bytes(range(1, 33)))]
    sender.replace_keys(rotated)
    with pytest.raises(AuthenticationError):  # the receiver still has the old key 1
        receiver.decode(sender.encode(Abort(handover=2), now=NOW, encrypt=True), now=NOW)
    receiver.replace_keys(rotated)
    envelope = receiver.decode(sender.encode(Abort(handover=3), now=NOW, encrypt=True), now=NOW)
    assert envelope.message == Abort(handover=3)
    with pytest.raises(UsageError):
        TunnelCodec(33, None).replace_keys(KEYS)


def test_tunnel_tags_are_not_valid_on_the_store_data_plane() -> None:
    """The tunnel derives its own keys: a tunnel datagram is no cluster datagram (and the tag
    of the same bytes differs)."""
    sender, _ = codecs()
    datagram = sender.encode(Abort(handover=1), now=NOW)
    node = Authenticator.keyed(KeyRing(KEYS[0]))
    with pytest.raises(AuthenticationError):
        node.open(datagram, NOW)
    assert tunnel.tunnel_keys(KEYS)[0].tag_key != KEYS[0].tag_key
    with pytest.raises(DecodeError):
        wire.decode(datagram, max_datagram=wire.MAX_DATAGRAM, auth=node, now=NOW)


def test_encryption_hides_the_frame() -> None:
    sender, receiver = codecs()
    payload = b"\x52\x54\x00\x00\x00\x01" * 2 + b"\x08\x00" + b"secret guest data" * 4
    message = Frame(vnet=1, origin=1, seq=1, src_version=0, fence=0, flags=0, frame=payload)
    assert b"secret guest data" in sender.encode(message, now=NOW)
    sealed = sender.encode(message, now=NOW, encrypt=True)
    assert b"secret guest data" not in sealed
    assert receiver.decode(sealed, now=NOW).message == message


def test_per_sender_keys_make_nonce_collisions_harmless() -> None:
    """Two agents drawing the same nonce encrypt with different keys."""
    a, b = TunnelCodec(1, KEYS), TunnelCodec(2, KEYS)
    a._nonce = b._nonce = lambda: 42  # type: ignore[method-assign]
    message = Abort(handover=9)
    da, db = a.encode(message, now=NOW, encrypt=True), b.encode(message, now=NOW, encrypt=True)
    assert da[tunnel.HEADER_SIZE:] != db[tunnel.HEADER_SIZE:]


@pytest.mark.parametrize("bad", [
    lambda: Frame(vnet=1 << 32, origin=1, seq=1, src_version=0, fence=0, flags=0,
                  frame=bytes(14)),
    lambda: Frame(vnet=1, origin=1, seq=1, src_version=0, fence=0, flags=4, frame=bytes(14)),
    lambda: Frame(vnet=1, origin=1, seq=1, src_version=0, fence=0, flags=0, frame=bytes(13)),
    lambda: Frame(vnet=1, origin=1, seq=1, src_version=0, fence=0, flags=0,
                  frame=bytes(MAX_FRAME + 1)),
    lambda: HandoverFrame(handover=1, hseq=0, origin=1, seq=1, flags=0, frame=bytes(14)),
    lambda: HandoverBegin(handover=1, vnet=1, mac=bytes(6), version=1,
                          flows=((1, 1),) * (MAX_FLOWS + 1)),
    lambda: HandoverAck(handover=1, acked=5, resumed=False, version=0, ranges=((6, 7),)),
    lambda: HandoverAck(handover=1, acked=5, resumed=False, version=0,
                        ranges=((8, 9), (9, 12))),
    lambda: Location(vnet=1, mac=bytes(5), agent=1, version=1, flags=LocationFlags(0),
                     host="h", port=1),
    lambda: Hello(vnet=1, leaving=False, host="h" * 65, port=1, site="a"),
    lambda: Hello(vnet=1, leaving=False, host="h", port=1, site="é"),
])
def test_constructors_refuse_values_the_format_cannot_carry(bad: object) -> None:
    with pytest.raises(InvalidMessageError):
        bad()  # type: ignore[operator]


def test_unknown_type_version_and_reserved_byte_are_refused() -> None:
    sender, receiver = codecs()
    good = sender.encode(Abort(handover=1), now=NOW)
    for offset, value in ((0, 2), (1, 99), (3, 1)):
        header = bytearray(good[:tunnel.HEADER_SIZE])
        header[offset] = value
        forged = sender.auth.seal(bytes(header) + good[tunnel.HEADER_SIZE:-34], NOW)
        with pytest.raises(DecodeError):
            receiver.decode(forged, now=NOW)


def test_trusted_frame_equals_a_validated_one() -> None:
    fields = dict(vnet=3, origin=4, seq=5, src_version=6, fence=7,
                  flags=int(FrameFlags.FLOODED), frame=bytes(60))
    assert Frame.trusted(**fields) == Frame(**fields)  # type: ignore[arg-type]
    assert dataclasses.asdict(Frame.trusted(**fields)) == fields  # type: ignore[arg-type]
