//! The migration wire format's records, the twin of `tmdht/migration_stream.py` (which owns and
//! documents the format): encoding of what the sender writes, and the incremental decoder of the
//! forward stream (`ForwardDecoder`), with the reference's checks, order and messages.

use crate::errors::{hex04, Error, Result};
use crate::qemu_stream::{FLAG_CONTINUE, FLAG_PAGE, PAGE_SIZE};

pub const DIGEST_SIZE: usize = 32;
pub const MIGRATION_MAGIC: &[u8; 8] = b"TMDHTMIG";
pub const MIGRATION_VERSION: u8 = 1;
pub const HELLO_SIZE: usize = 8 + 1 + 1 + 32 + 4 + 8;
pub const MAX_RAW: usize = 1 << 20;
pub const MAX_NEED: usize = 4096;
pub const MAX_BACKREF_WINDOW: u32 = 1 << 18;
pub const MAX_FLOW_WINDOW: u64 = 1 << 30;
pub const END_SIZE: usize = 7 * 8 + DIGEST_SIZE;

pub const RAW: u8 = 0x01;
pub const PAGE: u8 = 0x02;
pub const ZPAGE: u8 = 0x03;
pub const TEMPLATE: u8 = 0x04;
pub const BACKREF: u8 = 0x05;
pub const DEVICE: u8 = 0x06;
pub const FALLBACK: u8 = 0x07;
pub const END: u8 = 0x7f;
pub const NEED: u8 = 0x11;
pub const ACK: u8 = 0x12;

/// The first bytes of the forward stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub flags: u8,
    pub catalog_id: [u8; 32],
    pub backref_window: u32,
    pub flow_window: u64,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_SIZE);
        out.extend_from_slice(MIGRATION_MAGIC);
        out.push(MIGRATION_VERSION);
        out.push(self.flags);
        out.extend_from_slice(&self.catalog_id);
        out.extend_from_slice(&self.backref_window.to_be_bytes());
        out.extend_from_slice(&self.flow_window.to_be_bytes());
        out
    }
}

/// The sender's totals, as END carries them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub qemu_bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    pub template_pages: u64,
    pub backref_pages: u64,
    pub full_pages: u64,
    pub compressed_pages: u64,
}

impl Counts {
    pub fn as_array(&self) -> [u64; 7] {
        [
            self.qemu_bytes,
            self.pages,
            self.zero_pages,
            self.template_pages,
            self.backref_pages,
            self.full_pages,
            self.compressed_pages,
        ]
    }
}

// -- encoding (what the sender writes; its inputs are valid by construction) -------------------

/// RAW or DEVICE records for `data`, split at MAX_RAW.
pub fn put_verbatim(out: &mut Vec<u8>, kind: u8, data: &[u8]) {
    for piece in data.chunks(MAX_RAW) {
        out.push(kind);
        out.extend_from_slice(&(piece.len() as u32).to_be_bytes());
        out.extend_from_slice(piece);
    }
}

pub fn put_end(out: &mut Vec<u8>, counts: &Counts, digest: &[u8; 32]) {
    out.push(END);
    for value in counts.as_array() {
        out.extend_from_slice(&value.to_be_bytes());
    }
    out.extend_from_slice(digest);
}

pub fn put_fallback(out: &mut Vec<u8>, index: u32, compressed: bool, payload: &[u8]) {
    out.push(FALLBACK);
    out.extend_from_slice(&index.to_be_bytes());
    out.push(compressed as u8);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

pub fn put_need(out: &mut Vec<u8>, indices: &[u32]) {
    for group in indices.chunks(MAX_NEED) {
        out.push(NEED);
        out.extend_from_slice(&(group.len() as u16).to_be_bytes());
        for index in group {
            out.extend_from_slice(&index.to_be_bytes());
        }
    }
}

pub fn put_ack(out: &mut Vec<u8>, index: u32, qemu_bytes: u64) {
    out.push(ACK);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&qemu_bytes.to_be_bytes());
}

/// A page prefix must be a PAGE record header (the reference's `_check_prefix`).
pub fn check_prefix(prefix: &[u8]) -> Result<()> {
    if prefix.len() < 8 {
        return Err(Error::decode("page prefix shorter than 8 bytes"));
    }
    let flags = u64::from_be_bytes(prefix[..8].try_into().unwrap()) & (PAGE_SIZE as u64 - 1);
    if flags & !(FLAG_PAGE | FLAG_CONTINUE) != 0 || flags & FLAG_PAGE == 0 {
        return Err(Error::decode(format!("page prefix with flags {flags:#x}")));
    }
    let expected = if flags & FLAG_CONTINUE != 0 {
        8
    } else if prefix.len() > 8 && prefix[8] > 0 {
        9 + prefix[8] as usize
    } else {
        return Err(Error::decode("page prefix without CONTINUE names no block"));
    };
    if prefix.len() != expected {
        return Err(Error::decode("page prefix length does not match its idstr"));
    }
    Ok(())
}

// -- decoding ----------------------------------------------------------------------------------

/// One forward record, as positions into the decoder's buffer (valid until the next `feed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Raw { data: (usize, usize) },
    Device { data: (usize, usize) },
    Page { prefix: (usize, usize), data: usize },
    ZPage { prefix: (usize, usize), payload: (usize, usize) },
    Template { prefix: (usize, usize), digest: usize },
    BackRef { prefix: (usize, usize), index: u32 },
    Fallback { index: u32, compressed: bool, payload: (usize, usize) },
    End { counts: Counts, digest: usize },
}

enum Step {
    NeedMore,
    Fail(Error),
}

impl From<Error> for Step {
    fn from(e: Error) -> Self {
        Step::Fail(e)
    }
}

/// Decodes the sender's stream: the hello first, then records (the reference's
/// `ForwardDecoder`, buffering included).
#[derive(Debug, Default)]
pub struct ForwardDecoder {
    buf: Vec<u8>,
    pos: usize,
    closed: bool,
    pub hello: Option<Hello>,
    end_seen: bool,
}

impl ForwardDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn buf(&self) -> &[u8] {
        &self.buf
    }

    pub fn feed(&mut self, data: &[u8]) -> Result<()> {
        if self.closed {
            return Err(Error::decode("data after the stream was closed"));
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    pub fn close(&mut self) -> Result<()> {
        self.closed = true;
        if self.buffered() > 0 {
            return Err(Error::decode(format!(
                "stream ends inside a record ({} bytes left)",
                self.buffered()
            )));
        }
        if !self.end_seen {
            return Err(Error::decode("the stream ended before its END record"));
        }
        Ok(())
    }

    /// Decode the hello if it is complete (call before `next`); Ok(false) if it is not yet.
    pub fn hello_ready(&mut self) -> Result<bool> {
        if self.hello.is_some() {
            return Ok(true);
        }
        let rest = &self.buf[self.pos..];
        if rest.len() < HELLO_SIZE {
            let n = rest.len().min(8);
            if rest[..n] != MIGRATION_MAGIC[..n] {
                return Err(Error::decode("not a tmdht migration stream (bad magic)"));
            }
            return Ok(false);
        }
        if &rest[..8] != MIGRATION_MAGIC {
            return Err(Error::decode("not a tmdht migration stream (bad magic)"));
        }
        let version = rest[8];
        let flags = rest[9];
        let catalog_id: [u8; 32] = rest[10..42].try_into().unwrap();
        let backref = u32::from_be_bytes(rest[42..46].try_into().unwrap());
        let flow = u64::from_be_bytes(rest[46..54].try_into().unwrap());
        if version != MIGRATION_VERSION {
            return Err(Error::decode(format!(
                "migration stream version {version} (only 1 is known)"
            )));
        }
        if !(0 < backref && backref <= MAX_BACKREF_WINDOW) {
            return Err(Error::limit(format!("back-reference window of {backref} pages")));
        }
        if !(0 < flow && flow <= MAX_FLOW_WINDOW) {
            return Err(Error::limit(format!("flow window of {flow} bytes")));
        }
        self.hello = Some(Hello { flags, catalog_id, backref_window: backref, flow_window: flow });
        self.pos += HELLO_SIZE;
        Ok(true)
    }

    /// The next record, or None if the buffer ends inside one. The hello must be decoded.
    pub fn next(&mut self) -> Result<Option<Record>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let kind = self.buf[self.pos];
        let at = self.pos + 1;
        let result = match kind {
            RAW | DEVICE => self.verbatim(at, kind),
            PAGE => self.page(at),
            ZPAGE => self.zpage(at),
            TEMPLATE => self.template(at),
            BACKREF => self.backref(at),
            FALLBACK => self.fallback(at),
            END => self.end(at),
            _ => {
                return Err(Error::decode(format!("unknown record type {}", hex04(kind as u64))))
            }
        };
        let (record, end) = match result {
            Ok(found) => found,
            Err(Step::NeedMore) => return Ok(None),
            Err(Step::Fail(e)) => return Err(e),
        };
        self.pos = end;
        if self.end_seen && !matches!(record, Record::Fallback { .. }) {
            return Err(Error::decode(format!("{} record after END", record_name(&record))));
        }
        if matches!(record, Record::End { .. }) {
            self.end_seen = true;
        }
        Ok(Some(record))
    }

    #[inline]
    fn need(&self, at: usize, n: usize) -> std::result::Result<(), Step> {
        if at + n > self.buf.len() {
            Err(Step::NeedMore)
        } else {
            Ok(())
        }
    }

    #[inline]
    fn be16(&self, at: usize) -> std::result::Result<u16, Step> {
        self.need(at, 2)?;
        Ok(u16::from_be_bytes(self.buf[at..at + 2].try_into().unwrap()))
    }

    #[inline]
    fn be32(&self, at: usize) -> std::result::Result<u32, Step> {
        self.need(at, 4)?;
        Ok(u32::from_be_bytes(self.buf[at..at + 4].try_into().unwrap()))
    }

    fn verbatim(&self, at: usize, kind: u8) -> std::result::Result<(Record, usize), Step> {
        let n = self.be32(at)? as usize;
        if !(0 < n && n <= MAX_RAW) {
            return Err(Error::limit(format!("verbatim record of {n} bytes")).into());
        }
        self.need(at + 4, n)?;
        let data = (at + 4, at + 4 + n);
        let record = if kind == RAW { Record::Raw { data } } else { Record::Device { data } };
        Ok((record, at + 4 + n))
    }

    fn prefix(&self, at: usize) -> std::result::Result<((usize, usize), usize), Step> {
        self.need(at, 8)?;
        let n = if self.buf[at + 7] as u64 & FLAG_CONTINUE != 0 {
            8
        } else {
            self.need(at, 9)?;
            9 + self.buf[at + 8] as usize
        };
        self.need(at, n)?;
        check_prefix(&self.buf[at..at + n])?;
        Ok(((at, at + n), at + n))
    }

    fn page(&self, at: usize) -> std::result::Result<(Record, usize), Step> {
        let (prefix, at) = self.prefix(at)?;
        self.need(at, PAGE_SIZE)?;
        Ok((Record::Page { prefix, data: at }, at + PAGE_SIZE))
    }

    fn zpage(&self, at: usize) -> std::result::Result<(Record, usize), Step> {
        let (prefix, at) = self.prefix(at)?;
        let n = self.be16(at)? as usize;
        if !(0 < n && n < PAGE_SIZE) {
            return Err(Error::limit(format!("compressed page of {n} bytes")).into());
        }
        self.need(at + 2, n)?;
        Ok((Record::ZPage { prefix, payload: (at + 2, at + 2 + n) }, at + 2 + n))
    }

    fn template(&self, at: usize) -> std::result::Result<(Record, usize), Step> {
        let (prefix, at) = self.prefix(at)?;
        self.need(at, DIGEST_SIZE)?;
        Ok((Record::Template { prefix, digest: at }, at + DIGEST_SIZE))
    }

    fn backref(&self, at: usize) -> std::result::Result<(Record, usize), Step> {
        let (prefix, at) = self.prefix(at)?;
        let index = self.be32(at)?;
        Ok((Record::BackRef { prefix, index }, at + 4))
    }

    fn fallback(&self, at: usize) -> std::result::Result<(Record, usize), Step> {
        self.need(at, 7)?;
        let index = u32::from_be_bytes(self.buf[at..at + 4].try_into().unwrap());
        let encoding = self.buf[at + 4];
        let n = u16::from_be_bytes(self.buf[at + 5..at + 7].try_into().unwrap()) as usize;
        if encoding > 1 {
            return Err(Error::decode(format!("fallback encoding {encoding}")).into());
        }
        if !(0 < n && n <= PAGE_SIZE) || (encoding == 0 && n != PAGE_SIZE) {
            return Err(Error::limit(format!("fallback payload of {n} bytes")).into());
        }
        let at = at + 7;
        self.need(at, n)?;
        Ok((Record::Fallback { index, compressed: encoding == 1, payload: (at, at + n) }, at + n))
    }

    fn end(&self, at: usize) -> std::result::Result<(Record, usize), Step> {
        self.need(at, END_SIZE)?;
        let mut values = [0u64; 7];
        for (i, value) in values.iter_mut().enumerate() {
            let from = at + 8 * i;
            *value = u64::from_be_bytes(self.buf[from..from + 8].try_into().unwrap());
        }
        let counts = Counts {
            qemu_bytes: values[0],
            pages: values[1],
            zero_pages: values[2],
            template_pages: values[3],
            backref_pages: values[4],
            full_pages: values[5],
            compressed_pages: values[6],
        };
        Ok((Record::End { counts, digest: at + 56 }, at + END_SIZE))
    }
}

/// The reference's record class names (for "X record after END").
fn record_name(record: &Record) -> &'static str {
    match record {
        Record::Raw { .. } => "RawBytes",
        Record::Device { .. } => "DeviceState",
        Record::Page { .. } => "FullPage",
        Record::ZPage { .. } => "CompressedPage",
        Record::Template { .. } => "Template",
        Record::BackRef { .. } => "BackRef",
        Record::Fallback { .. } => "Fallback",
        Record::End { .. } => "End",
    }
}
