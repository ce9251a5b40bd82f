"""tmdht core: template-page deduplication for live VM migration.

This package contains no networking code and no event loop: it is the sans-IO core (page
hashing, template mining and the catalog format, the wire and dedup-stream codecs, the QEMU
migration stream parser, replica placement, configuration types and errors), with the cluster
layer both sides of the network need (:mod:`tmdht.net`: credentials, membership, the overlay's
format, the request engine) and the live-migration cores (:mod:`tmdht.migration`). The store
node (:mod:`tmdht.node`) and the client library (:mod:`tmdht.client`) do the IO, on the asyncio
skins they share (:mod:`tmdht.aio`); neither imports the other.
"""

from tmdht.errors import (
    CapacityError,
    CatalogMismatchError,
    ConfigError,
    DecodeError,
    IntegrityError,
    LimitExceededError,
    TmdhtError,
    UnknownFormatError,
    UnsupportedStreamError,
    UsageError,
)
from tmdht.pages import (
    DIGEST_SIZE,
    KEY_SIZE,
    PAGE_SIZE,
    ZERO_DIGEST,
    ZERO_PAGE,
    PageDigest,
    dht_key,
    digest_page,
    is_zero_page,
)

__version__ = "0.1.0"

__all__ = [
    "DIGEST_SIZE",
    "KEY_SIZE",
    "PAGE_SIZE",
    "ZERO_DIGEST",
    "ZERO_PAGE",
    "CapacityError",
    "CatalogMismatchError",
    "ConfigError",
    "DecodeError",
    "IntegrityError",
    "LimitExceededError",
    "PageDigest",
    "TmdhtError",
    "UnknownFormatError",
    "UnsupportedStreamError",
    "UsageError",
    "__version__",
    "dht_key",
    "digest_page",
    "is_zero_page",
]
