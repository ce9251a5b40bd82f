//! The receiver's core: forward-stream records in, QEMU's migration stream out (the reference
//! is `ReceiverRebuilder` in tmdht/migration_stream.py).
//!
//! Page records become *slots*, one per body index, in order; a template slot waits for its page
//! (`supply`, or a FALLBACK after `unavailable` queued a NEED). `output` writes everything ready,
//! in stream order, stopping at the first slot still waiting. Device state is held until END and
//! the stream digest agree.
//!
//! Pages live in one slab of `window + lag` page slots, body `i` in slot `i % capacity`, written
//! once when the page arrives and read when it is output or back-referenced: no per-page buffer,
//! one copy in and one out. `lag` is the most bodies that can be decoded but not yet written
//! while the sender keeps its flow window (past it the reference's flow check fails anyway), so
//! a slot is never reused while its body is still to be written or may be back-referenced: a
//! back-reference names a body at most `window` behind the slot that names it.

use std::collections::VecDeque;

use crate::errors::{Error, Result};
use crate::migration::slab::Slab;
use crate::migration::records::{
    put_ack, put_need, Counts, ForwardDecoder, Hello, Record, DIGEST_SIZE, MAX_RAW,
};
use crate::migration::zstd::PageDecompressor;
use crate::qemu_stream::PAGE_SIZE;

pub type Digest = [u8; 32];

/// Most device-state bytes held until END (the reference's MAX_HELD).
pub const MAX_HELD: u64 = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotKind {
    Full,
    Template,
    BackRef(u64),
}

struct Slot {
    kind: SlotKind,
    prefix: Vec<u8>,
    digest: Digest,
    filled: bool,
    requested: bool,
}

enum Item {
    Bytes(Vec<u8>),
    DeviceMark,
    EndMark,
    /// The next slot (slots are in body-index order).
    Slot,
}

/// What a receiver did (the reference's RebuildStats).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub pages: u64,
    pub template_pages: u64,
    pub backref_pages: u64,
    pub full_pages: u64,
    pub compressed_pages: u64,
    pub cluster_pages: u64,
    pub fallback_pages: u64,
    pub qemu_bytes: u64,
    pub end: Counts,
}

/// What `output` found ready: how many queue items, the bytes they write now, and whether END
/// comes next.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub items: usize,
    pub bytes: usize,
    pub end_next: bool,
}

pub struct Receiver {
    decoder: ForwardDecoder,
    expected_catalog: Option<Digest>,
    queue: VecDeque<Item>,
    slots: VecDeque<Slot>,
    /// Body index of `slots[0]` (every body below it is written).
    written_index: u64,
    next_index: u64,
    waiting: usize,
    to_resolve: VecDeque<u64>,
    need: Vec<u32>,
    queued_bytes: u64,
    slab: Option<Slab>,
    /// Bodies that may be decoded ahead of the last one written (slab capacity - window).
    lag: u64,
    /// More bodies than `lag` arrived in one feed: pages are no longer stored, and the feed
    /// ends with the flow-window error (as the reference's check after the feed does).
    overflow: bool,
    scratch: Box<[u8; PAGE_SIZE]>,
    ring_digests: Vec<Digest>,
    ring_index: Vec<i64>,
    digest: blake3::Hasher,
    held: Vec<u8>,
    in_device: bool,
    device_started: bool,
    end: Option<(Counts, Digest)>,
    decompressor: PageDecompressor,
    last_ack: (u64, u64),
    pub verified: bool,
    pub stats: Stats,
}

impl Receiver {
    pub fn new(expected_catalog: Option<Digest>) -> Receiver {
        Receiver {
            decoder: ForwardDecoder::new(),
            expected_catalog,
            queue: VecDeque::new(),
            slots: VecDeque::new(),
            written_index: 0,
            next_index: 0,
            waiting: 0,
            to_resolve: VecDeque::new(),
            need: Vec::new(),
            queued_bytes: 0,
            slab: None,
            lag: 0,
            overflow: false,
            scratch: Box::new([0u8; PAGE_SIZE]),
            ring_digests: Vec::new(),
            ring_index: Vec::new(),
            digest: blake3::Hasher::new(),
            held: Vec::new(),
            in_device: false,
            device_started: false,
            end: None,
            decompressor: PageDecompressor::new(),
            last_ack: (0, 0),
            verified: false,
            stats: Stats::default(),
        }
    }

    pub fn hello(&self) -> Option<Hello> {
        self.decoder.hello
    }

    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    pub fn end_seen(&self) -> bool {
        self.end.is_some()
    }

    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Template slots not yet handed out by `wanted` (an upper bound: some may be filled).
    pub fn to_resolve(&self) -> usize {
        self.to_resolve.len()
    }

    pub fn written_index(&self) -> u64 {
        self.written_index
    }

    // -- input -------------------------------------------------------------------------------

    pub fn feed(&mut self, data: &[u8]) -> Result<()> {
        self.decoder.feed(data)?;
        if self.decoder.hello_ready()? {
            while let Some(record) = self.decoder.next()? {
                self.record(record)?;
            }
        }
        if let Some(hello) = self.decoder.hello {
            let limit = hello.flow_window + MAX_RAW as u64 + 2 * PAGE_SIZE as u64;
            if self.queued_bytes > limit {
                return Err(Error::limit(format!(
                    "sender ran {} bytes ahead (flow window {})",
                    self.queued_bytes, hello.flow_window
                )));
            }
        }
        Ok(())
    }

    pub fn close(&mut self) -> Result<()> {
        self.decoder.close()
    }

    fn start(&mut self, hello: Hello) -> Result<()> {
        if let Some(expected) = self.expected_catalog {
            if hello.catalog_id != expected {
                return Err(Error::decode("the sender used another catalog"));
            }
        }
        let window = hello.backref_window as usize;
        let most_queued = hello.flow_window + MAX_RAW as u64 + 2 * PAGE_SIZE as u64;
        self.lag = most_queued / (PAGE_SIZE as u64 + 8) + 2;
        self.slab = Some(Slab::new(window + self.lag as usize));
        self.ring_digests = vec![[0u8; 32]; window];
        self.ring_index = vec![-1; window];
        Ok(())
    }

    fn record(&mut self, record: Record) -> Result<()> {
        if self.slab.is_none() {
            let hello = self.decoder.hello.expect("records come after the hello");
            self.start(hello)?;
        }
        match record {
            Record::Raw { data } => {
                if self.in_device {
                    return Err(Error::decode("RAW record after device state began"));
                }
                let bytes = self.decoder.buf()[data.0..data.1].to_vec();
                self.queued_bytes += bytes.len() as u64;
                self.queue.push_back(Item::Bytes(bytes));
            }
            Record::Device { data } => {
                if !self.in_device {
                    self.in_device = true;
                    self.queue.push_back(Item::DeviceMark);
                }
                let bytes = self.decoder.buf()[data.0..data.1].to_vec();
                self.queued_bytes += bytes.len() as u64;
                self.queue.push_back(Item::Bytes(bytes));
            }
            Record::Page { prefix, data } => {
                self.stats.full_pages += 1;
                let (decoder, page, _) = self.page_for(self.next_index);
                page.copy_from_slice(&decoder.buf()[data..data + PAGE_SIZE]);
                let digest = *blake3::hash(page).as_bytes();
                self.slot(prefix, SlotKind::Full, digest, true)?;
            }
            Record::ZPage { prefix, payload } => {
                self.stats.compressed_pages += 1;
                let index = self.next_index;
                let (decoder, page, decompressor) = self.page_for(index);
                decompressor.decompress(&decoder.buf()[payload.0..payload.1], page)?;
                let digest = *blake3::hash(page).as_bytes();
                self.slot(prefix, SlotKind::Full, digest, true)?;
            }
            Record::Template { prefix, digest } => {
                self.stats.template_pages += 1;
                let digest: Digest =
                    self.decoder.buf()[digest..digest + DIGEST_SIZE].try_into().unwrap();
                let index = self.slot(prefix, SlotKind::Template, digest, false)?;
                self.waiting += 1;
                self.to_resolve.push_back(index);
            }
            Record::BackRef { prefix, index } => {
                self.stats.backref_pages += 1;
                let window = self.ring_index.len() as i128;
                let (index, next) = (index as i128, self.next_index as i128);
                if !(next - window <= index && index < next) {
                    return Err(Error::decode(format!(
                        "back-reference to body {index} outside the window"
                    )));
                }
                self.slot(prefix, SlotKind::BackRef(index as u64), [0u8; 32], false)?;
            }
            Record::Fallback { index, compressed, payload } => {
                let index = index as u64;
                let Some(position) = self.waiting_slot(index) else {
                    return Err(Error::decode(format!(
                        "FALLBACK for body {index}, which waits for nothing"
                    )));
                };
                let (decoder, page, decompressor) = self.page_for(index);
                let raw = &decoder.buf()[payload.0..payload.1];
                if compressed {
                    decompressor.decompress(raw, page)?;
                } else {
                    page.copy_from_slice(raw);
                }
                if *blake3::hash(page).as_bytes() != self.slots[position].digest {
                    return Err(Error::mismatch(format!(
                        "fallback page of body {index} does not match"
                    )));
                }
                self.stats.fallback_pages += 1;
                self.fill(position);
            }
            Record::End { counts, digest } => {
                if !self.in_device {
                    return Err(Error::decode("END before any device state"));
                }
                let digest: Digest =
                    self.decoder.buf()[digest..digest + DIGEST_SIZE].try_into().unwrap();
                self.end = Some((counts, digest));
                self.stats.end = counts;
                self.queue.push_back(Item::EndMark);
            }
        }
        Ok(())
    }

    /// Where the page of body `index` goes (a scratch buffer once the lag overflowed), and the
    /// decoder to read it from.
    fn page_for(&mut self, index: u64) -> (&ForwardDecoder, &mut [u8], &mut PageDecompressor) {
        if index - self.written_index >= self.lag {
            self.overflow = true;
        }
        if self.overflow {
            return (&self.decoder, &mut self.scratch[..], &mut self.decompressor);
        }
        let slab = self.slab.as_mut().expect("slab exists once records came");
        let capacity = slab.slots() as u64;
        (&self.decoder, slab.page_mut((index % capacity) as usize), &mut self.decompressor)
    }

    fn slot(
        &mut self,
        prefix: (usize, usize),
        kind: SlotKind,
        digest: Digest,
        filled: bool,
    ) -> Result<u64> {
        if self.in_device {
            return Err(Error::decode("page record after device state began"));
        }
        let prefix = self.decoder.buf()[prefix.0..prefix.1].to_vec();
        let index = self.next_index;
        self.next_index += 1;
        self.stats.pages += 1;
        self.queued_bytes += (prefix.len() + PAGE_SIZE) as u64;
        self.slots.push_back(Slot { kind, prefix, digest, filled, requested: false });
        self.queue.push_back(Item::Slot);
        Ok(index)
    }

    /// Position in `slots` of the template slot `index` if it still waits for its page.
    fn waiting_slot(&self, index: u64) -> Option<usize> {
        if index < self.written_index {
            return None;
        }
        let position = usize::try_from(index - self.written_index).ok()?;
        let slot = self.slots.get(position)?;
        (slot.kind == SlotKind::Template && !slot.filled).then_some(position)
    }

    fn fill(&mut self, position: usize) {
        self.slots[position].filled = true;
        self.waiting -= 1;
    }

    // -- resolution --------------------------------------------------------------------------

    /// Up to `limit` template slots not yet asked for, in order: (body index, digest).
    pub fn wanted(&mut self, limit: usize) -> Vec<(u64, Digest)> {
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(index) = self.to_resolve.pop_front() else { break };
            if let Some(position) = self.waiting_slot(index) {
                let slot = &mut self.slots[position];
                if !slot.requested {
                    slot.requested = true;
                    out.push((index, slot.digest));
                }
            }
        }
        out
    }

    /// The page of a template slot, already checked against its digest by the caller.
    pub fn supply(&mut self, index: u64, page: &[u8]) -> Result<()> {
        if page.len() != PAGE_SIZE {
            return Err(Error::value(format!("a page is {PAGE_SIZE} bytes, not {}", page.len())));
        }
        if let Some(position) = self.waiting_slot(index) {
            let (_, slot_page, _) = self.page_for(index);
            slot_page.copy_from_slice(page);
            self.stats.cluster_pages += 1;
            self.fill(position);
        }
        Ok(())
    }

    pub fn unavailable(&mut self, indices: &[u64]) {
        for &index in indices {
            if self.waiting_slot(index).is_some() {
                self.need.push(index as u32);
            }
        }
    }

    pub fn requests(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        put_need(&mut out, &self.need);
        self.need.clear();
        out
    }

    pub fn ack(&mut self, every: u64) -> Vec<u8> {
        let state = (self.written_index, self.stats.qemu_bytes);
        if state == self.last_ack {
            return Vec::new();
        }
        if state.1 - self.last_ack.1 < every && !self.queue.is_empty() {
            return Vec::new();
        }
        self.last_ack = state;
        let mut out = Vec::with_capacity(13);
        put_ack(&mut out, state.0 as u32, state.1);
        out
    }

    // -- output ------------------------------------------------------------------------------

    /// What is ready at the head of the queue (stops before END and at the first waiting slot).
    pub fn plan(&self) -> Result<Plan> {
        let mut plan = Plan { items: 0, bytes: 0, end_next: false };
        let mut device = self.device_started;
        let mut held = self.held.len() as u64;
        let mut slot = 0usize;
        for item in &self.queue {
            match item {
                Item::Bytes(data) => {
                    if device {
                        held += data.len() as u64;
                        if held > MAX_HELD {
                            return Err(Error::limit(format!("{held} bytes of device state")));
                        }
                    } else {
                        plan.bytes += data.len();
                    }
                }
                Item::DeviceMark => device = true,
                Item::EndMark => {
                    plan.end_next = true;
                    return Ok(plan);
                }
                Item::Slot => {
                    let s = &self.slots[slot];
                    if !matches!(s.kind, SlotKind::BackRef(_)) && !s.filled {
                        return Ok(plan);
                    }
                    slot += 1;
                    plan.bytes += s.prefix.len() + PAGE_SIZE;
                }
            }
            plan.items += 1;
        }
        Ok(plan)
    }

    /// Everything ready, in order, as one buffer (device state after a verified END).
    pub fn output_vec(&mut self) -> Result<Vec<u8>> {
        let plan = self.plan()?;
        let mut out = vec![0u8; plan.bytes];
        self.emit(plan.items, &mut out)?;
        if plan.end_next {
            out.extend_from_slice(&self.end_reached()?);
        }
        Ok(out)
    }

    /// END is at the head of the queue: verify, and release the held device state.
    pub fn end_reached(&mut self) -> Result<Vec<u8>> {
        debug_assert!(matches!(self.queue.front(), Some(Item::EndMark)));
        self.queue.pop_front();
        self.verify()?;
        Ok(std::mem::take(&mut self.held))
    }

    /// Process the first `items` queue items (all ready, see `plan`), writing their QEMU bytes
    /// into `out`, which is exactly as long as the plan said.
    pub fn emit(&mut self, items: usize, out: &mut [u8]) -> Result<()> {
        let window = self.ring_index.len();
        let mut at_out = 0usize;
        if self.overflow {
            return Err(Error::limit("pages decoded past the flow window"));
        }
        let mut put = |data: &[u8], at_out: &mut usize| {
            out[*at_out..*at_out + data.len()].copy_from_slice(data);
            *at_out += data.len();
        };
        for _ in 0..items {
            match self.queue.pop_front().expect("planned") {
                Item::Bytes(data) => {
                    self.queued_bytes -= data.len() as u64;
                    self.digest.update(&data);
                    self.stats.qemu_bytes += data.len() as u64;
                    if self.device_started {
                        self.held.extend_from_slice(&data);
                    } else {
                        put(&data, &mut at_out);
                    }
                }
                Item::DeviceMark => self.device_started = true,
                Item::EndMark => unreachable!("plan() stops before END"),
                Item::Slot => {
                    let mut slot = self.slots.pop_front().expect("planned");
                    let index = self.written_index;
                    let at = (index % window as u64) as usize;
                    let slab = self.slab.as_mut().expect("slab exists once records came");
                    let capacity = slab.slots() as u64;
                    let here = (index % capacity) as usize;
                    put(&slot.prefix, &mut at_out);
                    if let SlotKind::BackRef(source) = slot.kind {
                        let from = (source % window as u64) as usize;
                        if self.ring_index[from] != source as i64 {
                            return Err(Error::decode(format!(
                                "back-reference to body {source}, overwritten"
                            )));
                        }
                        slot.digest = self.ring_digests[from];
                        slab.copy_within((source % capacity) as usize, here);
                    }
                    put(slab.page(here), &mut at_out);
                    self.ring_digests[at] = slot.digest;
                    self.ring_index[at] = index as i64;
                    self.digest.update(&slot.prefix);
                    self.digest.update(&slot.digest);
                    let size = (slot.prefix.len() + PAGE_SIZE) as u64;
                    self.queued_bytes -= size;
                    self.stats.qemu_bytes += size;
                    self.written_index = index + 1;
                }
            }
        }
        if at_out != out.len() {
            // Never hand QEMU a buffer with bytes nobody wrote (plan() and emit() disagree).
            return Err(Error::decode(format!(
                "internal: planned {} output bytes, wrote {at_out}",
                out.len()
            )));
        }
        Ok(())
    }

    fn verify(&mut self) -> Result<()> {
        let (end, digest) = self.end.expect("END mark comes with END");
        let s = &self.stats;
        let mine = [s.qemu_bytes, s.pages, s.template_pages, s.backref_pages, s.full_pages, s.compressed_pages];
        let theirs = [
            end.qemu_bytes,
            end.pages,
            end.template_pages,
            end.backref_pages,
            end.full_pages,
            end.compressed_pages,
        ];
        if mine != theirs {
            return Err(Error::mismatch(format!(
                "rebuilt stream totals {} differ from the sender's {}",
                py_tuple(&mine),
                py_tuple(&theirs)
            )));
        }
        if *self.digest.finalize().as_bytes() != digest {
            return Err(Error::mismatch(
                "stream digest differs: the rebuilt stream is not what QEMU sent",
            ));
        }
        self.verified = true;
        Ok(())
    }
}

fn py_tuple(values: &[u64]) -> String {
    let parts: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    format!("({})", parts.join(", "))
}
