"""The data plane's hot datagrams, natively where built: a client's burst of PAGES and
PUT_RESULT answers decoded (every page verified), a client's window of PUT_PAGES requests
sealed, and a node's PAGES and PUT_RESULT answers encoded and sealed (sans-IO).

The request engine hands :func:`decode_burst` what one wake-up of its socket read. Every
datagram comes back as a message, or as the :class:`~tmdht.errors.DecodeError` it was refused
with; a PAGES answer comes back as :class:`VerifiedPages`: its pages already checked against
the digests the body names for them (BLAKE3), the pages that failed listed apart as
``corrupt``. Nothing outside this module sees an unverified page.

Two implementations of one function, chosen as :mod:`tmdht.native` chooses (``TMDHT_NATIVE=0``
forces the reference):

- the reference, :func:`decode_burst_reference`: :func:`tmdht.wire.decode` per datagram, then
  :func:`tmdht.pages.page_matches` per page;
- the native one: ``tmdht._native.decode_pages_burst`` decodes every version-2 PAGES datagram
  of the burst in one call (size limits, auth block and tag, header, body, one BLAKE3 per page,
  each datagram hashed and copied out in one pass while it is in cache) and this module
  finishes each (PUT_RESULT answers too: header, body and statuses checked natively, the
  message built here): the replay window check
  (Python state shared with every datagram type, done before the body counts, as
  :meth:`tmdht.auth.Authenticator.open` does) and the error classes. Other datagram types go
  through the reference.

A node answers a GET with :func:`encode_pages_answer`: the digests it was asked for and a view
(or None) per digest in, PAGES datagrams as buffer lists out (``[head, page, ...]`` for
``socket.sendmsg``, the pages uncopied), the heads sealed natively; the reference is
:func:`tmdht.wire.encode_pages_buffers`, byte for byte. It answers a committed group of PUTs
with :func:`encode_put_answers`: every PUT_RESULT of the group built and sealed in one native
call (the reference, :func:`tmdht.wire.encode_put_response` per PUT, cost about 4.5 us per page
stored on the node's event loop, most of its answer path).

A client sends the PUTs one input of its request engine produced with
:func:`encode_put_requests`: (request id, digests, pages) per request in, one sealed PUT_PAGES
datagram each out, the whole window in one native call (the reference,
:func:`tmdht.wire.encode` of each request's :class:`~tmdht.wire.PutPages`, byte for byte).

A node decodes each request with :func:`decode_request`: PUT_PAGES natively
(``tmdht._native.decode_put_pages``: size limits, auth block and tag, header, body; the pages
copied out, not verified, as :func:`tmdht.wire.decode` leaves them for the store), the replay
check and the message built here; other types, and everything with ``TMDHT_NATIVE=0``, by
:func:`tmdht.wire.decode`.

The two agree datagram for datagram: the same messages, the same error classes (the property
tests in ``tests/net/test_burst.py`` hold them to it, corrupted tags, wrong digests and
truncations included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Final, TypeAlias

from tmdht import wire
from tmdht.auth import AuthenticationError, Authenticator
from tmdht.errors import DecodeError, LimitExceededError, UsageError
from tmdht.native import native_module
from tmdht.pages import ByteView, PageDigest, page_matches

__all__ = [
    "Decoded",
    "PutAnswer",
    "PutRequest",
    "VerifiedPages",
    "burst_implementation",
    "decode_burst",
    "decode_burst_native",
    "decode_burst_reference",
    "decode_request",
    "decode_request_native",
    "encode_pages_answer",
    "encode_pages_answer_native",
    "encode_pages_answer_reference",
    "encode_put_answers",
    "encode_put_answers_native",
    "encode_put_answers_reference",
    "encode_put_requests",
    "encode_put_requests_native",
    "encode_put_requests_reference",
]


@dataclass(frozen=True, slots=True)
class VerifiedPages:
    """A PAGES part whose pages were checked against their digests."""

    request_id: int
    """The request's id."""
    part: int
    """Index of this part."""
    parts: int
    """Number of parts of the answer."""
    pages: tuple[tuple[PageDigest, bytes], ...]
    """(digest, page) pairs whose page has that BLAKE3 digest, in datagram order."""
    corrupt: tuple[PageDigest, ...]
    """Digests whose page in this part did not match (the node or the path is faulty)."""
    missing: tuple[PageDigest, ...]
    """Requested digests the node does not hold."""


Decoded: TypeAlias = wire.Message | VerifiedPages | DecodeError
"""What one datagram of a burst became."""


def _verify(message: wire.Pages) -> VerifiedPages:
    pages = message.pages
    matches = [page_matches(digest, page) for digest, page in pages]
    if all(matches):  # the common case: no second pass
        return VerifiedPages(
            message.request_id, message.part, message.parts, pages, (), message.missing
        )
    return VerifiedPages(
        message.request_id,
        message.part,
        message.parts,
        tuple(pair for pair, ok in zip(pages, matches, strict=True) if ok),
        tuple(pair[0] for pair, ok in zip(pages, matches, strict=True) if not ok),
        message.missing,
    )


def _decode_one(data: ByteView, auth: Authenticator, now: float, max_datagram: int) -> Decoded:
    try:
        message = wire.decode(data, max_datagram=max_datagram, auth=auth, now=now)
    except DecodeError as exc:
        return exc
    return _verify(message) if isinstance(message, wire.Pages) else message


def decode_burst_reference(
    datagrams: Sequence[ByteView],
    *,
    auth: Authenticator,
    now: float,
    max_datagram: int = wire.MAX_DATAGRAM,
) -> list[Decoded]:
    """The reference: :func:`tmdht.wire.decode` and a digest check per page, per datagram."""
    return [_decode_one(data, auth, now, max_datagram) for data in datagrams]


_OK: Final = 0
_REFUSED: Final = 1
_BODY_ERROR: Final = 3
_PUT_RESULT_OK: Final = 4
_PUT_STATUSES: Final[dict[int, wire.PutStatus]] = {int(s): s for s in wire.PutStatus}
"""PutStatus by byte value (the native decoder lets only valid values through)."""
_REFUSED_CLASSES: Final[tuple[type[DecodeError], ...]] = (
    DecodeError,
    LimitExceededError,
    AuthenticationError,
)


def _keys(auth: Authenticator, now: float) -> list[tuple[int, bytes]] | None:
    """The tag keys ``auth`` accepts at ``now`` (None: open mode)."""
    keyring = auth.keyring
    if keyring is None:
        return None
    keys = []
    for key_id in keyring.accepted_ids(now):
        key = keyring.key_for(key_id, now)
        if key is not None:
            keys.append((key_id, key.tag_key))
    return keys


def decode_burst_native(
    datagrams: Sequence[ByteView],
    *,
    auth: Authenticator,
    now: float,
    max_datagram: int = wire.MAX_DATAGRAM,
    native: ModuleType | None = None,
) -> list[Decoded]:
    """The native decoder: ``native`` (tests), else the module in use (ImportError if none)."""
    module = native or native_module()
    if module is None:
        raise ImportError("tmdht._native is not in use")
    wire.check_max_datagram(max_datagram)
    raw = module.decode_pages_burst(datagrams, max_datagram, _keys(auth, now))
    replay = auth.replay
    out: list[Decoded] = []
    for data, item in zip(datagrams, raw, strict=True):
        if item is None:
            out.append(_decode_one(data, auth, now, max_datagram))
            continue
        tag = item[0]
        if tag == _REFUSED:
            out.append(_REFUSED_CLASSES[item[1]](item[2]))
            continue
        if replay is not None:
            try:
                replay.check(item[1], item[3], item[2], now)
            except DecodeError as exc:
                out.append(exc)
                continue
        if tag == _OK:
            out.append(VerifiedPages(item[4], item[5], item[6], item[7], item[8], item[9]))
        elif tag == _PUT_RESULT_OK:
            results = tuple(zip(item[7], map(_PUT_STATUSES.__getitem__, item[8]), strict=True))
            out.append(wire.put_result_decoded(item[4], results, item[5], item[6]))
        else:
            assert tag == _BODY_ERROR
            request_id, message_type, code, reason = item[4:8]
            out.append(
                wire.MessageDecodeError(
                    reason, request_id=request_id, message_type=message_type,
                    code=wire.ErrorCode(code),
                )
            )
    return out


_Decoder: TypeAlias = Callable[..., list[Decoded]]
_ACTIVE: Final[_Decoder] = (
    decode_burst_native if native_module() is not None else decode_burst_reference
)


def decode_burst(
    datagrams: Sequence[ByteView],
    *,
    auth: Authenticator,
    now: float,
    max_datagram: int = wire.MAX_DATAGRAM,
) -> list[Decoded]:
    """Decode a burst with the active implementation (see the module docstring)."""
    return _ACTIVE(datagrams, auth=auth, now=now, max_datagram=max_datagram)


def burst_implementation() -> str:
    """``"native"`` or ``"reference"``."""
    return "native" if _ACTIVE is decode_burst_native else "reference"


# -- the node's side: a GET's answer ---------------------------------------------------------------


def encode_pages_answer_reference(
    request_id: int,
    digests: Sequence[PageDigest],
    views: Sequence[ByteView | None],
    *,
    max_datagram: int,
    auth: Authenticator,
    now: float,
) -> tuple[list[list[ByteView]], int]:
    """The reference: (PAGES datagrams as buffer lists, pages found) by
    :func:`tmdht.wire.encode_pages_buffers`."""
    found: list[tuple[PageDigest, ByteView]] = []
    missing: list[PageDigest] = []
    for digest, view in zip(digests, views, strict=True):
        if view is None:
            missing.append(digest)
        else:
            found.append((digest, view))
    datagrams = wire.encode_pages_buffers(
        request_id, found, missing, max_datagram=max_datagram, auth=auth, now=now
    )
    return datagrams, len(found)


def _sealing(
    native: ModuleType | None, max_datagram: int, auth: Authenticator, now: float
) -> tuple[ModuleType, int, int, bytes | None]:
    """What a native sealer needs: the module, the timestamp (ms) and the current key (id and
    tag key; 0 and None in open mode), checked as :meth:`tmdht.auth.Authenticator.seal` does."""
    module = native or native_module()
    if module is None:
        raise ImportError("tmdht._native is not in use")
    wire.check_max_datagram(max_datagram)
    timestamp_ms = int(now * 1000)
    if not 0 <= timestamp_ms < 1 << 64:
        raise UsageError(f"now must be seconds since the Unix epoch, got {now}")
    keyring = auth.keyring
    key = None if keyring is None else keyring.current
    if key is None:
        return module, timestamp_ms, 0, None
    return module, timestamp_ms, key.key_id, key.tag_key


def encode_pages_answer_native(
    request_id: int,
    digests: Sequence[PageDigest],
    views: Sequence[ByteView | None],
    *,
    max_datagram: int,
    auth: Authenticator,
    now: float,
    native: ModuleType | None = None,
) -> tuple[list[list[ByteView]], int]:
    """The native encoder: the same datagrams, byte for byte (the same nonces drawn in order)."""
    module, timestamp_ms, key_id, tag_key = _sealing(native, max_datagram, auth, now)
    if not 0 <= request_id < 1 << 64:
        raise wire.InvalidMessageError(f"request id {request_id} is not a u64")
    try:
        datagrams, found = module.encode_pages_answer(
            request_id, digests, views, max_datagram=max_datagram, key_id=key_id,
            tag_key=tag_key, timestamp_ms=timestamp_ms, nonce=auth.next_nonce,
        )
    except ValueError as exc:
        raise wire.InvalidMessageError(str(exc)) from None
    return datagrams, found


_ENCODER: Final = (
    encode_pages_answer_native if native_module() is not None else encode_pages_answer_reference
)


def encode_pages_answer(
    request_id: int,
    digests: Sequence[PageDigest],
    views: Sequence[ByteView | None],
    *,
    max_datagram: int,
    auth: Authenticator,
    now: float,
) -> tuple[list[list[ByteView]], int]:
    """A GET's answer with the active implementation: (PAGES datagrams, each ``[head, page,
    ...]``, pages found). ``views[i]`` is the page of ``digests[i]`` or None."""
    return _ENCODER(request_id, digests, views, max_datagram=max_datagram, auth=auth, now=now)


# -- the node's side: a committed group's PUT answers ----------------------------------------------

_STATUS_VALUES: Final = bytes(wire.PutStatus)

PutAnswer: TypeAlias = tuple[int, Sequence[PageDigest], Sequence[wire.PutStatus]]
"""One PUT's answer: its request id, its digests and a status per digest."""


def encode_put_answers_reference(
    answers: Sequence[PutAnswer], *, max_datagram: int, auth: Authenticator, now: float
) -> list[list[bytes]]:
    """The reference: per PUT its PUT_RESULT datagrams (:func:`tmdht.wire.encode_put_response`)."""
    return [
        wire.encode_put_response(request_id, list(zip(digests, statuses, strict=True)),
                                 max_datagram=max_datagram, auth=auth, now=now)
        for request_id, digests, statuses in answers
    ]


def encode_put_answers_native(
    answers: Sequence[PutAnswer],
    *,
    max_datagram: int,
    auth: Authenticator,
    now: float,
    native: ModuleType | None = None,
) -> list[list[bytes]]:
    """The native encoder: the same datagrams, byte for byte (the same nonces drawn in order)."""
    module, timestamp_ms, key_id, tag_key = _sealing(native, max_datagram, auth, now)
    rows = []
    for request_id, digests, statuses in answers:
        if not 0 <= request_id < 1 << 64:
            raise wire.InvalidMessageError(f"request id {request_id} is not a u64")
        if len(statuses) != len(digests):
            raise ValueError("one status per digest")  # zip(strict=True)'s error in the reference
        try:
            raw = bytes(statuses)  # C-level per status (hashing an enum member is not)
        except (TypeError, ValueError):
            raw = b"\x00"
        if raw.translate(None, _STATUS_VALUES):
            raise wire.InvalidMessageError(f"unknown put status in {list(statuses)!r}")
        rows.append((request_id, digests, raw))
    try:
        return module.encode_put_results(  # type: ignore[no-any-return]
            rows, max_datagram=max_datagram, key_id=key_id, tag_key=tag_key,
            timestamp_ms=timestamp_ms, nonce=auth.next_nonce,
        )
    except (ValueError, TypeError) as exc:
        raise wire.InvalidMessageError(str(exc)) from None


_PUT_ENCODER: Final = (
    encode_put_answers_native if native_module() is not None else encode_put_answers_reference
)


def encode_put_answers(
    answers: Sequence[PutAnswer], *, max_datagram: int, auth: Authenticator, now: float
) -> list[list[bytes]]:
    """The answers of a committed group of PUTs with the active implementation: per PUT, in
    order, its PUT_RESULT datagrams (one in practice)."""
    return _PUT_ENCODER(answers, max_datagram=max_datagram, auth=auth, now=now)


# -- the node's side: requests -------------------------------------------------------------------


_PUT_PAGES: Final = int(wire.MessageType.PUT_PAGES)


def decode_request_native(
    data: ByteView,
    *,
    auth: Authenticator,
    now: float,
    max_datagram: int = wire.MAX_DATAGRAM,
    native: ModuleType | None = None,
) -> wire.Message:
    """A node's decoder: PUT_PAGES natively, the rest by :func:`tmdht.wire.decode`; the same
    message or the same error (class and text) as :func:`tmdht.wire.decode`, the replay window
    changed alike."""
    module = native or native_module()
    if module is None:
        raise ImportError("tmdht._native is not in use")
    wire.check_max_datagram(max_datagram)
    if len(data) < 2 or data[1] != _PUT_PAGES:  # not worth the key list: the reference decodes
        return wire.decode(data, max_datagram=max_datagram, auth=auth, now=now)
    item = module.decode_put_pages(data, max_datagram, _keys(auth, now))
    if item is None:
        return wire.decode(data, max_datagram=max_datagram, auth=auth, now=now)
    tag = item[0]
    if tag == _REFUSED:
        raise _REFUSED_CLASSES[item[1]](item[2])
    replay = auth.replay
    if replay is not None:
        replay.check(item[1], item[3], item[2], now)
    if tag == _OK:
        return wire.put_pages_decoded(item[4], item[5])
    assert tag == _BODY_ERROR
    request_id, message_type, code, reason = item[4:8]
    raise wire.MessageDecodeError(
        reason, request_id=request_id, message_type=message_type, code=wire.ErrorCode(code)
    )


def _decode_request_reference(
    data: ByteView, *, auth: Authenticator, now: float, max_datagram: int = wire.MAX_DATAGRAM
) -> wire.Message:
    return wire.decode(data, max_datagram=max_datagram, auth=auth, now=now)


_REQUEST_DECODER: Final = (
    decode_request_native if native_module() is not None else _decode_request_reference
)


def decode_request(
    data: ByteView, *, auth: Authenticator, now: float, max_datagram: int = wire.MAX_DATAGRAM
) -> wire.Message:
    """Decode one datagram a node received with the active implementation (raises as
    :func:`tmdht.wire.decode`)."""
    return _REQUEST_DECODER(data, auth=auth, now=now, max_datagram=max_datagram)


# -- the client's side: a window of PUT requests -----------------------------------------------

PutRequest: TypeAlias = tuple[int, Sequence[bytes], Sequence[ByteView]]
"""One PUT_PAGES request: its request id, its digests and their pages (in order)."""


def _put_pages(request: PutRequest) -> wire.PutPages:
    request_id, digests, pages = request
    if len(pages) != len(digests):
        raise ValueError("one page per digest")
    pairs = tuple(zip(digests, pages, strict=True))
    return wire.PutPages(request_id=request_id, pages=pairs)  # type: ignore[arg-type]


def encode_put_requests_reference(
    requests: Sequence[PutRequest], *, max_datagram: int, auth: Authenticator, now: float
) -> list[bytes]:
    """The reference: :func:`tmdht.wire.encode` of each request's :class:`~tmdht.wire.PutPages`."""
    return [wire.encode(_put_pages(request), max_datagram=max_datagram, auth=auth, now=now)
            for request in requests]


def encode_put_requests_native(
    requests: Sequence[PutRequest],
    *,
    max_datagram: int,
    auth: Authenticator,
    now: float,
    native: ModuleType | None = None,
) -> list[bytes]:
    """The native encoder: the same datagrams, byte for byte (the same nonces drawn in order),
    the same errors (a refused window draws no nonce, where the reference has drawn those of
    the requests before the bad one)."""
    module, timestamp_ms, key_id, tag_key = _sealing(native, max_datagram, auth, now)
    for request_id, _, _ in requests:
        if not 0 <= request_id < 1 << 64:
            raise wire.InvalidMessageError(f"request id {request_id} is not a u64")
    try:
        return module.encode_put_requests(  # type: ignore[no-any-return]
            requests, max_datagram=max_datagram, key_id=key_id, tag_key=tag_key,
            timestamp_ms=timestamp_ms, nonce=auth.next_nonce,
        )
    except OverflowError as exc:
        raise wire.MessageTooLargeError(str(exc)) from None
    except ValueError as exc:
        if str(exc) == "one page per digest":
            raise
        raise wire.InvalidMessageError(str(exc)) from None


_PUT_REQUEST_ENCODER: Final = (
    encode_put_requests_native if native_module() is not None else encode_put_requests_reference
)


def encode_put_requests(
    requests: Sequence[PutRequest], *, max_datagram: int, auth: Authenticator, now: float
) -> list[bytes]:
    """A window of PUT_PAGES requests with the active implementation: one sealed datagram per
    request, in order (the request engine sends every PUT of one input in one call)."""
    return _PUT_REQUEST_ENCODER(requests, max_datagram=max_datagram, auth=auth, now=now)
