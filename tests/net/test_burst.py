"""The native burst decoder is the reference, datagram for datagram and error for error.

Bursts of PAGES and PUT_RESULT answers (keyed and open mode, with missing digests, several
parts), other answers (HAVE, ERROR: the native decoder hands those to the reference), and their
corruptions
(tag bytes, page bytes, digest bytes, body lengths, truncations, bit flips, replays, appended
bytes) go through :func:`decode_burst_reference` and :func:`decode_burst_native`, each with its
own authenticator of the same keys: every datagram must come out as the same message or the
same error class with the same message, and the replay windows must agree after the burst.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cores import native_available

from tmdht import wire
from tmdht.auth import AuthenticationError, Authenticator, ClusterKey, KeyRing, ReplayError
from tmdht.errors import DecodeError, LimitExceededError
from tmdht.net.burst import (
    VerifiedPages,
    decode_burst,
    decode_burst_native,
    decode_burst_reference,
    decode_request,
    decode_request_native,
    encode_pages_answer_native,
    encode_pages_answer_reference,
    encode_put_answers,
    encode_put_answers_native,
    encode_put_answers_reference,
    encode_put_requests,
    encode_put_requests_native,
    encode_put_requests_reference,
)
from tmdht.pages import PAGE_SIZE, PageDigest, digest_page

NOW = 1_700_000_000.0
KEY = ClusterKey(3, bytes(range(32)))
OTHER = ClusterKey(4, bytes(range(1, 33)))
POOL = [random.Random(n).randbytes(PAGE_SIZE) for n in range(12)]
DIGESTS = [PageDigest(digest_page(p)) for p in POOL]
EXAMPLES = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

needs_native = pytest.mark.skipif(
    not native_available(), reason="tmdht._native is not built (no Rust toolchain)"
)


def make_auth(mode: str) -> Authenticator:
    if mode == "open":
        return Authenticator.open_mode()
    ring = KeyRing(KEY)
    ring.accept(OTHER)
    return Authenticator.keyed(ring)


def pages_datagrams(mode: str, n_pages: int, n_missing: int, max_datagram: int) -> list[bytes]:
    pages = [(DIGESTS[i], POOL[i]) for i in range(n_pages)]
    missing = [PageDigest(bytes([i]) * 32) for i in range(n_missing)]
    return wire.encode_pages_response(
        77, pages, missing, max_datagram=max_datagram, auth=make_auth(mode), now=NOW
    )


def other_datagrams(mode: str) -> list[bytes]:
    auth = make_auth(mode)
    have = wire.encode_have_response(5, [True, False, True], max_datagram=8192, auth=auth, now=NOW)
    error = wire.encode(
        wire.Error(request_id=6, code=wire.ErrorCode.OVERLOADED, message="busy"),
        max_datagram=8192, auth=auth, now=NOW,
    )
    return [*have, error]


def put_result_datagrams(mode: str, max_datagram: int = 32768) -> list[bytes]:
    """PUT_RESULT answers: every status, one of several parts at MIN_DATAGRAM."""
    auth = make_auth(mode)
    results = [(DIGESTS[i % 12], status) for i, status in enumerate(wire.PutStatus)]
    many = [(DIGESTS[i % 12], wire.PutStatus.STORED) for i in range(140)]
    return [*wire.encode_put_response(8, results, max_datagram=max_datagram, auth=auth, now=NOW),
            *wire.encode_put_response(9, many, max_datagram=wire.MIN_DATAGRAM, auth=auth, now=NOW)]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One corruption a network, a faulty node or an attacker could make."""
    out = bytearray(data)
    body_length = int.from_bytes(out[16:20], "big")
    tag_at = wire.HEADER_SIZE + body_length + 18
    kind = rng.randrange(9)
    if kind == 0:  # a tag byte
        out[tag_at + rng.randrange(16)] ^= 1 << rng.randrange(8)
    elif kind == 1 and len(out) > tag_at + 16:  # a page byte (outside the tag)
        out[rng.randrange(tag_at + 16, len(out))] ^= 1 << rng.randrange(8)
    elif kind == 2:  # a body byte (a digest or count, under the tag)
        out[rng.randrange(wire.HEADER_SIZE, wire.HEADER_SIZE + max(body_length, 1))] ^= 1
    elif kind == 3:  # truncation
        del out[rng.randrange(len(out)) :]
    elif kind == 4:  # bit flip anywhere
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == 5:  # the body length moved
        out[16:20] = rng.choice([0, body_length - 32, body_length + 4096, 1 << 31]).to_bytes(
            4, "big", signed=False
        ) if body_length >= 32 else (1 << 20).to_bytes(4, "big")
    elif kind == 6:  # bytes appended to the bulk
        out += bytes(rng.choice([1, 32, PAGE_SIZE]))
    elif kind == 7:  # a header byte (flags, part, parts)
        out[rng.randrange(2, wire.HEADER_SIZE)] ^= 1 << rng.randrange(8)
    # kind 8: unchanged (a replay when it was already in the burst)
    return bytes(out)


def same(left: Any, right: Any) -> bool:
    if isinstance(left, DecodeError) or isinstance(right, DecodeError):
        return type(left) is type(right) and str(left) == str(right)
    return bool(left == right)


@needs_native
@EXAMPLES
@given(
    mode=st.sampled_from(["keyed", "open"]),
    n_pages=st.integers(0, 12),
    n_missing=st.integers(0, 40),
    max_datagram=st.sampled_from([wire.MIN_DATAGRAM, 16384, 32768, wire.MAX_DATAGRAM]),
    seed=st.integers(0, 2**32),
    mutants=st.integers(0, 12),
    decode_limit=st.sampled_from([wire.MIN_DATAGRAM, 32768, wire.MAX_DATAGRAM]),
)
def test_native_burst_decoder_is_the_reference(
    mode: str, n_pages: int, n_missing: int, max_datagram: int, seed: int, mutants: int,
    decode_limit: int,
) -> None:
    from tmdht import _native

    rng = random.Random(seed)
    good = pages_datagrams(mode, n_pages, max(n_missing, 1 - n_pages), max_datagram)
    good += other_datagrams(mode) + put_result_datagrams(mode)
    burst = list(good)
    for _ in range(mutants):
        burst.append(mutate(rng.choice(good), rng))
    if mode == "keyed" and rng.random() < 0.3:  # a datagram of the other mode
        burst.append(rng.choice(pages_datagrams("open", 1, 0, 32768)))
    rng.shuffle(burst)
    ref_auth, nat_auth = make_auth(mode), make_auth(mode)
    reference = decode_burst_reference(burst, auth=ref_auth, now=NOW, max_datagram=decode_limit)
    native = decode_burst_native(
        burst, auth=nat_auth, now=NOW, max_datagram=decode_limit, native=_native
    )
    assert len(reference) == len(native) == len(burst)
    for index, (left, right) in enumerate(zip(reference, native, strict=True)):
        assert same(left, right), (index, left, right)
        if isinstance(right, wire.PutResult):  # built unchecked: it passes its own checks
            assert right == wire.PutResult(request_id=right.request_id, results=right.results,
                                           part=right.part, parts=right.parts)
    assert len(ref_auth.replay or ()) == len(nat_auth.replay or ())


@needs_native
def test_put_results_decode_natively() -> None:
    """PUT_RESULT parts come out of the native burst decoder as the reference's messages; an
    unknown status and bytes after the auth block are refused with its texts."""
    from tmdht import _native

    burst = put_result_datagrams("open")
    unknown = bytearray(burst[0])
    unknown[wire.HEADER_SIZE + 2 + 32] = 9  # the first status byte (open mode: no tag over it)
    burst += [bytes(unknown), burst[0] + b"x"]
    raw = _native.decode_pages_burst(burst, 32768, None)
    assert [item[0] for item in raw[:-2]] == [4] * (len(burst) - 2)
    for decode, kwargs in ((decode_burst_reference, {}), (decode_burst_native, {"native": _native})):
        out = decode(burst, auth=make_auth("open"), now=NOW, **kwargs)
        assert out[0] == wire.PutResult(
            request_id=8, results=tuple((DIGESTS[i], s) for i, s in enumerate(wire.PutStatus)))
        assert all(isinstance(m, wire.PutResult) for m in out[:-2])
        assert str(out[-2]) == "unknown put status 9"
        assert str(out[-1]) == "1 bytes after the auth block of a type without bulk"


@needs_native
def test_every_corruption_is_caught_the_same_way() -> None:
    """The cases the issue names, one by one, on both decoders."""
    from tmdht import _native

    (datagram,) = pages_datagrams("keyed", 3, 2, 32768)
    tag_at = len(datagram) - 3 * PAGE_SIZE - 16
    bad_tag = bytearray(datagram)
    bad_tag[tag_at] ^= 1
    bad_page = bytearray(datagram)
    bad_page[-1] ^= 1  # the last page no longer matches its digest
    cases = [bytes(bad_tag), bytes(bad_page), datagram[:-1], datagram[:40], datagram + b"x"]
    for decode in (decode_burst_reference, decode_burst_native):
        kwargs = {"native": _native} if decode is decode_burst_native else {}
        results = [  # each with fresh replay memory: they share one nonce
            decode([case], auth=make_auth("keyed"), now=NOW, **kwargs)[0] for case in cases
        ]
        assert isinstance(results[0], AuthenticationError)
        assert isinstance(results[1], VerifiedPages)
        assert [d for d, _ in results[1].pages] == DIGESTS[:2]
        assert results[1].corrupt == (DIGESTS[2],)
        assert len(results[1].missing) == 2
        assert isinstance(results[2], wire.MessageDecodeError)  # truncated bulk
        assert isinstance(results[3], DecodeError)
        assert isinstance(results[4], wire.MessageDecodeError)
        replayed = decode([datagram, datagram], auth=make_auth("keyed"), now=NOW, **kwargs)
        assert isinstance(replayed[0], VerifiedPages)
        assert isinstance(replayed[1], ReplayError)
        oversize = decode([datagram], auth=make_auth("keyed"), now=NOW,
                          max_datagram=wire.MIN_DATAGRAM, **kwargs)
        assert isinstance(oversize[0], LimitExceededError)


def test_active_decoder_verifies_pages() -> None:
    """Whichever implementation is active (TMDHT_NATIVE=0 runs the reference)."""
    datagrams = pages_datagrams("keyed", 4, 0, 32768)
    (result,) = decode_burst(datagrams, auth=make_auth("keyed"), now=NOW)
    assert isinstance(result, VerifiedPages)
    assert result.pages == tuple(zip(DIGESTS[:4], POOL[:4], strict=True))
    assert result.corrupt == ()


def counter_auth(mode: str) -> Authenticator:
    """An authenticator whose nonces are 1, 2, 3, ... (two of them seal identically)."""
    counter = iter(range(1, 1 << 20))
    ring = None if mode == "open" else KeyRing(KEY)
    return Authenticator(keyring=ring, replay=None, nonce_source=lambda: next(counter))


@needs_native
@EXAMPLES
@given(
    mode=st.sampled_from(["keyed", "open"]),
    layout=st.lists(st.booleans(), min_size=1, max_size=300),
    max_datagram=st.sampled_from([wire.MIN_DATAGRAM, 9000, 32768, wire.MAX_DATAGRAM]),
    request_id=st.integers(0, 2**64 - 1),
)
def test_native_pages_encoder_is_the_reference(
    mode: str, layout: list[bool], max_datagram: int, request_id: int
) -> None:
    """Byte for byte, the pages passed through as the very buffers given."""
    from tmdht import _native

    digests = [DIGESTS[i % 12] if held else PageDigest(i.to_bytes(32, "big"))
               for i, held in enumerate(layout)]
    views = [memoryview(POOL[i % 12]) if held else None for i, held in enumerate(layout)]
    ref, ref_found = encode_pages_answer_reference(
        request_id, digests, views, max_datagram=max_datagram, auth=counter_auth(mode), now=NOW
    )
    nat, nat_found = encode_pages_answer_native(
        request_id, digests, views, max_datagram=max_datagram, auth=counter_auth(mode), now=NOW,
        native=_native,
    )
    assert ref_found == nat_found == sum(layout)
    assert [b"".join(d) for d in nat] == [b"".join(d) for d in ref]
    assert [[id(v) for v in d[1:]] for d in nat] == [[id(v) for v in d[1:]] for d in ref]
    decoded = decode_burst_reference(
        [b"".join(d) for d in nat], auth=make_auth(mode), now=NOW, max_datagram=max_datagram
    )
    assert all(isinstance(m, VerifiedPages) and not m.corrupt for m in decoded)


@needs_native
def test_pages_encoders_refuse_bad_buffers_alike() -> None:
    from tmdht import _native

    cases = [
        ([DIGESTS[0]], [b"short page"]),
        ([PageDigest(b"short digest")], [None]),
    ]
    for digests, views in cases:
        for encode, kwargs in ((encode_pages_answer_reference, {}),
                               (encode_pages_answer_native, {"native": _native})):
            with pytest.raises(wire.InvalidMessageError, match=r"is (32|4096) bytes"):
                encode(1, digests, views, max_datagram=32768, auth=counter_auth("keyed"),
                       now=NOW, **kwargs)


@needs_native
@EXAMPLES
@given(
    mode=st.sampled_from(["keyed", "open"]),
    answers=st.lists(
        st.tuples(st.integers(0, 2**64 - 1),
                  st.lists(st.tuples(st.integers(0, 11), st.sampled_from(list(wire.PutStatus))),
                           max_size=1100)),
        max_size=6),
    max_datagram=st.sampled_from([wire.MIN_DATAGRAM, 9000, 32768, wire.MAX_DATAGRAM]),
)
def test_native_put_answers_are_the_reference(
    mode: str, answers: list[tuple[int, list[tuple[int, wire.PutStatus]]]], max_datagram: int
) -> None:
    """A group's PUT_RESULT answers byte for byte (empty answers and several parts included),
    the nonces drawn in the same order; each decodes to the results it was given."""
    from tmdht import _native

    rows = [(rid, [DIGESTS[i] for i, _ in entries], [s for _, s in entries])
            for rid, entries in answers]
    ref = encode_put_answers_reference(rows, max_datagram=max_datagram, auth=counter_auth(mode),
                                       now=NOW)
    nat = encode_put_answers_native(rows, max_datagram=max_datagram, auth=counter_auth(mode),
                                    now=NOW, native=_native)
    assert nat == ref
    auth = make_auth(mode)
    for (rid, digests, statuses), datagrams in zip(rows, nat, strict=True):
        results = []
        for datagram in datagrams:
            message = wire.decode(datagram, auth=auth, now=NOW, max_datagram=max_datagram)
            assert isinstance(message, wire.PutResult) and message.request_id == rid
            assert message.parts == len(datagrams)
            results += message.results
        assert results == list(zip(digests, statuses, strict=True))


@needs_native
def test_put_answer_encoders_refuse_bad_input_alike() -> None:
    """Short digests, unknown statuses and bad request ids: the same error class, and no nonce
    drawn by the native encoder for a group it refuses."""
    from tmdht import _native

    cases: list[list[Any]] = [
        [(1, [PageDigest(b"short")], [wire.PutStatus.STORED])],
        [(1, [DIGESTS[0]], [9])],
        [(2**64, [DIGESTS[0]], [wire.PutStatus.STORED])],
        [(-1, [], [])],
    ]
    for rows in cases:
        for encode, kwargs in ((encode_put_answers_reference, {}),
                               (encode_put_answers_native, {"native": _native})):
            auth = counter_auth("keyed")
            with pytest.raises(wire.InvalidMessageError):
                encode(rows, max_datagram=32768, auth=auth, now=NOW, **kwargs)
        nonces = counter_auth("keyed")
        with pytest.raises(wire.InvalidMessageError):
            encode_put_answers_native(
                [(5, [DIGESTS[1]], [wire.PutStatus.STORED]), *rows], max_datagram=32768,
                auth=nonces, now=NOW, native=_native)
        assert nonces.next_nonce() == 1


def test_active_put_encoder_answers() -> None:
    rows = [(7, [DIGESTS[0], DIGESTS[1]], [wire.PutStatus.STORED, wire.PutStatus.PRESENT])]
    (datagrams,) = encode_put_answers(rows, max_datagram=32768, auth=make_auth("keyed"), now=NOW)
    (datagram,) = datagrams
    message = wire.decode(datagram, auth=make_auth("keyed"), now=NOW, max_datagram=32768)
    assert isinstance(message, wire.PutResult)
    assert list(message.results) == list(zip(rows[0][1], rows[0][2], strict=True))


def put_datagrams(mode: str, sizes: list[int], max_datagram: int) -> list[bytes]:
    auth = make_auth(mode)
    return [wire.encode(wire.PutPages(request_id=90 + i, pages=tuple(
                (DIGESTS[(i + j) % 12], POOL[(i + j) % 12]) for j in range(size))),
                max_datagram=max_datagram, auth=auth, now=NOW)
            for i, size in enumerate(sizes)]


def decode_or_error(decode: Any, data: bytes, **kwargs: Any) -> Any:
    try:
        return decode(data, **kwargs)
    except DecodeError as exc:
        return exc


@needs_native
@EXAMPLES
@given(
    mode=st.sampled_from(["keyed", "open"]),
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
    mutants=st.integers(0, 12),
    decode_limit=st.sampled_from([wire.MIN_DATAGRAM, 32768, wire.MAX_DATAGRAM]),
)
def test_native_request_decoder_is_the_reference(
    mode: str, sizes: list[int], seed: int, mutants: int, decode_limit: int
) -> None:
    """PUT_PAGES requests (and other datagrams, handed to the reference) and their corruptions,
    replays included: the same message or the same error class and text as wire.decode, the
    replay windows alike afterwards."""
    from tmdht import _native

    rng = random.Random(seed)
    good = put_datagrams(mode, sizes, 32768) + other_datagrams(mode)
    stream = list(good)
    for _ in range(mutants):
        stream.append(mutate(rng.choice(good), rng))
    if mode == "keyed" and rng.random() < 0.3:  # a datagram of the other mode
        stream.append(put_datagrams("open", [1], 32768)[0])
    rng.shuffle(stream)
    ref_auth, nat_auth = make_auth(mode), make_auth(mode)
    for index, data in enumerate(stream):
        left = decode_or_error(wire.decode, data, auth=ref_auth, now=NOW, max_datagram=decode_limit)
        right = decode_or_error(decode_request_native, data, auth=nat_auth, now=NOW,
                                max_datagram=decode_limit, native=_native)
        assert same(left, right), (index, left, right)
        if isinstance(right, wire.PutPages):
            assert right == wire.PutPages(request_id=right.request_id, pages=right.pages)
    assert len(ref_auth.replay or ()) == len(nat_auth.replay or ())


def test_active_request_decoder_decodes_puts() -> None:
    (datagram,) = put_datagrams("keyed", [3], 32768)
    message = decode_request(datagram, auth=make_auth("keyed"), now=NOW)
    assert isinstance(message, wire.PutPages) and message.request_id == 90
    assert message.pages == tuple((DIGESTS[j], POOL[j]) for j in range(3))


def put_requests(layout: list[tuple[int, list[int]]], views: bool) -> list[Any]:
    """(request id, digests, pages) per request; pages as memoryviews when ``views``."""
    return [(rid, [DIGESTS[i] for i in pages],
             [memoryview(POOL[i]) if views else POOL[i] for i in pages]) for rid, pages in layout]


@needs_native
@EXAMPLES
@given(
    mode=st.sampled_from(["keyed", "open"]),
    layout=st.lists(st.tuples(st.integers(0, 2**64 - 1),
                              st.lists(st.integers(0, 11), min_size=1, max_size=15)),
                    max_size=40),
    max_datagram=st.sampled_from([wire.MIN_DATAGRAM, 32768, wire.MAX_DATAGRAM]),
    views=st.booleans(),
)
def test_native_put_requests_are_the_reference(
    mode: str, layout: list[tuple[int, list[int]]], max_datagram: int, views: bool
) -> None:
    """A window of PUT_PAGES requests byte for byte, the nonces drawn in the same order, or
    (too many pages for the datagram) the same error; each decodes to the pages it was given."""
    from tmdht import _native

    requests = put_requests(layout, views)
    outcomes = []
    for encode, kwargs in ((encode_put_requests_reference, {}),
                           (encode_put_requests_native, {"native": _native})):
        try:
            outcomes.append(encode(requests, max_datagram=max_datagram, auth=counter_auth(mode),
                                   now=NOW, **kwargs))
        except wire.MessageTooLargeError as exc:
            outcomes.append(exc)
    ref, nat = outcomes
    if isinstance(ref, Exception):
        assert type(nat) is type(ref) and str(nat) == str(ref)
        return
    assert nat == ref
    auth = make_auth(mode)
    for (rid, digests, pages), datagram in zip(requests, nat, strict=True):
        message = decode_request(datagram, auth=auth, now=NOW, max_datagram=max_datagram)
        assert message == wire.PutPages(request_id=rid, pages=tuple(
            (d, bytes(p)) for d, p in zip(digests, pages, strict=True)))


@needs_native
def test_put_request_encoders_refuse_bad_input_alike() -> None:
    """Short digests and pages, empty requests, bad request ids, oversize requests: the same
    error class and text, and no nonce drawn by the native encoder for a window it refuses."""
    from tmdht import _native

    cases: list[list[Any]] = [
        [(1, [PageDigest(b"short")], [POOL[0]])],
        [(1, [DIGESTS[0]], [b"short page"])],
        [(1, [], [])],
        [(2**64, [DIGESTS[0]], [POOL[0]])],
        [(-1, [DIGESTS[0]], [POOL[0]])],
        [(1, DIGESTS[:8], POOL[:8])],  # 8 pages do not fit 32 KiB
    ]
    for requests in cases:
        errors = []
        for encode, kwargs in ((encode_put_requests_reference, {}),
                               (encode_put_requests_native, {"native": _native})):
            with pytest.raises(wire.EncodeError) as caught:
                encode(requests, max_datagram=32768, auth=counter_auth("keyed"), now=NOW,
                       **kwargs)
            errors.append(caught.value)
        assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1]), errors
        nonces = counter_auth("keyed")
        with pytest.raises(wire.EncodeError):
            encode_put_requests_native([(5, DIGESTS[:1], POOL[:1]), *requests],
                                       max_datagram=32768, auth=nonces, now=NOW, native=_native)
        assert nonces.next_nonce() == 1


def test_active_put_request_encoder() -> None:
    (datagram,) = encode_put_requests([(4, DIGESTS[:2], POOL[:2])], max_datagram=32768,
                                      auth=make_auth("keyed"), now=NOW)
    message = decode_request(datagram, auth=make_auth("keyed"), now=NOW)
    assert message == wire.PutPages(request_id=4, pages=tuple(zip(DIGESTS[:2], POOL[:2], strict=True)))
