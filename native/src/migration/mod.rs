//! The live-migration pipeline's per-page loops: the sender (QEMU stream → migration records)
//! and the receiver (migration records → QEMU stream). The format and the reference
//! implementation are `tmdht/migration_stream.py`; these are its byte-for-byte twins.

pub mod slab;
pub mod receiver;
pub mod records;
pub mod sender;
pub mod zstd;
