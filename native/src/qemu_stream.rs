//! QEMU 7.2 precopy migration stream: an incremental parser, the twin of
//! `tmdht/qemu_stream.py` (`QemuStreamParser`).
//!
//! Same grammar, same order of reads and checks, same messages: fed the same bytes in any
//! chunking, it yields the same events and raises the same error at the same point. Events carry
//! positions, never copies; the caller owns the buffer.

use crate::errors::{hex04, py_repr, Error, Kind, Result};

pub const PAGE_SIZE: usize = 4096;
const QEMU_MAGIC: &[u8; 4] = b"QEVM";
const QEMU_VERSION: u32 = 3;
const MAX_CONFIG_NAME: u32 = 256;
const MAX_RAM_BLOCKS: usize = 1024;
const MAX_RAM_BYTES: u64 = 1 << 44;
const FLAGS_MASK: u64 = PAGE_SIZE as u64 - 1;

pub const FLAG_ZERO: u64 = 0x02;
pub const FLAG_MEM_SIZE: u64 = 0x04;
pub const FLAG_PAGE: u64 = 0x08;
pub const FLAG_EOS: u64 = 0x10;
pub const FLAG_CONTINUE: u64 = 0x20;
const UNSUPPORTED_FLAGS: u64 = 0x40 | 0x80 | 0x100 | 0x200;
const KIND_FLAGS: u64 = FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS;

const SECTION_EOF: u8 = 0x00;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SECTION_CONFIGURATION: u8 = 0x07;
const SECTION_COMMAND: u8 = 0x08;
const SECTION_FOOTER: u8 = 0x7e;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Top,
    Ram,
    Footer,
    Passthrough,
}

/// What one step of the parser found (positions are relative to the buffer passed in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Anything the sender passes on verbatim (header, sections, footers, EOS).
    Other,
    /// MEM_SIZE: total RAM bytes.
    MemSize { total: u64 },
    /// PAGE: its body starts at `body` (the record header runs from the event start to it).
    Page { body: usize },
    /// ZERO record.
    Zero,
    /// RAM is over: device state starts at this absolute stream offset.
    DeviceStateStart { at: u64 },
    /// Opaque bytes after the RAM part (everything left in the buffer).
    Passthrough,
}

enum Step {
    NeedMore,
    Malformed,
    Fail(Error),
}

impl From<Error> for Step {
    fn from(e: Error) -> Self {
        Step::Fail(e)
    }
}

type StepResult<T> = std::result::Result<T, Step>;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn take(&mut self, n: usize) -> StepResult<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or(Step::NeedMore)?;
        if end > self.buf.len() {
            return Err(Step::NeedMore);
        }
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    #[inline]
    fn u8(&mut self) -> StepResult<u8> {
        Ok(self.take(1)?[0])
    }
    #[inline]
    fn be32(&mut self) -> StepResult<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    #[inline]
    fn be64(&mut self) -> StepResult<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// u8 length + that many bytes, which must be ASCII (Python decodes them).
    fn idstr(&mut self) -> StepResult<&'a [u8]> {
        let n = self.u8()? as usize;
        let name = self.take(n)?;
        if !name.is_ascii() {
            return Err(Step::Malformed);
        }
        Ok(name)
    }
}

/// The incremental parser's state (the buffer is the caller's).
#[derive(Clone, Debug)]
pub struct Parser {
    state: State,
    ram_section_id: Option<u32>,
    block: Option<usize>,
    blocks: Vec<(Vec<u8>, u64)>,
    ram_done: bool,
    closed: bool,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    pub fn new() -> Self {
        Parser {
            state: State::Header,
            ram_section_id: None,
            block: None,
            blocks: Vec::new(),
            ram_done: false,
            closed: false,
        }
    }

    pub fn in_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Say the input ended at absolute offset `position`: an error unless RAM was over.
    pub fn close(&mut self, position: u64) -> Result<()> {
        self.closed = true;
        if self.state != State::Passthrough {
            let tail = if self.ram_done { "" } else { " (inside the RAM part)" };
            return Err(Error::decode(format!(
                "migration stream truncated at byte {position}{tail}"
            )));
        }
        Ok(())
    }

    /// The next event in `buf[*pos..]` (`base` is the absolute offset of `buf[0]`), advancing
    /// `*pos` past it; `Ok(None)` if the buffer ends inside it (`*pos` unchanged).
    pub fn next(&mut self, buf: &[u8], pos: &mut usize, base: u64) -> Result<Option<Event>> {
        if self.state == State::Passthrough {
            if *pos < buf.len() {
                *pos = buf.len();
                return Ok(Some(Event::Passthrough));
            }
            return Ok(None);
        }
        let start = *pos;
        let mut cur = Cursor { buf, pos: start };
        match self.step(&mut cur, base) {
            Ok(event) => {
                *pos = cur.pos;
                Ok(Some(event))
            }
            Err(Step::NeedMore) => Ok(None),
            Err(Step::Malformed) => Err(Error::decode(format!(
                "malformed migration stream at byte {}",
                base + start as u64
            ))),
            Err(Step::Fail(e)) => Err(e),
        }
    }

    fn step(&mut self, cur: &mut Cursor<'_>, base: u64) -> StepResult<Event> {
        match self.state {
            State::Header => {
                let magic = cur.take(4)?;
                let version = cur.be32()?;
                if magic != QEMU_MAGIC {
                    return Err(Error::decode("not a QEMU migration stream (no QEVM magic)").into());
                }
                if version != QEMU_VERSION {
                    return Err(Error::unsupported(format!(
                        "QEMU stream version {version} (only 3 is known)"
                    ))
                    .into());
                }
                self.state = State::Top;
                Ok(Event::Other)
            }
            State::Ram => self.ram_record(cur),
            State::Footer => self.footer(cur),
            State::Top => self.section(cur, base),
            State::Passthrough => unreachable!("handled by next()"),
        }
    }

    fn section(&mut self, cur: &mut Cursor<'_>, base: u64) -> StepResult<Event> {
        let at = base + cur.pos as u64;
        let kind = cur.u8()?;
        match kind {
            SECTION_CONFIGURATION => {
                let length = cur.be32()?;
                if length > MAX_CONFIG_NAME {
                    return Err(Error::limit(format!("configuration name of {length} bytes")).into());
                }
                let name = cur.take(length as usize)?;
                if !name.is_ascii() {
                    return Err(Step::Malformed);
                }
                Ok(Event::Other)
            }
            SECTION_START | SECTION_FULL => {
                let section_id = cur.be32()?;
                let idstr = cur.idstr()?;
                let _instance_id = cur.be32()?;
                let _version_id = cur.be32()?;
                if idstr == b"ram" && kind == SECTION_START {
                    if self.ram_section_id.is_some() {
                        return Err(Error::decode("a second START(ram) section").into());
                    }
                    self.ram_section_id = Some(section_id);
                    self.state = State::Ram;
                    return Ok(Event::Other);
                }
                if kind == SECTION_START {
                    return Err(Error::unsupported(format!(
                        "iterative section {} besides ram",
                        py_repr(idstr)
                    ))
                    .into());
                }
                self.device_state(cur, at, base)
            }
            SECTION_PART | SECTION_END => {
                let section_id = cur.be32()?;
                if Some(section_id) != self.ram_section_id {
                    return Err(Error::unsupported(format!(
                        "PART/END of section {section_id}, not of ram"
                    ))
                    .into());
                }
                self.state = State::Ram;
                if kind == SECTION_END {
                    self.ram_done = true;
                }
                Ok(Event::Other)
            }
            SECTION_EOF => self.device_state(cur, at, base),
            SECTION_COMMAND => Err(Error::unsupported(
                "QEMU_VM_COMMAND in the stream (postcopy or return path)",
            )
            .into()),
            _ => Err(Error::decode(format!(
                "unknown section type {} at byte {at}",
                hex04(kind as u64)
            ))
            .into()),
        }
    }

    fn device_state(&mut self, cur: &mut Cursor<'_>, at: u64, base: u64) -> StepResult<Event> {
        if self.ram_section_id.is_none() {
            return Err(Error::unsupported("device state before any RAM section").into());
        }
        if !self.ram_done {
            return Err(Error::unsupported("device state before END(ram)").into());
        }
        cur.pos = (at - base) as usize; // hand the section byte itself out verbatim
        self.state = State::Passthrough;
        Ok(Event::DeviceStateStart { at })
    }

    fn footer(&mut self, cur: &mut Cursor<'_>) -> StepResult<Event> {
        let marker = cur.u8()?;
        if marker != SECTION_FOOTER {
            return Err(Error::decode(format!(
                "expected a section footer, found {}",
                hex04(marker as u64)
            ))
            .into());
        }
        let section_id = cur.be32()?;
        if Some(section_id) != self.ram_section_id {
            let expected = self.ram_section_id.map_or("None".to_string(), |s| s.to_string());
            return Err(Error::decode(format!(
                "footer names section {section_id}, expected {expected}"
            ))
            .into());
        }
        self.state = State::Top;
        Ok(Event::Other)
    }

    fn ram_record(&mut self, cur: &mut Cursor<'_>) -> StepResult<Event> {
        let header = cur.be64()?;
        let flags = header & FLAGS_MASK;
        let addr = header & !FLAGS_MASK;
        if flags & UNSUPPORTED_FLAGS != 0 {
            return Err(Step::Fail(Error { kind: Kind::RamFlags, message: flags.to_string() }));
        }
        let kind = flags & KIND_FLAGS;
        if flags & !(KIND_FLAGS | FLAG_CONTINUE) != 0 || kind.count_ones() != 1 {
            return Err(Error::decode(format!("RAM record with flags {flags:#x}")).into());
        }
        if kind == FLAG_EOS {
            self.state = State::Footer;
            return Ok(Event::Other);
        }
        if kind == FLAG_MEM_SIZE {
            return self.mem_size(cur, addr);
        }
        let block = self.block_of(cur, flags)?;
        let (ref name, length) = self.blocks[block];
        if addr >= length {
            return Err(Error::decode(format!(
                "page offset {addr:#x} beyond block {}",
                py_repr(name)
            ))
            .into());
        }
        if kind == FLAG_PAGE {
            let body = cur.pos;
            cur.take(PAGE_SIZE)?;
            return Ok(Event::Page { body });
        }
        cur.u8()?;
        Ok(Event::Zero)
    }

    fn block_of(&mut self, cur: &mut Cursor<'_>, flags: u64) -> StepResult<usize> {
        if flags & FLAG_CONTINUE != 0 {
            return self
                .block
                .ok_or_else(|| Error::decode("CONTINUE record with no previous block").into());
        }
        let name = cur.idstr()?;
        match self.blocks.iter().position(|(n, _)| n.as_slice() == name) {
            Some(i) => {
                self.block = Some(i);
                Ok(i)
            }
            None => Err(Error::decode(format!("page of unknown RAM block {}", py_repr(name))).into()),
        }
    }

    fn mem_size(&mut self, cur: &mut Cursor<'_>, total: u64) -> StepResult<Event> {
        if !self.blocks.is_empty() {
            return Err(Error::decode("a second MEM_SIZE record").into());
        }
        if total > MAX_RAM_BYTES {
            return Err(Error::limit(format!("{total} bytes of RAM")).into());
        }
        if total == 0 {
            return Err(Error::decode("MEM_SIZE of zero bytes").into());
        }
        let mut blocks: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut remaining = total;
        while remaining > 0 {
            if blocks.len() >= MAX_RAM_BLOCKS {
                return Err(Error::limit(format!("more than {MAX_RAM_BLOCKS} RAM blocks")).into());
            }
            let name = cur.idstr()?;
            let length = cur.be64()?;
            if length > remaining || length == 0 {
                return Err(Error::decode(format!(
                    "RAM block {} of {length} bytes does not fit MEM_SIZE",
                    py_repr(name)
                ))
                .into());
            }
            if blocks.iter().any(|(n, _)| n.as_slice() == name) {
                return Err(
                    Error::decode(format!("RAM block {} announced twice", py_repr(name))).into()
                );
            }
            if name.is_empty() {
                return Err(Error::decode("RAM block with an empty name").into());
            }
            blocks.push((name.to_vec(), length));
            remaining -= length;
        }
        self.blocks = blocks;
        Ok(Event::MemSize { total })
    }
}
