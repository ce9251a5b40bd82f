//! The sender's core: QEMU's migration stream in, forward-stream records out (the reference is
//! `SenderRewriter` in tmdht/migration_stream.py).

use std::collections::{HashMap, HashSet, VecDeque};

use crate::errors::{Error, Result};
use crate::migration::records::{
    put_end, put_fallback, put_verbatim, Counts, Hello, BACKREF, DEVICE, PAGE, RAW, TEMPLATE, ZPAGE,
};
use crate::migration::zstd::PageCompressor;
use crate::qemu_stream::{Event, Parser, PAGE_SIZE};

pub type Digest = [u8; 32];

/// Catalog membership: the template digests, hashed once.
pub struct TemplateSet {
    digests: HashSet<Digest>,
}

impl TemplateSet {
    /// From `32 * n` bytes of digests.
    pub fn from_concatenated(raw: &[u8]) -> Result<TemplateSet> {
        if raw.len() % 32 != 0 {
            return Err(Error::value("template digests are 32 bytes each"));
        }
        let mut digests = HashSet::with_capacity(raw.len() / 32);
        for chunk in raw.chunks_exact(32) {
            digests.insert(Digest::try_from(chunk).unwrap());
        }
        Ok(TemplateSet { digests })
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    #[inline]
    pub fn contains(&self, digest: &Digest) -> bool {
        self.digests.contains(digest)
    }
}

pub struct Sender {
    pub hello: Hello,
    templates: TemplateSet,
    compressor: Option<PageCompressor>,
    parser: Parser,
    pending: Vec<u8>,
    pending_base: u64,
    device: bool,
    digest: blake3::Hasher,
    pub tally: Counts,
    next_index: u64,
    recent: HashMap<Digest, u64>,
    recent_order: VecDeque<(u64, Digest)>,
    retained: VecDeque<(u64, Box<[u8; PAGE_SIZE]>)>,
    spare: Vec<Box<[u8; PAGE_SIZE]>>,
    acked_index: u64,
    acked_bytes: u64,
    finished: bool,
    pub ram_bytes: u64,
}

impl Sender {
    pub fn new(hello: Hello, templates: TemplateSet, compress: bool) -> Sender {
        Sender {
            hello,
            templates,
            compressor: if compress { Some(PageCompressor::new()) } else { None },
            parser: Parser::new(),
            pending: Vec::new(),
            pending_base: 0,
            device: false,
            digest: blake3::Hasher::new(),
            tally: Counts::default(),
            next_index: 0,
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            retained: VecDeque::new(),
            spare: Vec::new(),
            acked_index: 0,
            acked_bytes: 0,
            finished: false,
            ram_bytes: 0,
        }
    }

    pub fn unacknowledged(&self) -> u64 {
        self.tally.qemu_bytes - self.acked_bytes
    }

    pub fn window_open(&self) -> bool {
        self.unacknowledged() < self.hello.flow_window
    }

    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// Wire bytes for the next piece of QEMU's stream (whole records).
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        if self.finished {
            return Err(Error::decode("QEMU bytes after the end"));
        }
        if self.parser.closed() {
            return Err(Error::decode("data fed after the stream was closed"));
        }
        self.pending.extend_from_slice(data);
        self.tally.qemu_bytes += data.len() as u64;
        let pending = std::mem::take(&mut self.pending);
        let mut out = Vec::with_capacity(data.len() + 64);
        let result = self.walk(&pending, &mut out);
        self.pending = pending;
        let end = result?;
        self.pending.drain(..end);
        self.pending_base += end as u64;
        Ok(out)
    }

    /// Parse `pending` and write the records for everything complete; returns how far it got.
    fn walk(&mut self, pending: &[u8], out: &mut Vec<u8>) -> Result<usize> {
        let base = self.pending_base;
        let mut pos = 0usize;
        let mut mark = 0usize;
        loop {
            let start = pos;
            let Some(event) = self.parser.next(pending, &mut pos, base)? else { break };
            match event {
                Event::Page { body } => {
                    self.verbatim(&pending[mark..start], out);
                    self.page(&pending[start..body], &pending[body..body + PAGE_SIZE], out)?;
                    mark = body + PAGE_SIZE;
                }
                Event::Zero => self.tally.zero_pages += 1,
                Event::MemSize { total } => self.ram_bytes = total,
                Event::DeviceStateStart { at } => {
                    let at = (at - base) as usize;
                    self.verbatim(&pending[mark..at], out);
                    mark = at;
                    self.device = true;
                }
                Event::Other | Event::Passthrough => {}
            }
        }
        self.verbatim(&pending[mark..pos], out);
        Ok(pos)
    }

    fn verbatim(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if !data.is_empty() {
            self.digest.update(data);
            put_verbatim(out, if self.device { DEVICE } else { RAW }, data);
        }
    }

    fn page(&mut self, prefix: &[u8], page: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.tally.pages += 1;
        let index = self.next_index;
        self.next_index += 1;
        let digest: Digest = *blake3::hash(page).as_bytes();
        self.digest.update(prefix);
        self.digest.update(&digest);
        let earlier = self.recent.get(&digest).copied();
        self.remember(index, digest);
        if let Some(earlier) = earlier {
            self.tally.backref_pages += 1;
            let earlier = u32::try_from(earlier).map_err(|_| {
                Error::value("cannot encode BackRef: 'I' format requires 0 <= number <= 4294967295")
            })?;
            out.push(BACKREF);
            out.extend_from_slice(prefix);
            out.extend_from_slice(&earlier.to_be_bytes());
            return Ok(());
        }
        if self.templates.contains(&digest) {
            self.tally.template_pages += 1;
            let mut kept = self.spare.pop().unwrap_or_else(|| Box::new([0u8; PAGE_SIZE]));
            kept.copy_from_slice(page);
            self.retained.push_back((index, kept));
            out.push(TEMPLATE);
            out.extend_from_slice(prefix);
            out.extend_from_slice(&digest);
            return Ok(());
        }
        if let Some(compressor) = self.compressor.as_mut() {
            let payload = compressor.compress(page);
            if payload.len() < PAGE_SIZE - 64 {
                self.tally.compressed_pages += 1;
                out.push(ZPAGE);
                out.extend_from_slice(prefix);
                out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                out.extend_from_slice(payload);
                return Ok(());
            }
        }
        self.tally.full_pages += 1;
        out.push(PAGE);
        out.extend_from_slice(prefix);
        out.extend_from_slice(page);
        Ok(())
    }

    fn remember(&mut self, index: u64, digest: Digest) {
        self.recent.insert(digest, index);
        self.recent_order.push_back((index, digest));
        let window = self.hello.backref_window as u64;
        while let Some(&(old, old_digest)) = self.recent_order.front() {
            if index < window || old > index - window {
                break;
            }
            self.recent_order.pop_front();
            if self.recent.get(&old_digest) == Some(&old) {
                self.recent.remove(&old_digest);
            }
        }
    }

    /// QEMU's stream ended: the END record.
    pub fn finish(&mut self) -> Result<Vec<u8>> {
        self.parser.close(self.pending_base)?;
        self.finished = true;
        let mut out = Vec::with_capacity(1 + 7 * 8 + 32);
        put_end(&mut out, &self.tally, self.digest.finalize().as_bytes());
        Ok(out)
    }

    pub fn acknowledge(&mut self, index: u64, qemu_bytes: u64) -> Result<()> {
        if index > self.next_index || qemu_bytes > self.tally.qemu_bytes {
            return Err(Error::decode("ACK beyond what was sent"));
        }
        self.acked_index = self.acked_index.max(index);
        self.acked_bytes = self.acked_bytes.max(qemu_bytes);
        while let Some((kept, _)) = self.retained.front() {
            if *kept >= self.acked_index {
                break;
            }
            let (_, page) = self.retained.pop_front().unwrap();
            if self.spare.len() < 1024 {
                self.spare.push(page);
            }
        }
        Ok(())
    }

    /// FALLBACK records for the pages of TEMPLATE records the receiver could not resolve.
    pub fn fallback(&mut self, indices: &[u64]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(indices.len() * (PAGE_SIZE + 8));
        for &index in indices {
            let found = self.retained.binary_search_by_key(&index, |(i, _)| *i);
            let Ok(at) = found else {
                return Err(Error::decode(format!(
                    "NEED for body {index}, which is no kept template page"
                )));
            };
            let page: &[u8] = &self.retained[at].1[..];
            if let Some(compressor) = self.compressor.as_mut() {
                let payload = compressor.compress(page);
                if payload.len() < PAGE_SIZE {
                    put_fallback(&mut out, index as u32, true, payload);
                    continue;
                }
            }
            put_fallback(&mut out, index as u32, false, page);
        }
        Ok(out)
    }
}
