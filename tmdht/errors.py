"""The one error hierarchy of tmdht.

Every failure the system reports on purpose is a :class:`TmdhtError`. The subclasses say whose
fault it was, in the manner of h11: :class:`DecodeError` is the remote side's (bad bytes arrived),
:class:`UsageError` is the caller's (a bad argument, a bad file given on the command line).
"""

from __future__ import annotations

__all__ = [
    "CapacityError",
    "CatalogMismatchError",
    "ConfigError",
    "DecodeError",
    "DigestMismatchError",
    "IntegrityError",
    "LimitExceededError",
    "TmdhtError",
    "UnknownFormatError",
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
