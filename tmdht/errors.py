"""The one error hierarchy of tmdht: every error class of the core, in one place.

Every failure the system reports on purpose is a :class:`TmdhtError`. The subclasses say whose
fault it was, in the manner of h11: :class:`DecodeError` is the remote side's (bad bytes arrived),
:class:`UsageError` is the caller's (a bad argument, a bad file given on the command line).
The modules that raise them re-export their own (``tmdht.wire.MessageDecodeError``,
``tmdht.auth.ReplayError``, ...). The node, the client and the lab keep theirs in
``tmdht.node.errors``, ``tmdht.client.errors`` and ``tmdht.lab.errors``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tmdht.wire import ErrorCode

__all__ = [
    "AuthenticationError",
    "CapacityError",
    "CatalogMismatchError",
    "ClockSkewError",
    "ConfigError",
    "DecodeError",
    "DigestMismatchError",
    "EncodeError",
    "IntegrityError",
    "InvalidMessageError",
    "LimitExceededError",
    "MessageDecodeError",
    "MessageTooLargeError",
    "NodeUnreachableError",
    "OverlayClosedError",
    "OverlayError",
    "ReplayError",
    "RpcTimeoutError",
    "TmdhtError",
    "UnauthenticatedError",
    "UnknownFormatError",
    "UnknownPeerError",
    "UnsupportedStreamError",
    "UsageError",
]


class TmdhtError(Exception):
    """Root of every error tmdht raises on purpose."""


class DecodeError(TmdhtError):
    """Bytes from outside (a file, a datagram, a stream) do not follow their format.

    Every decoder raises only this type on bad input, whatever the input is.
    """


class LimitExceededError(DecodeError):
    """A length or count in the input is larger than the format allows."""


class UnknownFormatError(DecodeError):
    """A file is not any of the formats tmdht reads."""


class UnsupportedStreamError(DecodeError):
    """A QEMU migration stream uses a feature tmdht does not handle (e.g. xbzrle, postcopy)."""


class IntegrityError(TmdhtError):
    """Content does not match the digest that names it (a page, a rebuilt image, a file)."""


class DigestMismatchError(DecodeError, IntegrityError):
    """Received bytes decode, but their content does not match the digest sent with them."""


class CatalogMismatchError(TmdhtError):
    """A dedup stream was encoded against another template catalog than the one at hand."""


class ConfigError(TmdhtError):
    """Configuration is missing, malformed or inconsistent."""


class UsageError(TmdhtError):
    """The caller asked for something that cannot be done (bad argument, missing file)."""


class CapacityError(TmdhtError):
    """A store is full: the write was refused and nothing was changed."""


# -- cluster traffic: authentication (tmdht.auth) and the data-plane format (tmdht.wire) ---------


class AuthenticationError(DecodeError):
    """A datagram is not authentic: bad or missing tag, unknown key id, open/keyed mismatch."""


class ReplayError(DecodeError):
    """An authentic datagram was refused as a replay (nonce seen, or too old to tell)."""


class ClockSkewError(ReplayError):
    """An authentic datagram's timestamp is outside ``now +- window`` (clock skew or replay)."""


class EncodeError(UsageError):
    """The caller asked to build or encode something the format cannot carry."""


class InvalidMessageError(EncodeError):
    """A message field is out of range (raised by the message's constructor)."""


class MessageTooLargeError(EncodeError):
    """A message does not fit in one datagram of the configured size."""


class MessageDecodeError(DecodeError):
    """An authentic datagram with a readable header has an invalid type, part or body.

    Unlike other DecodeErrors, the sender is known and authenticated: if ``message_type`` is a
    request, a node may answer ``Error(request_id=..., code=...)``.
    """

    def __init__(self, reason: str, *, request_id: int, message_type: int, code: ErrorCode):
        super().__init__(reason)
        self.request_id = request_id
        """The request id from the header."""
        self.message_type = message_type
        """The type byte from the header (possibly unknown)."""
        self.code = code
        """The code a node should answer a request with."""


# -- the cluster layer: the overlay (ring membership) and the data-plane requests ---------------


class UnauthenticatedError(DecodeError):
    """An overlay datagram's cluster tag is missing or wrong: it was not sent by a member."""


class OverlayError(TmdhtError):
    """The overlay could not do what was asked (no answer, stopped, unknown peer)."""


class RpcTimeoutError(OverlayError):
    """A peer did not answer one overlay RPC within the RPC timeout."""


class OverlayClosedError(OverlayError):
    """The overlay is stopped (or stopping): no RPC can be sent any more."""


class UnknownPeerError(OverlayError):
    """The node id asked for is not a known contact."""


class NodeUnreachableError(TmdhtError):
    """A node did not answer a data-plane request after every retry."""

    def __init__(self, address: tuple[str, int], what: str) -> None:
        super().__init__(f"node {address[0]}:{address[1]} did not answer {what}")
        self.address = address
