"""Live migration through the proxies, sans-IO: the stream format and the two cores.

- :mod:`tmdht.migration.format` — the records between the sender and the receiver proxy, their
  encoding and limits, and the stream digest (the format is documented there);
- :mod:`tmdht.migration.decoders` — incremental decoders of both directions;
- :mod:`tmdht.migration.sender` — :class:`SenderRewriter`, QEMU's stream to the forward stream;
- :mod:`tmdht.migration.receiver` — :class:`ReceiverRebuilder`, the forward stream back to
  QEMU's stream, verified.

Nothing here touches a socket, a pipe or a clock: the proxies in :mod:`tmdht.client.migration`
feed bytes in and write what comes out. :mod:`tmdht.migration_stream` re-exports the same names.
"""

from tmdht.migration.decoders import ForwardDecoder, ReverseDecoder
from tmdht.migration.format import (
    FLAG_COMPRESS,
    FLAG_WAVE,
    FLAG_WAVE_BUSY,
    MAX_BACKREF_WINDOW,
    MAX_FLOW_WINDOW,
    MAX_HELD,
    MAX_INDEX,
    MAX_MESSAGE,
    MAX_NEED,
    MAX_RAW,
    MIGRATION_MAGIC,
    MIGRATION_VERSION,
    Ack,
    BackRef,
    CompressedPage,
    DeviceState,
    Done,
    End,
    Fallback,
    ForwardRecord,
    FullPage,
    Hello,
    MigrationCounts,
    Need,
    Offer,
    RawBytes,
    RecordType,
    ReverseRecord,
    StreamDigest,
    Template,
    WaveBusy,
    WaveHello,
    encode,
)
from tmdht.migration.receiver import RebuildStats, ReceiverRebuilder
from tmdht.migration.sender import OfferPolicy, SenderRewriter, WaveCounts

__all__ = [
    "FLAG_COMPRESS",
    "FLAG_WAVE",
    "FLAG_WAVE_BUSY",
    "MAX_BACKREF_WINDOW",
    "MAX_FLOW_WINDOW",
    "MAX_HELD",
    "MAX_INDEX",
    "MAX_MESSAGE",
    "MAX_NEED",
    "MAX_RAW",
    "MIGRATION_MAGIC",
    "MIGRATION_VERSION",
    "Ack",
    "BackRef",
    "CompressedPage",
    "DeviceState",
    "Done",
    "End",
    "Fallback",
    "ForwardDecoder",
    "ForwardRecord",
    "FullPage",
    "Hello",
    "MigrationCounts",
    "Need",
    "Offer",
    "OfferPolicy",
    "RawBytes",
    "RebuildStats",
    "ReceiverRebuilder",
    "RecordType",
    "ReverseDecoder",
    "ReverseRecord",
    "SenderRewriter",
    "StreamDigest",
    "Template",
    "WaveBusy",
    "WaveCounts",
    "WaveHello",
    "encode",
]
