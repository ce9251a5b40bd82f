//! The cluster data plane's hot datagrams: PAGES answers decoded and verified in bursts.
//!
//! The format and the reference implementation are `tmdht/wire.py` (layout), `tmdht/auth.py`
//! (the auth block) and `tmdht/net/burst.py` (what a burst decode returns); this is their twin
//! for PAGES datagrams of wire version 2, the only bulky answer a client receives. Per datagram,
//! in the reference's order: size limits, the auth block (open mode or keyed BLAKE3 tag), then
//! the header and body, then each page of the bulk against the digest the body names for it.
//!
//! The replay window stays in Python (it is state shared with every other datagram type): an
//! authentic datagram comes back with its key id, timestamp and nonce, and the caller checks
//! them before it trusts the rest, whether the body was good or not, exactly as
//! `Authenticator.open` does before `wire.decode` reads the body.

use crate::errors::Error;

pub const PROTOCOL_VERSION: u8 = 2;
pub const PAGES: u8 = 2;
pub const HEADER_SIZE: usize = 20;
pub const AUTH_OVERHEAD: usize = 34;
pub const TAG_SIZE: usize = 16;
pub const OVERHEAD: usize = HEADER_SIZE + AUTH_OVERHEAD;
pub const DIGEST_SIZE: usize = 32;
pub const PAGE_SIZE: usize = 4096;
pub const MAX_DATAGRAM: usize = 65507;
pub const MIN_DATAGRAM: usize = OVERHEAD + 4 + DIGEST_SIZE + PAGE_SIZE;
const FLAG_OPEN: u8 = 0x01;
/// `tmdht.wire.ErrorCode.MALFORMED`.
pub const MALFORMED: u16 = 1;

/// How datagrams are authenticated: open mode, or the tag keys accepted now (by key id).
pub enum Keys {
    Open,
    Keyed(Vec<(u8, [u8; 32])>),
}

impl Keys {
    fn tag_key(&self, key_id: u8) -> Option<&[u8; 32]> {
        match self {
            Keys::Open => None,
            Keys::Keyed(keys) => keys.iter().find(|(id, _)| *id == key_id).map(|(_, k)| k),
        }
    }
}

/// The auth block of an authentic datagram: what the replay window checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub key_id: u8,
    pub timestamp_ms: u64,
    pub nonce: u64,
}

/// A decoded, verified PAGES part. Offsets index the datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct PagesPart {
    pub request_id: u64,
    pub part: u16,
    pub parts: u16,
    /// Digests start here: `pages` of them (each paired with a page of the bulk), then `missing`.
    pub digests_at: usize,
    pub pages: usize,
    pub missing: usize,
    /// The bulk (pages) starts here.
    pub bulk_at: usize,
    /// Per page: its BLAKE3 digest is the one the body names for it.
    pub matches: Vec<bool>,
}

/// Why an authentic datagram's header or body was refused (`MessageDecodeError`).
#[derive(Debug, PartialEq, Eq)]
pub struct BodyError {
    pub request_id: u64,
    pub message_type: u8,
    pub code: u16,
    pub reason: String,
}

/// What became of one datagram (`T`: what its body decodes to).
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// Not a version-2 datagram of the type asked for: the caller decodes it with the reference.
    Other,
    /// Refused before or by the auth check (`DecodeError` / `LimitExceededError` /
    /// `AuthenticationError`): no state may change.
    Refused(Error, bool),
    /// Authentic: check the stamp, then take the body or the body error.
    Authentic(Stamp, Result<T, BodyError>),
}

/// What became of one PAGES datagram.
pub type Outcome = Decoded<PagesPart>;

fn u16_at(data: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([data[at], data[at + 1]])
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(data[at..at + 8].try_into().expect("8 bytes"))
}

fn eq_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The auth error: `true` in `Refused` marks an `AuthenticationError`.
fn auth_error<T>(message: impl Into<String>) -> Decoded<T> {
    Decoded::Refused(Error::decode(message), true)
}

/// Decode and verify one datagram (see the module docs). `max_datagram` is already checked.
pub fn decode_pages(data: &[u8], max_datagram: usize, keys: &Keys) -> Outcome {
    match authenticate(data, max_datagram, keys, PAGES) {
        Ok((stamp, end)) => Outcome::Authentic(stamp, decode_body(data, end)),
        Err(outcome) => outcome,
    }
}

/// Size limits and the auth block of a version-2 datagram of `message_type` (in
/// `tmdht.wire.decode`'s order): the stamp and where the auth block ends, or the outcome.
fn authenticate<T>(
    data: &[u8],
    max_datagram: usize,
    keys: &Keys,
    message_type: u8,
) -> Result<(Stamp, usize), Decoded<T>> {
    let size = data.len();
    if size < 2 || data[0] != PROTOCOL_VERSION || data[1] != message_type {
        return Err(Decoded::Other);
    }
    if size > max_datagram {
        return Err(Decoded::Refused(
            Error::limit(format!("datagram of {size} bytes exceeds max_datagram {max_datagram}")),
            false,
        ));
    }
    if size < OVERHEAD {
        return Err(Decoded::Refused(
            Error::decode(format!(
                "datagram of {size} bytes is shorter than the {OVERHEAD}-byte minimum"
            )),
            false,
        ));
    }
    // -- the auth block (tmdht.auth.Authenticator.open with end=bulk) --
    let body_length = u32_at(data, 16) as usize;
    let end = OVERHEAD + body_length;
    if end > size {
        return Err(auth_error(format!(
            "auth block ending at byte {end} lies outside the {size}-byte datagram"
        )));
    }
    let block_at = end - AUTH_OVERHEAD;
    let tag_at = end - TAG_SIZE;
    let key_id = data[block_at];
    let flags = data[block_at + 1];
    let timestamp_ms = u64_at(data, block_at + 2);
    let nonce = u64_at(data, block_at + 10);
    match keys {
        Keys::Open => {
            if flags & FLAG_OPEN == 0 {
                return Err(auth_error(format!(
                    "keyed datagram (key id {key_id}) refused: this node runs in open mode"
                )));
            }
            if flags != FLAG_OPEN || key_id != 0 || data[tag_at..end].iter().any(|&b| b != 0) {
                return Err(auth_error("malformed open-mode auth block"));
            }
        }
        Keys::Keyed(_) => {
            if flags & FLAG_OPEN != 0 {
                return Err(auth_error("open (unauthenticated) datagram refused"));
            }
            if flags != 0 {
                return Err(auth_error(format!("unknown auth flags 0x{flags:02x}")));
            }
            let Some(key) = keys.tag_key(key_id) else {
                return Err(auth_error(format!("unknown or expired key id {key_id}")));
            };
            let mut hasher = blake3::Hasher::new_keyed(key);
            hasher.update(&data[..tag_at]);
            let mut tag = [0u8; TAG_SIZE];
            hasher.finalize_xof().fill(&mut tag);
            if !eq_constant_time(&tag, &data[tag_at..end]) {
                return Err(auth_error(format!("bad tag (key id {key_id})")));
            }
        }
    }
    Ok((Stamp { key_id, timestamp_ms, nonce }, end))
}

/// The header of an authentic datagram and the counts that open its body, checked as
/// `tmdht.wire.decode` and its body decoders check them, in their order and with their texts:
/// reserved flags, part of parts (`single`: only part 0 of 1 is valid), no bytes after the auth
/// block for a type without bulk, then a body long enough for its `counts` bytes of counts.
struct Head {
    request_id: u64,
    part: u16,
    parts: u16,
    message_type: u8,
    /// The counts start here (the body's first byte); the body ends at `body_end`.
    counts_at: usize,
    body_end: usize,
}

impl Head {
    fn check(
        data: &[u8],
        end: usize,
        message_type: u8,
        counts: usize,
        single: bool,
        bulk: bool,
    ) -> Result<Head, BodyError> {
        let head = Head {
            request_id: u64_at(data, 4),
            part: u16_at(data, 12),
            parts: u16_at(data, 14),
            message_type,
            counts_at: HEADER_SIZE,
            body_end: end - AUTH_OVERHEAD,
        };
        let flags = u16_at(data, 2);
        if flags != 0 {
            return Err(head.error(format!("reserved header flags 0x{flags:04x} are set")));
        }
        if head.part >= head.parts || (single && head.parts != 1) {
            let (part, parts) = (head.part, head.parts);
            return Err(head.error(format!("part {part} of {parts} is not valid for this message type")));
        }
        if !bulk && data.len() != end {
            return Err(head.error(format!(
                "{} bytes after the auth block of a type without bulk",
                data.len() - end
            )));
        }
        let length = head.body_end - head.counts_at;
        if length < counts {
            return Err(head.error(format!("body of {length} bytes is too short for its counts")));
        }
        Ok(head)
    }

    /// A MALFORMED body error of this datagram.
    fn error(&self, reason: String) -> BodyError {
        BodyError { request_id: self.request_id, message_type: self.message_type, code: MALFORMED, reason }
    }

    /// `tmdht.wire._expect_length`: the body after the counts is exactly what they need.
    fn expect_length(&self, from: usize, expected: usize) -> Result<(), BodyError> {
        let actual = self.body_end - from;
        if actual != expected {
            return Err(self.error(format!("body is {actual} bytes, its counts need {expected}")));
        }
        Ok(())
    }
}

fn decode_body(data: &[u8], end: usize) -> Result<PagesPart, BodyError> {
    let head = Head::check(data, end, PAGES, 4, false, true)?;
    let start = head.counts_at;
    let pages = u16_at(data, start) as usize;
    let missing = u16_at(data, start + 2) as usize;
    let digests_at = start + 4;
    head.expect_length(digests_at, (pages + missing) * DIGEST_SIZE)?;
    let bulk_at = end;
    let bulk = data.len() - bulk_at;
    if bulk != pages * PAGE_SIZE {
        return Err(head.error(format!(
            "bulk is {bulk} bytes, the body's {pages} pages need {}",
            pages * PAGE_SIZE
        )));
    }
    let matches = (0..pages)
        .map(|i| {
            let page = &data[bulk_at + i * PAGE_SIZE..bulk_at + (i + 1) * PAGE_SIZE];
            let digest = &data[digests_at + i * DIGEST_SIZE..digests_at + (i + 1) * DIGEST_SIZE];
            blake3::hash(page).as_bytes() == digest
        })
        .collect();
    let (request_id, part, parts) = (head.request_id, head.part, head.parts);
    Ok(PagesPart { request_id, part, parts, digests_at, pages, missing, bulk_at, matches })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(pages: &[&[u8]], missing: usize, key: Option<(u8, [u8; 32])>) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(pages.len() as u16).to_be_bytes());
        body.extend_from_slice(&(missing as u16).to_be_bytes());
        for page in pages {
            body.extend_from_slice(blake3::hash(page).as_bytes());
        }
        body.extend(std::iter::repeat_n(7u8, missing * DIGEST_SIZE));
        let mut out = vec![PROTOCOL_VERSION, PAGES, 0, 0];
        out.extend_from_slice(&42u64.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        match key {
            None => {
                out.extend_from_slice(&[0, FLAG_OPEN]);
                out.extend_from_slice(&5u64.to_be_bytes());
                out.extend_from_slice(&9u64.to_be_bytes());
                out.extend_from_slice(&[0; TAG_SIZE]);
            }
            Some((id, k)) => {
                out.extend_from_slice(&[id, 0]);
                out.extend_from_slice(&5u64.to_be_bytes());
                out.extend_from_slice(&9u64.to_be_bytes());
                let mut tag = [0u8; TAG_SIZE];
                blake3::Hasher::new_keyed(&k).update(&out).finalize_xof().fill(&mut tag);
                out.extend_from_slice(&tag);
            }
        }
        for page in pages {
            out.extend_from_slice(page);
        }
        out
    }

    #[test]
    fn open_and_keyed_parts_verify_each_page() {
        let a = vec![1u8; PAGE_SIZE];
        let b = vec![2u8; PAGE_SIZE];
        let data = datagram(&[&a, &b], 1, None);
        let Outcome::Authentic(stamp, Ok(part)) = decode_pages(&data, MAX_DATAGRAM, &Keys::Open)
        else {
            panic!("not decoded")
        };
        assert_eq!(stamp, Stamp { key_id: 0, timestamp_ms: 5, nonce: 9 });
        assert_eq!((part.request_id, part.pages, part.missing), (42, 2, 1));
        assert_eq!(part.matches, vec![true, true]);
        let key = [3u8; 32];
        let mut data = datagram(&[&a, &b], 0, Some((4, key)));
        let keys = Keys::Keyed(vec![(4, key)]);
        assert!(matches!(decode_pages(&data, MAX_DATAGRAM, &keys), Outcome::Authentic(_, Ok(_))));
        let last = data.len() - 1;
        data[last] ^= 1; // a page byte: outside the tag, caught by its digest
        let Outcome::Authentic(_, Ok(part)) = decode_pages(&data, MAX_DATAGRAM, &keys) else {
            panic!("not decoded")
        };
        assert_eq!(part.matches, vec![true, false]);
        data[30] ^= 1; // a digest byte: under the tag
        assert!(matches!(decode_pages(&data, MAX_DATAGRAM, &keys), Outcome::Refused(_, true)));
        assert!(matches!(decode_pages(&data, MAX_DATAGRAM, &Keys::Open), Outcome::Refused(_, true)));
    }

    #[test]
    fn truncation_never_panics() {
        let a = vec![1u8; PAGE_SIZE];
        let data = datagram(&[&a], 2, None);
        for cut in 0..data.len() {
            let _ = decode_pages(&data[..cut], MAX_DATAGRAM, &Keys::Open);
        }
        assert!(matches!(decode_pages(&data, 100, &Keys::Open), Outcome::Refused(_, false)));
    }
}

// -- the node's side: PAGES answers sealed natively ------------------------------------------

/// `tmdht.wire.encode_pages_buffers`'s plan: (first page, end page, first missing, end missing)
/// per part. Pages fill the parts first; missing digests fill the room left in the last page
/// part, then parts of their own; an empty answer is one empty part.
pub fn plan_parts(pages: usize, missing: usize, max_datagram: usize) -> Vec<(usize, usize, usize, usize)> {
    let budget = max_datagram - OVERHEAD - 4;
    let per_part = budget / (DIGEST_SIZE + PAGE_SIZE);
    let mut plan = Vec::new();
    let (mut page_at, mut missing_at) = (0, 0);
    loop {
        let page_end = pages.min(page_at + per_part);
        let room = budget - (page_end - page_at) * (DIGEST_SIZE + PAGE_SIZE);
        let missing_end = missing.min(missing_at + room / DIGEST_SIZE);
        plan.push((page_at, page_end, missing_at, missing_end));
        page_at = page_end;
        missing_at = missing_end;
        if page_at == pages && missing_at == missing {
            return plan;
        }
    }
}

/// How a sender seals: open mode, or a key id and its tag key.
pub enum Sealer<'a> {
    Open,
    Keyed(u8, &'a [u8; 32]),
}

impl<'a> Sealer<'a> {
    /// Open mode without a tag key, else keyed.
    pub fn of(key_id: u8, tag_key: Option<&'a [u8; 32]>) -> Self {
        match tag_key {
            None => Sealer::Open,
            Some(key) => Sealer::Keyed(key_id, key),
        }
    }
}

/// A datagram's header (`tmdht.wire`'s `_HEADER`, no flags) in a buffer with room for the
/// `body` bytes and the auth block that follow it.
fn header(message_type: u8, request_id: u64, part: u16, parts: u16, body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(OVERHEAD + body);
    out.extend_from_slice(&[PROTOCOL_VERSION, message_type, 0, 0]);
    out.extend_from_slice(&request_id.to_be_bytes());
    out.extend_from_slice(&part.to_be_bytes());
    out.extend_from_slice(&parts.to_be_bytes());
    out.extend_from_slice(&(body as u32).to_be_bytes());
    out
}

/// The head of one PAGES datagram: header, body (the digests of its pages, then its missing
/// digests) and the sealed auth block; its pages follow it on the wire, outside the tag.
#[allow(clippy::too_many_arguments)]
pub fn pages_head(
    request_id: u64,
    part: u16,
    parts: u16,
    found: &[&[u8]],
    missing: &[&[u8]],
    sealer: &Sealer<'_>,
    timestamp_ms: u64,
    nonce: u64,
) -> Vec<u8> {
    let body = 4 + (found.len() + missing.len()) * DIGEST_SIZE;
    let mut out = header(PAGES, request_id, part, parts, body);
    out.extend_from_slice(&(found.len() as u16).to_be_bytes());
    out.extend_from_slice(&(missing.len() as u16).to_be_bytes());
    for digest in found.iter().chain(missing) {
        out.extend_from_slice(digest);
    }
    seal_into(&mut out, sealer, timestamp_ms, nonce);
    out
}

#[cfg(test)]
mod sealing_tests {
    use super::*;

    #[test]
    fn sealed_heads_decode_as_pages() {
        let page = vec![9u8; PAGE_SIZE];
        let digest = *blake3::hash(&page).as_bytes();
        let key = [5u8; 32];
        let plan = plan_parts(1, 0, 32768);
        assert_eq!(plan, vec![(0, 1, 0, 0)]);
        let mut data = pages_head(7, 0, 1, &[&digest], &[], &Sealer::Keyed(2, &key), 1, 2);
        data.extend_from_slice(&page);
        let keys = Keys::Keyed(vec![(2, key)]);
        let Outcome::Authentic(_, Ok(part)) = decode_pages(&data, MAX_DATAGRAM, &keys) else {
            panic!("not decoded")
        };
        assert_eq!(part.matches, vec![true]);
        assert_eq!(plan_parts(0, 0, MIN_DATAGRAM), vec![(0, 0, 0, 0)]);
        assert_eq!(plan_parts(3, 200, MIN_DATAGRAM).len(), 3 + 200usize.div_ceil((MIN_DATAGRAM - OVERHEAD - 4) / 32));
    }
}

// -- the node's side: PUT_RESULT answers sealed natively ---------------------------------------

/// `tmdht.wire.MessageType.PUT_RESULT`.
pub const PUT_RESULT: u8 = 4;
/// One (digest, status) entry of a PUT_RESULT body.
pub const RESULT_ENTRY: usize = DIGEST_SIZE + 1;

/// Entries per PUT_RESULT datagram (`tmdht.wire.encode_put_response`'s `per_part`).
pub fn results_per_part(max_datagram: usize) -> usize {
    (max_datagram - OVERHEAD - 2) / RESULT_ENTRY
}

/// Seal the auth block onto `out` (header and body already in it), as `Authenticator.seal`.
fn seal_into(out: &mut Vec<u8>, sealer: &Sealer<'_>, timestamp_ms: u64, nonce: u64) {
    match sealer {
        Sealer::Open => {
            out.extend_from_slice(&[0, FLAG_OPEN]);
            out.extend_from_slice(&timestamp_ms.to_be_bytes());
            out.extend_from_slice(&nonce.to_be_bytes());
            out.extend_from_slice(&[0; TAG_SIZE]);
        }
        Sealer::Keyed(key_id, key) => {
            out.extend_from_slice(&[*key_id, 0]);
            out.extend_from_slice(&timestamp_ms.to_be_bytes());
            out.extend_from_slice(&nonce.to_be_bytes());
            let mut tag = [0u8; TAG_SIZE];
            blake3::Hasher::new_keyed(key).update(out).finalize_xof().fill(&mut tag);
            out.extend_from_slice(&tag);
        }
    }
}

/// One sealed PUT_RESULT datagram: header, body (count, then digest and status byte per entry)
/// and the auth block. Digests are 32 bytes (the caller checked).
#[allow(clippy::too_many_arguments)]
pub fn put_result_datagram(
    request_id: u64,
    part: u16,
    parts: u16,
    digests: &[&[u8]],
    statuses: &[u8],
    sealer: &Sealer<'_>,
    timestamp_ms: u64,
    nonce: u64,
) -> Vec<u8> {
    let body = 2 + digests.len() * RESULT_ENTRY;
    let mut out = header(PUT_RESULT, request_id, part, parts, body);
    out.extend_from_slice(&(digests.len() as u16).to_be_bytes());
    for (digest, status) in digests.iter().zip(statuses) {
        out.extend_from_slice(digest);
        out.push(*status);
    }
    seal_into(&mut out, sealer, timestamp_ms, nonce);
    out
}

#[cfg(test)]
mod put_result_tests {
    use super::*;

    #[test]
    fn a_put_result_has_its_layout_and_tag() {
        let digest = [7u8; DIGEST_SIZE];
        let key = [5u8; 32];
        let data = put_result_datagram(9, 0, 1, &[&digest, &digest], &[1, 2], &Sealer::Keyed(3, &key), 4, 6);
        assert_eq!(data.len(), OVERHEAD + 2 + 2 * RESULT_ENTRY);
        assert_eq!(&data[..2], &[PROTOCOL_VERSION, PUT_RESULT]);
        assert_eq!(u32_at(&data, 16) as usize, 2 + 2 * RESULT_ENTRY);
        assert_eq!(data[HEADER_SIZE + 2 + DIGEST_SIZE], 1);
        let tag_at = data.len() - TAG_SIZE;
        let mut tag = [0u8; TAG_SIZE];
        blake3::Hasher::new_keyed(&key).update(&data[..tag_at]).finalize_xof().fill(&mut tag);
        assert_eq!(&data[tag_at..], &tag);
        assert_eq!(results_per_part(32768), (32768 - OVERHEAD - 2) / 33);
    }
}

// -- the node's side: PUT_PAGES requests decoded natively --------------------------------------

/// `tmdht.wire.MessageType.PUT_PAGES`.
pub const PUT_PAGES: u8 = 3;

/// A decoded PUT_PAGES request. Offsets index the datagram; its pages are *not* verified here
/// (the store checks each against its digest, as with the reference decoder).
#[derive(Debug, PartialEq, Eq)]
pub struct PutRequest {
    pub request_id: u64,
    /// `count` digests start here, pages (one per digest) at `bulk_at`.
    pub digests_at: usize,
    pub count: usize,
    pub bulk_at: usize,
}

/// Decode one PUT_PAGES datagram: `tmdht.wire.decode`'s checks and messages, in its order.
pub fn decode_put(data: &[u8], max_datagram: usize, keys: &Keys) -> Decoded<PutRequest> {
    match authenticate(data, max_datagram, keys, PUT_PAGES) {
        Ok((stamp, end)) => Decoded::Authentic(stamp, decode_put_body(data, end)),
        Err(outcome) => outcome,
    }
}

fn decode_put_body(data: &[u8], end: usize) -> Result<PutRequest, BodyError> {
    let head = Head::check(data, end, PUT_PAGES, 2, true, true)?;
    let count = u16_at(data, head.counts_at) as usize;
    let digests_at = head.counts_at + 2;
    head.expect_length(digests_at, count * DIGEST_SIZE)?;
    if count == 0 {
        return Err(head.error("PUT_PAGES carries at least one page".to_string()));
    }
    let bulk = data.len() - end;
    if bulk != count * PAGE_SIZE {
        return Err(head.error(format!(
            "bulk is {bulk} bytes, the body's {count} pages need {}",
            count * PAGE_SIZE
        )));
    }
    Ok(PutRequest { request_id: head.request_id, digests_at, count, bulk_at: end })
}

#[cfg(test)]
mod put_tests {
    use super::*;

    fn put_datagram(pages: &[&[u8]], key: &[u8; 32]) -> Vec<u8> {
        let mut out = vec![PROTOCOL_VERSION, PUT_PAGES, 0, 0];
        out.extend_from_slice(&11u64.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&((2 + pages.len() * DIGEST_SIZE) as u32).to_be_bytes());
        out.extend_from_slice(&(pages.len() as u16).to_be_bytes());
        for page in pages {
            out.extend_from_slice(blake3::hash(page).as_bytes());
        }
        seal_into(&mut out, &Sealer::Keyed(2, key), 5, 9);
        for page in pages {
            out.extend_from_slice(page);
        }
        out
    }

    #[test]
    fn put_requests_decode_and_refuse_like_the_reference() {
        let key = [4u8; 32];
        let keys = Keys::Keyed(vec![(2, key)]);
        let a = vec![1u8; PAGE_SIZE];
        let data = put_datagram(&[&a, &a], &key);
        let Decoded::Authentic(stamp, Ok(put)) = decode_put(&data, MAX_DATAGRAM, &keys) else {
            panic!("not decoded")
        };
        assert_eq!(stamp, Stamp { key_id: 2, timestamp_ms: 5, nonce: 9 });
        assert_eq!((put.request_id, put.count, put.bulk_at + 2 * PAGE_SIZE), (11, 2, data.len()));
        let Decoded::Authentic(_, Err(error)) = decode_put(&data[..data.len() - 1], MAX_DATAGRAM, &keys)
        else {
            panic!("bulk not checked")
        };
        assert!(error.reason.starts_with("bulk is"));
        for cut in 0..data.len() {
            let _ = decode_put(&data[..cut], MAX_DATAGRAM, &keys);
        }
        assert!(matches!(decode_put(&data, MAX_DATAGRAM, &Keys::Open), Decoded::Refused(_, true)));
    }
}

// -- the client's side: PUT_RESULT answers decoded, PUT_PAGES requests sealed ----------------

/// The highest `tmdht.wire.PutStatus` value (they run 1..=5).
pub const MAX_PUT_STATUS: u8 = 5;

/// A decoded PUT_RESULT part. Its `count` entries (digest, status byte) start at `entries_at`.
#[derive(Debug, PartialEq, Eq)]
pub struct PutResults {
    pub request_id: u64,
    pub part: u16,
    pub parts: u16,
    pub entries_at: usize,
    pub count: usize,
}

/// Decode one PUT_RESULT datagram: `tmdht.wire.decode`'s checks and messages, in its order.
pub fn decode_put_result(data: &[u8], max_datagram: usize, keys: &Keys) -> Decoded<PutResults> {
    match authenticate(data, max_datagram, keys, PUT_RESULT) {
        Ok((stamp, end)) => Decoded::Authentic(stamp, decode_put_result_body(data, end)),
        Err(outcome) => outcome,
    }
}

fn decode_put_result_body(data: &[u8], end: usize) -> Result<PutResults, BodyError> {
    let head = Head::check(data, end, PUT_RESULT, 2, false, false)?;
    let count = u16_at(data, head.counts_at) as usize;
    let entries_at = head.counts_at + 2;
    head.expect_length(entries_at, count * RESULT_ENTRY)?;
    for i in 0..count {
        let status = data[entries_at + i * RESULT_ENTRY + DIGEST_SIZE];
        if !(1..=MAX_PUT_STATUS).contains(&status) {
            return Err(head.error(format!("unknown put status {status}")));
        }
    }
    Ok(PutResults { request_id: head.request_id, part: head.part, parts: head.parts, entries_at, count })
}

/// Bytes of a PUT_PAGES datagram of `count` pages.
pub fn put_pages_size(count: usize) -> usize {
    OVERHEAD + 2 + count * (DIGEST_SIZE + PAGE_SIZE)
}

/// The head of one PUT_PAGES datagram: header, body (count, digests) and the sealed auth
/// block; its pages follow on the wire, outside the tag (`tmdht.wire.encode` of a PutPages).
pub fn put_pages_head(
    request_id: u64,
    digests: &[&[u8]],
    sealer: &Sealer<'_>,
    timestamp_ms: u64,
    nonce: u64,
) -> Vec<u8> {
    let body = 2 + digests.len() * DIGEST_SIZE;
    let mut out = header(PUT_PAGES, request_id, 0, 1, body);
    out.extend_from_slice(&(digests.len() as u16).to_be_bytes());
    for digest in digests {
        out.extend_from_slice(digest);
    }
    seal_into(&mut out, sealer, timestamp_ms, nonce);
    out
}

#[cfg(test)]
mod client_put_tests {
    use super::*;

    #[test]
    fn sealed_puts_decode_and_results_round_trip() {
        let key = [6u8; 32];
        let keys = Keys::Keyed(vec![(3, key)]);
        let page = vec![5u8; PAGE_SIZE];
        let digest = *blake3::hash(&page).as_bytes();
        let mut data = put_pages_head(8, &[&digest], &Sealer::Keyed(3, &key), 1, 2);
        data.extend_from_slice(&page);
        assert_eq!(data.len(), put_pages_size(1));
        let Decoded::Authentic(_, Ok(put)) = decode_put(&data, MAX_DATAGRAM, &keys) else {
            panic!("not decoded")
        };
        assert_eq!((put.request_id, put.count), (8, 1));
        let mut answer = put_result_datagram(8, 0, 1, &[&digest, &digest], &[1, 2], &Sealer::Keyed(3, &key), 1, 3);
        let Decoded::Authentic(_, Ok(results)) = decode_put_result(&answer, MAX_DATAGRAM, &keys) else {
            panic!("not decoded")
        };
        assert_eq!((results.request_id, results.count, results.entries_at), (8, 2, HEADER_SIZE + 2));
        for cut in 0..answer.len() {
            let _ = decode_put_result(&answer[..cut], MAX_DATAGRAM, &keys);
        }
        answer.push(0);
        assert!(matches!(decode_put_result(&answer, MAX_DATAGRAM, &keys), Decoded::Authentic(_, Err(_))));
        let bad = put_result_datagram(8, 0, 1, &[&digest], &[9], &Sealer::Open, 1, 3);
        let Decoded::Authentic(_, Err(error)) = decode_put_result(&bad, MAX_DATAGRAM, &Keys::Open) else {
            panic!("status not checked")
        };
        assert_eq!(error.reason, "unknown put status 9");
    }
}
