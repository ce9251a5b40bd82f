"""Tests for tmdht.wire: round trips, fuzzing, limits, multi-part packing, authentication, bulk."""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmdht import wire
from tmdht.auth import (
    AUTH_OVERHEAD,
    AuthenticationError,
    Authenticator,
    ClusterKey,
    KeyRing,
    ReplayError,
)
from tmdht.errors import DecodeError, IntegrityError, LimitExceededError, UsageError
from tmdht.pages import (
    DIGEST_SIZE,
    PAGE_SIZE,
    ZERO_PAGE,
    ByteView,
    PageDigest,
    check_page,
    digest_page,
)
from tmdht.wire import (
    DATAGRAM_OVERHEAD,
    MAX_DATAGRAM,
    MIN_DATAGRAM,
    Error,
    ErrorCode,
    GetPages,
    Has,
    Have,
    Message,
    MessageDecodeError,
    MessageType,
    NodeFlags,
    NodeInfo,
    NodeInfoRequest,
    Pages,
    PutPages,
    PutResult,
    PutStatus,
)

NOW = 1_700_000_000.0
OPEN = Authenticator.open_mode()
KEY = ClusterKey(7, bytes(range(32)))
SIZES = [MIN_DATAGRAM, 9000, 16384, MAX_DATAGRAM]
_HEADER = struct.Struct(">BBHQHHI")


def keyed() -> Authenticator:
    return Authenticator.keyed(KeyRing(KEY))


def encode(msg: Message, max_datagram: int = MAX_DATAGRAM, auth: Authenticator = OPEN) -> bytes:
    return wire.encode(msg, max_datagram=max_datagram, auth=auth, now=NOW)


def decode(data: ByteView, max_datagram: int = MAX_DATAGRAM, auth: Authenticator = OPEN) -> Message:
    return wire.decode(data, max_datagram=max_datagram, auth=auth, now=NOW)


def digest_of(index: int) -> PageDigest:
    return PageDigest(blake3(index.to_bytes(4, "big")).digest())


def page_of(index: int) -> bytes:
    return blake3(b"page" + index.to_bytes(4, "big")).digest(length=PAGE_SIZE)


def frame(
    message_type: int,
    body: bytes,
    *,
    bulk: bytes = b"",
    version: int = wire.PROTOCOL_VERSION,
    flags: int = 0,
    request_id: int = 99,
    part: int = 0,
    parts: int = 1,
    body_length: int | None = None,
    auth: Authenticator = OPEN,
) -> bytes:
    """A hand-made datagram (open mode unless ``auth`` says otherwise)."""
    length = len(body) if body_length is None else body_length
    header = _HEADER.pack(version, message_type, flags, request_id, part, parts, length)
    return auth.seal(header + body, NOW) + bulk


def one_digest_body() -> bytes:
    return struct.pack(">H", 1) + digest_of(0)


def sealed_end(datagram: bytes) -> int:
    """Where the auth block of a well-formed datagram ends (and its bulk starts)."""
    (body_length,) = struct.unpack_from(">I", datagram, 16)
    return int(DATAGRAM_OVERHEAD + body_length)


def without_auth(datagram: bytes) -> bytes:
    """Header, body and bulk: what must be canonical (the auth block differs per seal)."""
    end = sealed_end(datagram)
    return datagram[: end - AUTH_OVERHEAD] + datagram[end:]


# --- strategies ------------------------------------------------------------------------------

request_ids = st.integers(0, 2**64 - 1)
digests = st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE).map(PageDigest)
# 4096-byte pages from short seeds (hypothesis' buffer could not hold many raw pages).
pages = st.one_of(
    st.just(ZERO_PAGE),
    st.binary(max_size=8).map(lambda seed: blake3(seed).digest(length=PAGE_SIZE)),
)
page_pairs = st.tuples(digests, pages)


@st.composite
def part_of_parts(draw: st.DrawFn) -> tuple[int, int]:
    parts = draw(st.integers(1, 0xFFFF))
    return draw(st.integers(0, parts - 1)), parts


def responses_with_parts(builder: st.SearchStrategy[Any]) -> st.SearchStrategy[Message]:
    """Multi-part responses at any valid (part, parts)."""
    return st.tuples(builder, part_of_parts()).map(
        lambda pair: dataclasses.replace(pair[0], part=pair[1][0], parts=pair[1][1])
    )


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(GetPages, request_id=request_ids, digests=st.lists(digests, min_size=1, max_size=40)),
    responses_with_parts(
        st.builds(
            Pages,
            request_id=request_ids,
            pages=st.lists(page_pairs, max_size=3),
            missing=st.lists(digests, max_size=20),
        )
    ),
    st.builds(PutPages, request_id=request_ids, pages=st.lists(page_pairs, min_size=1, max_size=3)),
    responses_with_parts(
        st.builds(
            PutResult,
            request_id=request_ids,
            results=st.lists(st.tuples(digests, st.sampled_from(PutStatus)), max_size=20),
        )
    ),
    st.builds(Has, request_id=request_ids, digests=st.lists(digests, min_size=1, max_size=40)),
    responses_with_parts(
        st.builds(
            Have,
            request_id=request_ids,
            held=st.lists(st.booleans(), max_size=300),
            first=st.integers(0, 0xFFFF - 300),
        )
    ),
    st.builds(NodeInfoRequest, request_id=request_ids),
    st.builds(
        NodeInfo,
        request_id=request_ids,
        node_id=st.binary(min_size=20, max_size=20),
        data_address=st.tuples(
            st.text(st.characters(max_codepoint=127), min_size=1, max_size=253),
            st.integers(1, 0xFFFF),
        ),
        kademlia_port=st.integers(1, 0xFFFF),
        metrics_port=st.integers(0, 0xFFFF),
        version=st.text(max_size=16),
        pages_stored=st.integers(0, 2**64 - 1),
        bytes_stored=st.integers(0, 2**64 - 1),
        capacity_bytes=st.integers(0, 2**64 - 1),
        flags=st.integers(0, 2**32 - 1).map(NodeFlags),
    ),
    st.builds(
        Error,
        request_id=request_ids,
        code=st.sampled_from(ErrorCode),
        message=st.text(max_size=100).filter(lambda text: len(text.encode()) <= 512),
    ),
)


def check_decoded(datagram: bytes, msg: Message) -> None:
    """What every successful decode must satisfy: valid, canonical."""
    assert dataclasses.replace(msg) == msg  # passes its own validation
    assert without_auth(encode(msg)) == without_auth(datagram)


def decode_or_none(datagram: bytes, auth: Authenticator = OPEN) -> Message | None:
    """Decode; None on DecodeError. Any other exception fails the test."""
    try:
        msg = decode(datagram, auth=auth)
    except DecodeError:
        return None
    check_decoded(datagram, msg)
    return msg


# --- round trips -----------------------------------------------------------------------------


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_roundtrip_open(msg: Message) -> None:
    datagram = encode(msg)
    assert len(datagram) <= MAX_DATAGRAM
    decoded = decode(datagram)
    assert decoded == msg
    assert type(decoded) is type(msg)
    check_decoded(datagram, decoded)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_roundtrip_keyed(msg: Message) -> None:
    assert decode(encode(msg, auth=keyed()), auth=keyed()) == msg


def test_decoded_pages_are_bytes() -> None:
    page = page_of(1)
    msg = decode(encode(Pages(request_id=1, pages=((digest_page(page), page),))))
    assert isinstance(msg, Pages)
    digest, data = msg.pages[0]
    assert type(digest) is bytes
    assert type(data) is bytes
    assert digest_page(data) == digest


def test_decode_accepts_bytearray_and_memoryview() -> None:
    datagram = encode(GetPages(request_id=3, digests=(digest_of(1),)))
    assert decode(bytearray(datagram)) == decode(datagram)
    assert decode(memoryview(datagram)) == decode(datagram)


def test_node_info_keeps_unknown_flags() -> None:
    info = NodeInfo(
        request_id=1,
        node_id=bytes(20),
        data_address=("10.0.0.1", 7000),
        kademlia_port=8468,
        metrics_port=0,
        version="0.1.0",
        pages_stored=1,
        bytes_stored=4096,
        capacity_bytes=1 << 40,
        flags=NodeFlags.DRAINING | NodeFlags(0x80),
    )
    decoded = decode(encode(info))
    assert isinstance(decoded, NodeInfo)
    assert NodeFlags.DRAINING in decoded.flags
    assert decoded.flags == 0x81


# --- fuzzing: anything bad raises only DecodeError -------------------------------------------


@settings(max_examples=1000)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_decode_error(raw: bytes) -> None:
    for auth in (OPEN, keyed()):
        assert decode_or_none(raw, auth) is None


@settings(max_examples=1500)
@given(st.binary(max_size=400), st.booleans(), st.sampled_from([b"", b"x", ZERO_PAGE]))
def test_random_payloads_past_authentication(payload: bytes, fix_length: bool, bulk: bytes) -> None:
    # Open mode: with a body length that locates the auth block, the payload reaches the
    # header and body parsers; the bulk reaches the bulk checks.
    if fix_length and len(payload) >= wire.HEADER_SIZE:
        length = struct.pack(">I", len(payload) - wire.HEADER_SIZE)
        payload = payload[:16] + length + payload[20:]
    decode_or_none(OPEN.seal(payload, NOW) + bulk)


@settings(max_examples=1500)
@given(
    message_type=st.integers(0, 12),
    flags=st.sampled_from([0, 0, 0, 1]),
    part=st.integers(0, 3),
    parts=st.integers(0, 3),
    body=st.binary(max_size=400),
    bulk_pages=st.sampled_from([0, 0, 1, 2]),
    bulk_delta=st.sampled_from([0, 0, 0, -1, 1]),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**32 - 1]),
)
def test_random_bodies_with_plausible_headers(
    message_type: int,
    flags: int,
    part: int,
    parts: int,
    body: bytes,
    bulk_pages: int,
    bulk_delta: int,
    length_delta: int,
) -> None:
    datagram = frame(
        message_type,
        body,
        bulk=bytes(max(0, bulk_pages * PAGE_SIZE + bulk_delta)),
        flags=flags,
        part=part,
        parts=parts,
        body_length=(len(body) + length_delta) % 2**32,
    )
    decode_or_none(datagram)


def mutate(data: st.DataObject, raw: bytes) -> bytes:
    """One random mutation of ``raw`` (which may be empty)."""
    out = bytearray(raw)
    mutation = data.draw(st.sampled_from(["flip", "truncate", "insert", "set_u16"]))
    if mutation == "flip" and out:
        for _ in range(data.draw(st.integers(1, 4))):
            index = data.draw(st.integers(0, len(out) - 1))
            out[index] ^= 1 << data.draw(st.integers(0, 7))
    elif mutation == "truncate" and out:
        del out[data.draw(st.integers(0, len(out) - 1)) :]
    elif mutation == "insert":
        index = data.draw(st.integers(0, len(out)))
        out[index:index] = data.draw(st.binary(min_size=1, max_size=40))
    elif out:  # overwrite a count or length with something extreme
        index = data.draw(st.integers(0, max(0, len(out) - 2)))
        out[index : index + 2] = data.draw(st.sampled_from([b"\x00\x00", b"\xff\xff"]))
    return bytes(out)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_mutated_datagrams_raise_only_decode_error(msg: Message, data: st.DataObject) -> None:
    datagram = encode(msg)
    end = sealed_end(datagram)
    head, bulk = datagram[: end - AUTH_OVERHEAD], datagram[end:]
    # Open mode: a mutated header or body is resealed, so it reaches the parsers; a mutated
    # bulk reaches the bulk checks; a mutated datagram tests the auth block's location.
    region = data.draw(st.sampled_from(["head", "bulk", "datagram"]))
    if region == "head":
        head = mutate(data, head)
        mutated = OPEN.seal(head, NOW) + bulk
    elif region == "bulk":
        mutated = OPEN.seal(head, NOW) + mutate(data, bulk)
    else:
        mutated = mutate(data, datagram)
    decode_or_none(mutated)
    # With a key, any change to the tagged bytes (header, body, auth block) is refused.
    sealed = bytearray(encode(msg, auth=keyed()))
    index = data.draw(st.integers(0, end - 1), label="tampered byte")
    sealed[index] ^= data.draw(st.integers(1, 255), label="xor")
    assert decode_or_none(bytes(sealed), keyed()) is None


# --- limits ----------------------------------------------------------------------------------


def test_batch_size_helpers() -> None:
    assert wire.max_digests_per_request(MAX_DATAGRAM) == 2045
    assert wire.max_pages_per_datagram(MAX_DATAGRAM) == 15
    assert wire.max_pages_per_datagram(MIN_DATAGRAM) == 1
    assert DATAGRAM_OVERHEAD == 54
    with pytest.raises(UsageError):
        wire.max_digests_per_request(MIN_DATAGRAM - 1)


@pytest.mark.parametrize("max_datagram", SIZES)
def test_digest_requests_fit_exactly(max_datagram: int) -> None:
    count = wire.max_digests_per_request(max_datagram)
    for cls in (GetPages, Has):
        fits = cls(request_id=1, digests=tuple(map(digest_of, range(count))))
        assert len(encode(fits, max_datagram)) <= max_datagram
        too_many = cls(request_id=1, digests=tuple(map(digest_of, range(count + 1))))
        with pytest.raises(wire.MessageTooLargeError):
            encode(too_many, max_datagram)


@pytest.mark.parametrize("max_datagram", SIZES)
def test_page_messages_fit_exactly(max_datagram: int) -> None:
    count = wire.max_pages_per_datagram(max_datagram)
    pairs = [(digest_of(i), page_of(i)) for i in range(count + 1)]
    for fits in (
        Pages(request_id=1, pages=tuple(pairs[:count])),
        PutPages(request_id=1, pages=tuple(pairs[:count])),
    ):
        assert len(encode(fits, max_datagram)) <= max_datagram
    with pytest.raises(wire.MessageTooLargeError):
        encode(Pages(request_id=1, pages=tuple(pairs)), max_datagram)


def test_oversize_datagram_is_refused_on_decode() -> None:
    datagram = encode(GetPages(request_id=1, digests=tuple(map(digest_of, range(500)))))
    assert len(datagram) > 9000
    with pytest.raises(LimitExceededError):
        decode(datagram, max_datagram=9000)


@pytest.mark.parametrize("bad", [0, MIN_DATAGRAM - 1, MAX_DATAGRAM + 1])
def test_max_datagram_bounds(bad: int) -> None:
    with pytest.raises(UsageError):
        encode(NodeInfoRequest(request_id=1), bad)
    with pytest.raises(UsageError):
        decode(encode(NodeInfoRequest(request_id=1)), bad)


def test_short_datagram() -> None:
    with pytest.raises(DecodeError):
        decode(bytes(DATAGRAM_OVERHEAD - 1))


@pytest.mark.parametrize("version", [1, 3, 255])
def test_unknown_version_is_not_answered(version: int) -> None:
    with pytest.raises(DecodeError, match="wire version") as info:
        decode(frame(MessageType.NODE_INFO_REQUEST, b"", version=version))
    assert not isinstance(info.value, MessageDecodeError)


def test_a_version_1_pages_datagram_is_refused() -> None:
    """Version 1 put pages inside the body, under the tag: its tag verifies, its version not."""
    page = page_of(1)
    body = struct.pack(">HH", 1, 0) + digest_page(page) + page
    with pytest.raises(DecodeError, match="wire version 1"):
        decode(frame(MessageType.PAGES, body, version=1, auth=keyed()), auth=keyed())


@pytest.mark.parametrize(
    ("message_type", "body", "bulk", "body_length"),
    [
        (MessageType.GET_PAGES, one_digest_body(), b"", 33),
        (MessageType.GET_PAGES, one_digest_body(), b"", 35),
        (MessageType.GET_PAGES, one_digest_body(), b"", 2**32 - 1),
        (MessageType.PAGES, struct.pack(">HH", 1, 0) + bytes(32), page_of(0), 0),
        (MessageType.PAGES, struct.pack(">HH", 1, 0) + bytes(32), page_of(0), 36 + 4096),
        (MessageType.PAGES, struct.pack(">HH", 0, 0), bytes(PAGE_SIZE), 1),
    ],
)
@pytest.mark.parametrize("tamper", [False, True])
def test_a_body_length_that_misplaces_the_auth_block_is_unauthentic(
    message_type: int, body: bytes, bulk: bytes, body_length: int, tamper: bool
) -> None:
    """The body length locates the tag: a wrong one (sealed so, or forged) moves or loses it."""
    if tamper:  # sealed with the right length, then the length is forged
        datagram = bytearray(frame(message_type, body, bulk=bulk, auth=keyed()))
        datagram[16:20] = struct.pack(">I", body_length)
    else:
        datagram = bytearray(
            frame(message_type, body, bulk=bulk, body_length=body_length, auth=keyed())
        )
    with pytest.raises(AuthenticationError):
        decode(bytes(datagram), auth=keyed())


def test_unknown_type_carries_request_id_and_code() -> None:
    with pytest.raises(MessageDecodeError) as info:
        decode(frame(200, b"", request_id=12345))
    assert info.value.request_id == 12345
    assert info.value.message_type == 200
    assert info.value.code is ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    "datagram",
    [
        # count disagrees with the body
        frame(MessageType.GET_PAGES, struct.pack(">H", 2) + digest_of(0)),
        frame(MessageType.GET_PAGES, struct.pack(">H", 0xFFFF) + digest_of(0)),
        frame(MessageType.PAGES, struct.pack(">HH", 2, 0) + digest_of(0), bulk=page_of(0)),
        frame(MessageType.PAGES, struct.pack(">HH", 1, 1) + digest_of(0), bulk=page_of(0)),
        # bulk disagrees with the body's page count (short, long, missing, unexpected)
        frame(MessageType.PAGES, struct.pack(">HH", 1, 0) + digest_of(0)),
        frame(MessageType.PAGES, struct.pack(">HH", 1, 0) + digest_of(0), bulk=page_of(0)[1:]),
        frame(MessageType.PAGES, struct.pack(">HH", 1, 0) + digest_of(0), bulk=page_of(0) + b"x"),
        frame(MessageType.PAGES, struct.pack(">HH", 0, 1) + digest_of(0), bulk=page_of(0)),
        frame(MessageType.PUT_PAGES, one_digest_body()),
        frame(MessageType.PUT_PAGES, one_digest_body(), bulk=page_of(0) * 2),
        frame(MessageType.GET_PAGES, one_digest_body(), bulk=page_of(0)),
        frame(MessageType.NODE_INFO_REQUEST, b"", bulk=b"\x00"),
        # empty requests
        frame(MessageType.GET_PAGES, struct.pack(">H", 0)),
        frame(MessageType.HAS, struct.pack(">H", 0)),
        frame(MessageType.PUT_PAGES, struct.pack(">H", 0)),
        # reserved flags
        frame(MessageType.GET_PAGES, one_digest_body(), flags=1),
        # requests are single datagrams; parts must exist
        frame(MessageType.GET_PAGES, one_digest_body(), parts=2),
        frame(MessageType.PAGES, struct.pack(">HH", 0, 0), part=2, parts=2),
        frame(MessageType.PAGES, struct.pack(">HH", 0, 0), part=0, parts=0),
        # trailing bytes
        frame(MessageType.NODE_INFO_REQUEST, b"\x00"),
        # unknown enum values
        frame(MessageType.PUT_RESULT, struct.pack(">H", 1) + digest_of(0) + b"\x09"),
        frame(MessageType.ERROR, struct.pack(">HH", 999, 0)),
        # HAVE padding bits set
        frame(MessageType.HAVE, struct.pack(">HH", 0, 3) + b"\x08"),
        # HAVE beyond a request's digests
        frame(MessageType.HAVE, struct.pack(">HH", 0xFFFF, 1) + b"\x01"),
        # bad text
        frame(MessageType.ERROR, struct.pack(">HH", 1, 2) + b"\xff\xfe"),
        frame(MessageType.ERROR, struct.pack(">HH", 1, 513) + b"x" * 513),
    ],
)
def test_malformed_bodies(datagram: bytes) -> None:
    with pytest.raises(MessageDecodeError) as info:
        decode(datagram)
    assert info.value.request_id == 99


def test_put_result_names_its_first_unknown_status_and_decodes_valid_entries_in_order() -> None:
    body = struct.pack(">H", 3) + digest_of(0) + b"\x01" + digest_of(1) + b"\x07" + digest_of(2)
    with pytest.raises(MessageDecodeError, match="unknown put status 7"):
        decode(frame(MessageType.PUT_RESULT, body + b"\x09"))
    good = struct.pack(">H", 2) + digest_of(0) + b"\x01" + digest_of(1) + b"\x05"
    msg = decode(frame(MessageType.PUT_RESULT, good))
    assert msg == PutResult(
        request_id=99, results=((digest_of(0), PutStatus(1)), (digest_of(1), PutStatus(5)))
    )
    assert all(type(status) is PutStatus for _, status in msg.results)


def node_info_body(host: bytes, version: bytes, data_port: int = 7000) -> bytes:
    fixed = struct.pack(">20sHHHIQQQ", bytes(20), data_port, 8468, 0, 0, 0, 0, 0)
    return fixed + bytes((len(host),)) + host + bytes((len(version),)) + version


@pytest.mark.parametrize(
    "body",
    [
        node_info_body(b"h\xc3\xa9", b"1"),  # non-ASCII host
        node_info_body(b"", b"1"),  # empty host
        node_info_body(b"h" * 254, b"1"),  # host too long
        node_info_body(b"h", b"v" * 65),  # version too long
        node_info_body(b"h", b"1", data_port=0),  # no data port
        node_info_body(b"h", b"1")[:-1],  # truncated
        node_info_body(b"h", b"1") + b"\x00",  # trailing byte
    ],
)
def test_malformed_node_info(body: bytes) -> None:
    with pytest.raises(MessageDecodeError):
        decode(frame(MessageType.NODE_INFO, body))
    decode(frame(MessageType.NODE_INFO, node_info_body(b"h", b"1")))  # the well-formed one


@pytest.mark.parametrize(
    "build",
    [
        lambda: GetPages(request_id=1, digests=()),
        lambda: GetPages(request_id=1, digests=(b"short",)),  # type: ignore[arg-type]
        lambda: GetPages(request_id=-1, digests=(digest_of(0),)),
        lambda: GetPages(request_id=2**64, digests=(digest_of(0),)),
        lambda: GetPages(request_id=1, digests=(digest_of(0),) * 0x10000),
        lambda: Pages(request_id=1, pages=((digest_of(0), b"x" * 4095),)),
        lambda: Pages(request_id=1, pages=(), part=1, parts=1),
        lambda: Pages(request_id=1, pages=(), part=0, parts=0x10000),
        lambda: PutPages(request_id=1, pages=()),
        lambda: PutResult(request_id=1, results=((digest_of(0), 42),)),  # type: ignore[arg-type]
        lambda: Have(request_id=1, held=(True,), first=0xFFFF),
        lambda: Error(request_id=1, code=ErrorCode.MALFORMED, message="x" * 513),
        lambda: Error(request_id=1, code=77, message=""),  # type: ignore[arg-type]
        lambda: NodeInfo(
            request_id=1,
            node_id=bytes(19),
            data_address=("h", 1),
            kademlia_port=1,
            metrics_port=0,
            version="",
            pages_stored=0,
            bytes_stored=0,
            capacity_bytes=0,
        ),
    ],
)
def test_messages_validate_themselves(build: object) -> None:
    with pytest.raises(wire.InvalidMessageError):
        build()  # type: ignore[operator]


def test_error_capped_cuts_at_a_character_boundary() -> None:
    error = Error.capped(request_id=1, code=ErrorCode.INTERNAL, message="é" * 400)
    assert len(error.message.encode()) <= wire.MAX_ERROR_MESSAGE_BYTES
    assert error.message == "é" * 256
    assert decode(encode(error)) == error


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(wire.EncodeError):
        wire.encode("GET", max_datagram=MAX_DATAGRAM, auth=OPEN, now=NOW)  # type: ignore[arg-type]


# --- multi-part responses --------------------------------------------------------------------


def decode_parts(datagrams: list[bytes], max_datagram: int) -> list[Message]:
    decoded = []
    for index, datagram in enumerate(datagrams):
        assert len(datagram) <= max_datagram
        msg = decode(datagram, max_datagram)
        assert msg.request_id == 4242
        assert (msg.part, msg.parts) == (index, len(datagrams))  # type: ignore[union-attr]
        decoded.append(msg)
    return decoded


@pytest.mark.parametrize("max_datagram", SIZES)
@settings(max_examples=25, deadline=None)
@given(n_pages=st.integers(0, 40), n_missing=st.integers(0, 3000))
def test_pages_response_packing(max_datagram: int, n_pages: int, n_missing: int) -> None:
    pairs = [(digest_of(i), page_of(i % 7)) for i in range(n_pages)]
    missing = [digest_of(100_000 + i) for i in range(n_missing)]
    datagrams = wire.encode_pages_response(
        4242, pairs, missing, max_datagram=max_datagram, auth=OPEN, now=NOW
    )
    parts = decode_parts(datagrams, max_datagram)
    got_pairs = [pair for part in parts for pair in part.pages]  # type: ignore[union-attr]
    got_missing = [d for part in parts for d in part.missing]  # type: ignore[union-attr]
    assert got_pairs == pairs  # each exactly once, in order
    assert got_missing == missing
    # As few parts as possible: pages fill parts, missing digests the room each part has left
    # (whole digests per part), then parts of their own.
    budget = max_datagram - DATAGRAM_OVERHEAD - 4
    per_part = budget // (DIGEST_SIZE + PAGE_SIZE)
    page_parts = math.ceil(n_pages / per_part)
    in_page_parts = [min(per_part, n_pages - i * per_part) for i in range(page_parts)]
    room = sum((budget - n * (DIGEST_SIZE + PAGE_SIZE)) // DIGEST_SIZE for n in in_page_parts)
    wanted = page_parts + max(0, math.ceil((n_missing - room) / (budget // DIGEST_SIZE)))
    assert len(datagrams) == max(1, wanted)


def test_wave_pages_answers_are_packed_like_pages_answers() -> None:
    """A WAVE_GET answer is a PAGES answer under its own type: same parts, same bodies."""
    pairs = [(digest_of(i), page_of(i % 7)) for i in range(20)]
    missing = [digest_of(100_000 + i) for i in range(500)]
    plain = wire.encode_pages_response(4242, pairs, missing, max_datagram=32768, auth=OPEN,
                                       now=NOW)
    wave = wire.encode_pages_response(4242, pairs, missing, max_datagram=32768, auth=OPEN,
                                      now=NOW, message_type=wire.MessageType.WAVE_PAGES)
    parts = decode_parts(wave, 32768)
    assert all(isinstance(part, wire.WavePages) for part in parts)
    assert [p for part in parts for p in part.pages] == pairs  # type: ignore[union-attr]
    assert [d for part in parts for d in part.missing] == missing  # type: ignore[union-attr]
    assert [len(d) for d in wave] == [len(d) for d in plain]
    with pytest.raises(UsageError):
        wire.encode_pages_response(4242, pairs, missing, max_datagram=32768, auth=OPEN,
                                   now=NOW, message_type=wire.MessageType.HAVE)


@pytest.mark.parametrize("max_datagram", SIZES)
@settings(max_examples=15, deadline=None)
@given(count=st.integers(0, 5000))
def test_put_response_packing(max_datagram: int, count: int) -> None:
    statuses = list(PutStatus)
    results = [(digest_of(i), statuses[i % len(statuses)]) for i in range(count)]
    datagrams = wire.encode_put_response(
        4242, results, max_datagram=max_datagram, auth=OPEN, now=NOW
    )
    parts = decode_parts(datagrams, max_datagram)
    assert [r for part in parts for r in part.results] == results  # type: ignore[union-attr]


@pytest.mark.parametrize("max_datagram", SIZES)
@settings(max_examples=15, deadline=None)
@given(count=st.integers(0, 0xFFFF), seed=st.integers(0, 2**32))
def test_have_response_packing(max_datagram: int, count: int, seed: int) -> None:
    bits = blake3(seed.to_bytes(8, "big")).digest(length=(count + 7) // 8)
    held = [bool(bits[i // 8] >> (i % 8) & 1) for i in range(count)]
    datagrams = wire.encode_have_response(4242, held, max_datagram=max_datagram, auth=OPEN, now=NOW)
    parts = decode_parts(datagrams, max_datagram)
    flat: list[bool] = []
    for part in parts:
        assert isinstance(part, Have)
        assert part.first == len(flat)
        flat += part.held
    assert flat == held


def test_have_for_a_full_request_is_one_datagram() -> None:
    for max_datagram in SIZES:
        count = wire.max_digests_per_request(max_datagram)
        datagrams = wire.encode_have_response(
            1, [True] * count, max_datagram=max_datagram, auth=OPEN, now=NOW
        )
        assert len(datagrams) == 1


def test_empty_responses_are_one_part() -> None:
    for datagrams in (
        wire.encode_pages_response(4242, [], [], max_datagram=MIN_DATAGRAM, auth=OPEN, now=NOW),
        wire.encode_put_response(4242, [], max_datagram=MIN_DATAGRAM, auth=OPEN, now=NOW),
        wire.encode_have_response(4242, [], max_datagram=MIN_DATAGRAM, auth=OPEN, now=NOW),
    ):
        assert len(decode_parts(datagrams, MIN_DATAGRAM)) == 1


# --- authentication through the codec --------------------------------------------------------


def test_keyed_decode_refuses_tampering_and_replay() -> None:
    sender, receiver = keyed(), keyed()
    datagram = encode(GetPages(request_id=5, digests=(digest_of(1),)), auth=sender)
    tampered = bytearray(datagram)
    tampered[HEADER_BODY_OFFSET] ^= 1
    with pytest.raises(AuthenticationError):
        decode(bytes(tampered), auth=receiver)
    assert decode(datagram, auth=receiver) == GetPages(request_id=5, digests=(digest_of(1),))
    with pytest.raises(ReplayError):
        decode(datagram, auth=receiver)


def test_keyed_and_open_do_not_mix() -> None:
    msg = NodeInfoRequest(request_id=1)
    with pytest.raises(AuthenticationError):
        decode(encode(msg, auth=OPEN), auth=keyed())
    with pytest.raises(AuthenticationError):
        decode(encode(msg, auth=keyed()), auth=OPEN)


def test_a_flipped_bulk_byte_decodes_and_fails_the_digest_check() -> None:
    """The bulk is outside the tag: its integrity is the page digest's, checked by receivers."""
    pairs = ((digest_page(page_of(1)), page_of(1)), (digest_page(page_of(2)), page_of(2)))
    for msg in (Pages(request_id=1, pages=pairs), PutPages(request_id=1, pages=pairs)):
        datagram = bytearray(encode(msg, auth=keyed()))
        datagram[sealed_end(bytes(datagram)) + PAGE_SIZE + 7] ^= 0x10  # the second page
        decoded = decode(bytes(datagram), auth=keyed())
        assert isinstance(decoded, Pages | PutPages)
        (d1, p1), (d2, p2) = decoded.pages
        assert (d1, p1) == pairs[0] and d2 == pairs[1][0]
        check_page(d1, p1)
        with pytest.raises(IntegrityError):
            check_page(d2, p2)


def test_the_bulk_is_not_hashed_by_the_tag() -> None:
    """A keyed PAGES datagram's tag covers its header, digests and auth block only."""
    pairs = tuple((digest_of(i), page_of(i)) for i in range(3))
    datagram = encode(Pages(request_id=5, pages=pairs), auth=keyed())
    end = sealed_end(datagram)
    assert end == DATAGRAM_OVERHEAD + 4 + 3 * DIGEST_SIZE
    assert datagram[end:] == b"".join(page for _, page in pairs)
    assert keyed().open(datagram, NOW, end=end) == datagram[: end - AUTH_OVERHEAD]


@pytest.mark.parametrize("n_pages", [0, 1, 15, 40])
def test_pages_buffers_are_the_joined_response_without_copies(n_pages: int) -> None:
    views = [memoryview(page_of(i)) for i in range(n_pages)]
    pairs = [(digest_of(i), views[i]) for i in range(n_pages)]
    missing = [digest_of(1000 + i) for i in range(30)]
    parts = wire.encode_pages_buffers(
        7, pairs, missing, max_datagram=MAX_DATAGRAM, auth=OPEN, now=NOW
    )
    sent = [page for buffers in parts for page in buffers[1:]]
    assert len(sent) == n_pages and all(a is b for a, b in zip(sent, views, strict=True))
    joined = [b"".join(buffers) for buffers in parts]
    as_bytes = [(d, bytes(p)) for d, p in pairs]
    expected = wire.encode_pages_response(
        7, as_bytes, missing, max_datagram=MAX_DATAGRAM, auth=OPEN, now=NOW
    )
    assert [without_auth(d) for d in joined] == [without_auth(d) for d in expected]
    got = [decode(d) for d in joined]
    assert [pair for msg in got for pair in msg.pages] == as_bytes  # type: ignore[union-attr]


def test_pages_buffers_validate_their_input() -> None:
    for pages, missing in (
        ([(digest_of(0), b"x" * 4095)], []),
        ([(b"short", page_of(0))], []),
        ([], [b"short"]),
    ):
        with pytest.raises(wire.InvalidMessageError):
            wire.encode_pages_buffers(
                1,
                pages,  # type: ignore[arg-type]
                missing,  # type: ignore[arg-type]
                max_datagram=MAX_DATAGRAM,
                auth=OPEN,
                now=NOW,
            )


def test_every_part_of_a_keyed_response_is_authentic() -> None:
    sender, receiver = keyed(), keyed()
    pairs = [(digest_of(i), page_of(i)) for i in range(40)]
    datagrams = wire.encode_pages_response(
        9, pairs, [], max_datagram=MAX_DATAGRAM, auth=sender, now=NOW
    )
    assert len(datagrams) == 3
    got = [pair for d in datagrams for pair in decode(d, auth=receiver).pages]  # type: ignore[union-attr]
    assert got == pairs


HEADER_BODY_OFFSET = wire.HEADER_SIZE + 2


def test_largest_node_info_and_error_fit_the_smallest_datagram() -> None:
    info = NodeInfo(
        request_id=2**64 - 1,
        node_id=bytes(20),
        data_address=("h" * wire.MAX_HOST_BYTES, 0xFFFF),
        kademlia_port=0xFFFF,
        metrics_port=0xFFFF,
        version="v" * wire.MAX_VERSION_BYTES,
        pages_stored=2**64 - 1,
        bytes_stored=2**64 - 1,
        capacity_bytes=2**64 - 1,
        flags=NodeFlags(2**32 - 1),
    )
    error = Error(request_id=1, code=ErrorCode.INTERNAL, message="x" * wire.MAX_ERROR_MESSAGE_BYTES)
    for msg in (info, error):
        assert decode(encode(msg, MIN_DATAGRAM), MIN_DATAGRAM) == msg


@settings(max_examples=100, deadline=None)
@given(request_id=request_ids, claim_ms=st.integers(1, 2**32 - 1),
       keys=st.lists(digests, min_size=1, max_size=40),
       statuses=st.lists(st.sampled_from(wire.WaveClaimStatus), max_size=300))
def test_wave_claims_round_trip(request_id: int, claim_ms: int, keys: list[bytes],
                                statuses: list[wire.WaveClaimStatus]) -> None:
    claim = wire.WaveClaim(request_id=request_id, claim_ms=claim_ms, keys=tuple(keys))
    answer = wire.WaveClaims(request_id=request_id, statuses=tuple(statuses))
    for msg in (claim, answer):
        datagram = encode(msg)
        assert decode(datagram) == msg
        check_decoded(datagram, msg)


def test_a_full_wave_claim_and_its_answer_fit_one_datagram() -> None:
    count = wire.max_digests_per_request(MIN_DATAGRAM) - 1
    claim = wire.WaveClaim(request_id=1, claim_ms=5000,
                           keys=tuple(digest_of(i) for i in range(count)))
    assert len(encode(claim, MIN_DATAGRAM)) <= MIN_DATAGRAM
    answer = wire.WaveClaims(request_id=1, statuses=(wire.WaveClaimStatus.PENDING,) * count)
    assert len(encode(answer, MIN_DATAGRAM)) < MIN_DATAGRAM


@pytest.mark.parametrize(
    "datagram",
    [
        frame(MessageType.WAVE_CLAIM, struct.pack(">I", 0) + one_digest_body()),  # 0 ms
        frame(MessageType.WAVE_CLAIM, struct.pack(">I", 9) + struct.pack(">H", 0)),  # no key
        frame(MessageType.WAVE_CLAIM, struct.pack(">I", 9) + one_digest_body() + b"x"),
        frame(MessageType.WAVE_CLAIM, b"\x00\x00"),  # too short for the claim time
        frame(MessageType.WAVE_CLAIM, struct.pack(">I", 9) + one_digest_body(), parts=2),
        frame(MessageType.WAVE_CLAIMS, struct.pack(">H", 2) + b"\x01"),  # count mismatch
        frame(MessageType.WAVE_CLAIMS, struct.pack(">H", 1) + b"\x09"),  # unknown status
        frame(MessageType.WAVE_CLAIMS, struct.pack(">H", 1) + b"\x00"),
        frame(MessageType.WAVE_CLAIMS, struct.pack(">H", 1) + b"\x01", bulk=b"\x00"),
    ],
)
def test_malformed_wave_claims(datagram: bytes) -> None:
    with pytest.raises(MessageDecodeError) as info:
        decode(datagram)
    assert info.value.request_id == 99


@pytest.mark.parametrize(
    "build",
    [
        lambda: wire.WaveClaim(request_id=1, claim_ms=0, keys=(digest_of(0),)),
        lambda: wire.WaveClaim(request_id=1, claim_ms=2**32, keys=(digest_of(0),)),
        lambda: wire.WaveClaim(request_id=1, claim_ms=5, keys=()),
        lambda: wire.WaveClaim(request_id=1, claim_ms=5, keys=(bytes(31),)),
        lambda: wire.WaveClaims(request_id=1, statuses=(2,)),  # type: ignore[arg-type]
    ],
)
def test_wave_claim_messages_validate_themselves(build: object) -> None:
    with pytest.raises(wire.InvalidMessageError):
        build()  # type: ignore[operator]
