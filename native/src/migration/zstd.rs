//! zstd for single pages, with the reference's acceptance rules and messages (python-zstandard
//! 0.25 over libzstd 1.5.7, the same library version as the zstd-sys crate here).

use crate::errors::{Error, Result};
use crate::qemu_stream::PAGE_SIZE;
use zstd_safe::{get_error_name, get_frame_content_size, CCtx, DCtx, InBuffer, OutBuffer, ResetDirective};

/// zstd level of compressed pages (the reference's `ZstdCompressor(level=3)`).
pub const LEVEL: i32 = 3;

pub struct PageCompressor {
    cctx: CCtx<'static>,
    out: Vec<u8>,
}

// SAFETY: a compression context is used by one thread at a time (it lives inside a pyclass
// whose methods take &mut self); libzstd contexts have no thread affinity.
unsafe impl Send for PageCompressor {}
// SAFETY: every use needs &mut self.
unsafe impl Sync for PageCompressor {}

impl PageCompressor {
    pub fn new() -> Self {
        PageCompressor { cctx: CCtx::create(), out: Vec::with_capacity(zstd_safe::compress_bound(PAGE_SIZE)) }
    }

    /// One zstd frame of `page` (content size in the header, no checksum).
    pub fn compress(&mut self, page: &[u8]) -> &[u8] {
        self.out.clear();
        self.cctx
            .compress(&mut self.out, page, LEVEL)
            .expect("compressing one page into its bound cannot fail");
        &self.out
    }
}

pub struct PageDecompressor {
    dctx: DCtx<'static>,
}

// SAFETY: as for PageCompressor.
unsafe impl Send for PageDecompressor {}
// SAFETY: every use needs &mut self.
unsafe impl Sync for PageDecompressor {}

impl PageDecompressor {
    pub fn new() -> Self {
        PageDecompressor { dctx: DCtx::create() }
    }

    /// Decompress one page's frame into `out` (the reference's `_decompress`).
    pub fn decompress(&mut self, payload: &[u8], out: &mut [u8]) -> Result<()> {
        match get_frame_content_size(payload) {
            Err(_) => {
                return Err(Error::decode(
                    "bad compressed page: error when determining content size",
                ))
            }
            Ok(Some(n)) if n == PAGE_SIZE as u64 => {}
            Ok(other) => {
                let declared = other.map_or(-1i128, |n| n as i128);
                return Err(Error::decode(format!("compressed page declares {declared} bytes")));
            }
        }
        let _ = self.dctx.reset(ResetDirective::SessionOnly);
        let mut output = OutBuffer::around(&mut out[..PAGE_SIZE]);
        let mut input = InBuffer::around(payload);
        match self.dctx.decompress_stream(&mut output, &mut input) {
            Err(code) => Err(Error::decode(format!(
                "bad compressed page: decompression error: {}",
                get_error_name(code)
            ))),
            Ok(0) if output.pos() == PAGE_SIZE => Ok(()),
            Ok(0) => Err(Error::decode(format!(
                "bad compressed page: decompression error: decompressed 0 bytes; expected {PAGE_SIZE}"
            ))),
            Ok(_) => Err(Error::decode(
                "bad compressed page: decompression error: did not decompress full frame",
            )),
        }
    }
}
