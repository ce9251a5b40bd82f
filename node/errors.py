"""The store node's errors (all :class:`~tmdht.errors.TmdhtError`)."""

from __future__ import annotations

from tmdht.errors import TmdhtError, UnknownFormatError

__all__ = ["ClusterError", "StorageError", "StoreFormatError"]


class StorageError(TmdhtError):
    """The store failed for a reason other than a full store or bad input (an LMDB or OS error).

    The store's committed contents are unchanged by the failed call.
    """


class StoreFormatError(UnknownFormatError):
    """The data dir is not a page store of a format this code reads (version, foreign LMDB)."""


class ClusterError(TmdhtError):
    """A local node (:mod:`tmdht.node.local`) failed to start or stop."""
