//! Bindings of the data-plane burst decoder (see `dataplane` and `tmdht/net/burst.py`).

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::dataplane::{self, Decoded, Keys, Sealer, DIGEST_SIZE, PAGE_SIZE};
use crate::errors::Kind;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_pages_burst, m)?)?;
    m.add_function(wrap_pyfunction!(encode_pages_answer, m)?)?;
    m.add_function(wrap_pyfunction!(encode_put_results, m)?)?;
    m.add_function(wrap_pyfunction!(decode_put_pages, m)?)?;
    m.add_function(wrap_pyfunction!(encode_put_requests, m)?)?;
    m.add_function(wrap_pyfunction!(digest_pages, m)?)?;
    m.add_function(wrap_pyfunction!(pages_match, m)?)?;
    Ok(())
}

/// Result tags (tmdht/net/burst.py reads them).
const OK: u8 = 0;
const REFUSED: u8 = 1;
const BODY_ERROR: u8 = 3;
const PUT_RESULT_OK: u8 = 4;
/// Refusal classes.
const DECODE: u8 = 0;
const LIMIT: u8 = 1;
const AUTH: u8 = 2;

fn check_max_datagram(max_datagram: usize) -> PyResult<()> {
    if !(dataplane::MIN_DATAGRAM..=dataplane::MAX_DATAGRAM).contains(&max_datagram) {
        return Err(PyValueError::new_err(format!("max_datagram {max_datagram} is out of range")));
    }
    Ok(())
}

/// A sealer's tag key: `None` in open mode, else 32 bytes; `max_datagram` checked first.
fn parse_tag_key(max_datagram: usize, tag_key: Option<Vec<u8>>) -> PyResult<Option<[u8; 32]>> {
    check_max_datagram(max_datagram)?;
    tag_key
        .map(|k| k.try_into().map_err(|_| PyValueError::new_err("a tag key is 32 bytes")))
        .transpose()
}

/// `None` (open mode) or the (key id, tag key) pairs accepted now.
fn parse_keys(keys: Option<Vec<(u8, Vec<u8>)>>) -> PyResult<Keys> {
    Ok(match keys {
        None => Keys::Open,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (id, key) in list {
                let key: [u8; 32] =
                    key.try_into().map_err(|_| PyValueError::new_err("a tag key is 32 bytes"))?;
                out.push((id, key));
            }
            Keys::Keyed(out)
        }
    })
}

/// The refusal class of a `Refused` outcome.
fn refusal_class(error: &crate::errors::Error, auth: bool) -> u8 {
    if auth {
        AUTH
    } else if error.kind == Kind::LimitExceeded {
        LIMIT
    } else {
        DECODE
    }
}

/// A decoded body with its stamp, or what the caller returns instead: `None` (another type),
/// `(1, class, message)` (refused) or `(3, key_id, timestamp_ms, nonce, request_id,
/// message_type, code, reason)` (authentic, bad body).
#[allow(clippy::type_complexity)]
fn unless_decoded<'py, T>(
    py: Python<'py>,
    outcome: Decoded<T>,
) -> PyResult<Result<(dataplane::Stamp, T), Bound<'py, PyAny>>> {
    Ok(Err(match outcome {
        Decoded::Authentic(stamp, Ok(body)) => return Ok(Ok((stamp, body))),
        Decoded::Other => py.None().into_bound(py),
        Decoded::Refused(error, auth) => {
            (REFUSED, refusal_class(&error, auth), error.message).into_pyobject(py)?.into_any()
        }
        Decoded::Authentic(stamp, Err(body)) => (
            BODY_ERROR,
            stamp.key_id,
            stamp.timestamp_ms,
            stamp.nonce,
            body.request_id,
            body.message_type,
            body.code,
            body.reason,
        )
            .into_pyobject(py)?
            .into_any(),
    }))
}

/// Decode one datagram if it is a version-2 PUT_PAGES request (the node's side; the twin of
/// `tmdht.wire.decode` for that type): `None` (another type: decode it with the reference),
/// `(1, class, message)` (refused before any state, as in `decode_pages_burst`),
/// `(0, key_id, timestamp_ms, nonce, request_id, pages)` (authentic; `pages` the (digest,
/// page) pairs, pages not verified), or `(3, key_id, timestamp_ms, nonce, request_id,
/// message_type, code, reason)` (authentic, bad body). The caller checks the stamp.
#[pyfunction]
#[pyo3(signature = (data, max_datagram, keys))]
fn decode_put_pages<'py>(
    py: Python<'py>,
    data: PyBuffer<u8>,
    max_datagram: usize,
    keys: Option<Vec<(u8, Vec<u8>)>>,
) -> PyResult<Bound<'py, PyAny>> {
    check_max_datagram(max_datagram)?;
    let keys = parse_keys(keys)?;
    if !data.is_c_contiguous() {
        return Err(PyValueError::new_err("a contiguous buffer is needed"));
    }
    // SAFETY: C-contiguous u8, exported (held) by `data` until return.
    let bytes = unsafe { std::slice::from_raw_parts(data.buf_ptr() as *const u8, data.len_bytes()) };
    Ok(match unless_decoded(py, dataplane::decode_put(bytes, max_datagram, &keys))? {
        Err(item) => item,
        Ok((stamp, put)) => {
            let mut pages = Vec::with_capacity(put.count);
            for i in 0..put.count {
                let at = put.digests_at + i * DIGEST_SIZE;
                let digest = PyBytes::new(py, &bytes[at..at + DIGEST_SIZE]);
                let at = put.bulk_at + i * PAGE_SIZE;
                let page = PyBytes::new(py, &bytes[at..at + PAGE_SIZE]);
                pages.push(PyTuple::new(py, [digest, page])?);
            }
            (OK, stamp.key_id, stamp.timestamp_ms, stamp.nonce, put.request_id, PyTuple::new(py, pages)?)
                .into_pyobject(py)?
                .into_any()
        }
    })
}

/// Decode and verify a burst of datagrams (the bulky answers a client gets: PAGES to its GETs,
/// PUT_RESULT to its PUTs); one result per datagram, in order:
/// `None` (neither a PAGES nor a PUT_RESULT datagram: decode it with the reference),
/// `(1, class, message)` (refused before any state: class 0 DecodeError, 1 LimitExceededError,
/// 2 AuthenticationError),
/// `(0, key_id, timestamp_ms, nonce, request_id, part, parts, pages, corrupt, missing)`
/// (authentic; `pages` the (digest, page) pairs whose page matches its digest, `corrupt` the
/// digests whose page did not), or
/// `(3, key_id, timestamp_ms, nonce, request_id, message_type, code, reason)` (authentic, bad
/// body: MessageDecodeError), or for a PUT_RESULT
/// `(4, key_id, timestamp_ms, nonce, request_id, part, parts, digests, statuses)` (authentic;
/// `statuses` one byte per digest, each a valid `tmdht.wire.PutStatus`).
/// `keys`: None in open mode, else (key id, tag key) accepted now.
#[pyfunction]
#[pyo3(signature = (datagrams, max_datagram, keys))]
fn decode_pages_burst<'py>(
    py: Python<'py>,
    datagrams: Vec<PyBuffer<u8>>,
    max_datagram: usize,
    keys: Option<Vec<(u8, Vec<u8>)>>,
) -> PyResult<Bound<'py, PyList>> {
    check_max_datagram(max_datagram)?;
    let keys = parse_keys(keys)?;
    let mut views: Vec<(usize, usize)> = Vec::with_capacity(datagrams.len());
    for buffer in &datagrams {
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err("a contiguous buffer is needed"));
        }
        views.push((buffer.buf_ptr() as usize, buffer.len_bytes()));
    }
    let slice = |(ptr, len): (usize, usize)| -> &[u8] {
        // SAFETY: each buffer is C-contiguous u8, exported (held) by `datagrams` until return.
        unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }
    };
    let out = PyList::empty(py);
    // One pass, datagram by datagram: each is hashed and copied out while it is in cache (a
    // pass hashing the whole burst first, then one copying, ran 2-3x slower per page on bursts
    // of a few MiB).
    for &view in &views {
        let data = slice(view);
        if data.len() >= 2 && data[1] == dataplane::PUT_RESULT {
            out.append(put_result_item(py, data, max_datagram, &keys)?)?;
            continue;
        }
        let outcome = dataplane::decode_pages(data, max_datagram, &keys);
        let item: Bound<'py, PyAny> = match unless_decoded(py, outcome)? {
            Err(item) => item,
            Ok((stamp, part)) => {
                let digest = |i: usize| {
                    let at = part.digests_at + i * DIGEST_SIZE;
                    PyBytes::new(py, &data[at..at + DIGEST_SIZE])
                };
                let mut pages = Vec::with_capacity(part.pages);
                let mut corrupt = Vec::new();
                for (i, &good) in part.matches.iter().enumerate() {
                    if good {
                        let at = part.bulk_at + i * PAGE_SIZE;
                        let page = PyBytes::new(py, &data[at..at + PAGE_SIZE]);
                        pages.push(PyTuple::new(py, [digest(i), page])?);
                    } else {
                        corrupt.push(digest(i));
                    }
                }
                let missing: Vec<_> = (part.pages..part.pages + part.missing).map(digest).collect();
                let mut fields = stamped(py, OK, &stamp, part.request_id, part.part, part.parts)?;
                fields.push(PyTuple::new(py, pages)?.into_any());
                fields.push(PyTuple::new(py, corrupt)?.into_any());
                fields.push(PyTuple::new(py, missing)?.into_any());
                PyTuple::new(py, fields)?.into_any()
            }
        };
        out.append(item)?;
    }
    Ok(out)
}

/// The fields an authentic answer's item starts with: (tag, key id, timestamp ms, nonce,
/// request id, part, parts); the caller appends its body's.
fn stamped<'py>(
    py: Python<'py>,
    tag: u8,
    stamp: &dataplane::Stamp,
    request_id: u64,
    part: u16,
    parts: u16,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let mut fields = Vec::with_capacity(10);
    fields.push(tag.into_pyobject(py)?.into_any());
    fields.push(stamp.key_id.into_pyobject(py)?.into_any());
    fields.push(stamp.timestamp_ms.into_pyobject(py)?.into_any());
    fields.push(stamp.nonce.into_pyobject(py)?.into_any());
    fields.push(request_id.into_pyobject(py)?.into_any());
    fields.push(part.into_pyobject(py)?.into_any());
    fields.push(parts.into_pyobject(py)?.into_any());
    Ok(fields)
}

/// One PUT_RESULT datagram of a burst (see `decode_pages_burst`).
fn put_result_item<'py>(
    py: Python<'py>,
    data: &[u8],
    max_datagram: usize,
    keys: &Keys,
) -> PyResult<Bound<'py, PyAny>> {
    Ok(match unless_decoded(py, dataplane::decode_put_result(data, max_datagram, keys))? {
        Err(item) => item,
        Ok((stamp, results)) => {
            let mut digests = Vec::with_capacity(results.count);
            let mut statuses = Vec::with_capacity(results.count);
            for i in 0..results.count {
                let at = results.entries_at + i * dataplane::RESULT_ENTRY;
                digests.push(PyBytes::new(py, &data[at..at + DIGEST_SIZE]));
                statuses.push(data[at + DIGEST_SIZE]);
            }
            let (request_id, part, parts) = (results.request_id, results.part, results.parts);
            let mut fields = stamped(py, PUT_RESULT_OK, &stamp, request_id, part, parts)?;
            fields.push(PyTuple::new(py, digests)?.into_any());
            fields.push(PyBytes::new(py, &statuses).into_any());
            PyTuple::new(py, fields)?.into_any()
        }
    })
}

/// The bytes of a digest or page: a `bytes` object as is, any other buffer copied.
fn item_bytes<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<std::borrow::Cow<'a, [u8]>> {
    if let Ok(bytes) = obj.cast::<PyBytes>() {
        return Ok(std::borrow::Cow::Borrowed(bytes.as_bytes()));
    }
    let buffer = PyBuffer::<u8>::get(obj)?;
    Ok(std::borrow::Cow::Owned(buffer.to_vec(obj.py())?))
}

/// One PUT_PAGES request as Python passes it: (request id, digests, pages).
type PutRequestArg<'py> = (u64, Vec<Bound<'py, PyAny>>, Vec<Bound<'py, PyAny>>);

/// A window of PUT_PAGES requests sealed in one call (the client's side): `requests` holds per
/// request (request id, digests, pages), digests and pages any buffers (32 and 4096 bytes);
/// returns one datagram (bytes) per request, byte for byte `tmdht.wire.encode` of its PutPages,
/// sealed as in `encode_pages_answer` (`nonce()` once per datagram, in order). Every request is
/// checked before any nonce is drawn: ValueError for a field the format cannot carry (the
/// reference's InvalidMessageError text), OverflowError for a datagram above `max_datagram`
/// (MessageTooLargeError's).
#[pyfunction]
#[pyo3(signature = (requests, *, max_datagram, key_id, tag_key, timestamp_ms, nonce))]
fn encode_put_requests<'py>(
    py: Python<'py>,
    requests: Vec<PutRequestArg<'py>>,
    max_datagram: usize,
    key_id: u8,
    tag_key: Option<Vec<u8>>,
    timestamp_ms: u64,
    nonce: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    use pyo3::exceptions::PyOverflowError;
    let key = parse_tag_key(max_datagram, tag_key)?;
    let sealer = Sealer::of(key_id, key.as_ref());
    type Checked<'a> = (u64, Vec<std::borrow::Cow<'a, [u8]>>, Vec<std::borrow::Cow<'a, [u8]>>);
    let mut checked: Vec<Checked<'_>> = Vec::with_capacity(requests.len());
    for (request_id, digests, pages) in &requests {
        let count = digests.len();
        if pages.len() != count {
            return Err(PyValueError::new_err("one page per digest"));
        }
        if !(1..=u16::MAX as usize).contains(&count) {
            return Err(PyValueError::new_err(format!(
                "{count} pages: the format carries 1..{}", u16::MAX)));
        }
        let digests = digests.iter().map(item_bytes).collect::<PyResult<Vec<_>>>()?;
        if let Some(bad) = digests.iter().find(|d| d.len() != DIGEST_SIZE) {
            return Err(PyValueError::new_err(format!(
                "a digest is {DIGEST_SIZE} bytes, got one of {}", bad.len())));
        }
        let pages = pages.iter().map(item_bytes).collect::<PyResult<Vec<_>>>()?;
        if let Some(bad) = pages.iter().find(|p| p.len() != PAGE_SIZE) {
            return Err(PyValueError::new_err(format!(
                "a page is {PAGE_SIZE} bytes, got one of {}", bad.len())));
        }
        let size = dataplane::put_pages_size(count);
        if size > max_datagram {
            return Err(PyOverflowError::new_err(format!(
                "PUT_PAGES of {size} bytes exceeds max_datagram {max_datagram}")));
        }
        checked.push((*request_id, digests, pages));
    }
    let out = PyList::empty(py);
    for (request_id, digests, pages) in &checked {
        let nonce: u64 = nonce.call0()?.extract()?;
        let refs: Vec<&[u8]> = digests.iter().map(|d| d.as_ref()).collect();
        let head = dataplane::put_pages_head(*request_id, &refs, &sealer, timestamp_ms, nonce);
        let size = head.len() + pages.len() * PAGE_SIZE;
        let datagram = PyBytes::new_with(py, size, |buf| {
            buf[..head.len()].copy_from_slice(&head);
            for (i, page) in pages.iter().enumerate() {
                let at = head.len() + i * PAGE_SIZE;
                buf[at..at + PAGE_SIZE].copy_from_slice(page);
            }
            Ok(())
        })?;
        out.append(datagram)?;
    }
    Ok(out)
}

/// A GET's answer as PAGES datagrams, each a list of buffers `[head, page view, ...]` for
/// `socket.sendmsg`: `views[i]` is the page of `digests[i]` (any 4096-byte buffer, passed
/// through uncopied) or None (missing). The heads are sealed here: key id 0 and no tag key in
/// open mode; `nonce()` is called once per datagram, in order. Returns (datagrams, pages found).
/// The twin of the reference in tmdht/net/burst.py (tmdht.wire.encode_pages_buffers).
#[pyfunction]
#[pyo3(signature = (request_id, digests, views, *, max_datagram, key_id, tag_key, timestamp_ms, nonce))]
#[allow(clippy::too_many_arguments)]
fn encode_pages_answer<'py>(
    py: Python<'py>,
    request_id: u64,
    digests: Vec<Bound<'py, PyBytes>>,
    views: Vec<Bound<'py, PyAny>>,
    max_datagram: usize,
    key_id: u8,
    tag_key: Option<Vec<u8>>,
    timestamp_ms: u64,
    nonce: Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyList>, usize)> {
    check_max_datagram(max_datagram)?;
    if digests.len() != views.len() {
        return Err(PyValueError::new_err("one view (or None) per digest"));
    }
    let key = parse_tag_key(max_datagram, tag_key)?;
    let sealer = Sealer::of(key_id, key.as_ref());
    let mut found: Vec<&[u8]> = Vec::with_capacity(digests.len());
    let mut found_views: Vec<&Bound<'py, PyAny>> = Vec::with_capacity(digests.len());
    let mut missing: Vec<&[u8]> = Vec::new();
    for (digest, view) in digests.iter().zip(&views) {
        let raw = digest.as_bytes();
        if raw.len() != DIGEST_SIZE {
            return Err(PyValueError::new_err(format!(
                "a digest is {DIGEST_SIZE} bytes, got one of {}", raw.len())));
        }
        if view.is_none() {
            missing.push(raw);
        } else {
            let size = view.len()?;
            if size != PAGE_SIZE {
                return Err(PyValueError::new_err(format!(
                    "a page is {PAGE_SIZE} bytes, got one of {size}")));
            }
            found.push(raw);
            found_views.push(view);
        }
    }
    let plan = dataplane::plan_parts(found.len(), missing.len(), max_datagram);
    if plan.len() > u16::MAX as usize {
        return Err(PyValueError::new_err("the answer needs more than 65535 parts"));
    }
    let parts = plan.len() as u16;
    let out = PyList::empty(py);
    for (index, &(p0, p1, m0, m1)) in plan.iter().enumerate() {
        let nonce: u64 = nonce.call0()?.extract()?;
        let head = dataplane::pages_head(
            request_id, index as u16, parts, &found[p0..p1], &missing[m0..m1], &sealer,
            timestamp_ms, nonce,
        );
        let datagram = PyList::empty(py);
        datagram.append(PyBytes::new(py, &head))?;
        for view in &found_views[p0..p1] {
            datagram.append(*view)?;
        }
        out.append(datagram)?;
    }
    Ok((out, found.len()))
}

/// One PUT's answer, checked: request id, digests (32 bytes each), status bytes.
type CheckedAnswer<'a> = (u64, Vec<&'a [u8]>, &'a [u8]);

/// The answers of a committed group of PUTs, sealed in one call: `answers` holds per PUT
/// (request id, its digests, one status byte per digest); returns per PUT its PUT_RESULT
/// datagrams (one in practice), split as `tmdht.wire.encode_put_response` splits them. Sealed
/// as in `encode_pages_answer`: `nonce()` once per datagram, in order.
#[pyfunction]
#[pyo3(signature = (answers, *, max_datagram, key_id, tag_key, timestamp_ms, nonce))]
fn encode_put_results<'py>(
    py: Python<'py>,
    answers: Vec<(u64, Vec<Bound<'py, PyBytes>>, Bound<'py, PyBytes>)>,
    max_datagram: usize,
    key_id: u8,
    tag_key: Option<Vec<u8>>,
    timestamp_ms: u64,
    nonce: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let key = parse_tag_key(max_datagram, tag_key)?;
    let sealer = Sealer::of(key_id, key.as_ref());
    let per_part = dataplane::results_per_part(max_datagram);
    // Every answer is checked before any nonce is drawn: a bad one draws none.
    let mut checked: Vec<CheckedAnswer<'_>> = Vec::with_capacity(answers.len());
    for (request_id, digests, statuses) in &answers {
        let statuses = statuses.as_bytes();
        if statuses.len() != digests.len() {
            return Err(PyValueError::new_err("one status per digest"));
        }
        let mut raw = Vec::with_capacity(digests.len());
        for digest in digests {
            let bytes = digest.as_bytes();
            if bytes.len() != DIGEST_SIZE {
                return Err(PyValueError::new_err(format!(
                    "a digest is {DIGEST_SIZE} bytes, got one of {}", bytes.len())));
            }
            raw.push(bytes);
        }
        if raw.len().div_ceil(per_part) > u16::MAX as usize {
            return Err(PyValueError::new_err("the answer needs more than 65535 parts"));
        }
        checked.push((*request_id, raw, statuses));
    }
    let out = PyList::empty(py);
    for (request_id, digests, statuses) in &checked {
        let parts = digests.len().div_ceil(per_part).max(1);
        let datagrams = PyList::empty(py);
        for index in 0..parts {
            let start = index * per_part;
            let end = digests.len().min(start + per_part);
            let nonce: u64 = nonce.call0()?.extract()?;
            let data = dataplane::put_result_datagram(
                *request_id, index as u16, parts as u16, &digests[start..end],
                &statuses[start..end], &sealer, timestamp_ms, nonce,
            );
            datagrams.append(PyBytes::new(py, &data))?;
        }
        out.append(datagrams)?;
    }
    Ok(out)
}

// -- bulk hashing ------------------------------------------------------------------------------

/// Pages at least this many are hashed across cores (rayon); fewer on the calling thread.
const PARALLEL_AT: usize = 64;

fn page_slices(pages: &[PyBuffer<u8>]) -> PyResult<Vec<(usize, usize)>> {
    pages
        .iter()
        .map(|b| {
            if !b.is_c_contiguous() {
                return Err(PyValueError::new_err("a contiguous buffer is needed"));
            }
            Ok((b.buf_ptr() as usize, b.len_bytes()))
        })
        .collect()
}

fn hash_all(py: Python<'_>, slices: &[(usize, usize)], threads: bool) -> Vec<[u8; 32]> {
    use rayon::prelude::*;
    let one = |&(ptr, len): &(usize, usize)| {
        // SAFETY: each buffer is C-contiguous and exported (held) by the caller's PyBuffer
        // until this function returns; nothing writes it meanwhile (buffer-protocol contract).
        let data = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        *blake3::hash(data).as_bytes()
    };
    py.detach(|| {
        if threads && slices.len() >= PARALLEL_AT {
            slices.par_iter().map(one).collect()
        } else {
            slices.iter().map(one).collect()
        }
    })
}

/// BLAKE3 digests of `pages` (any buffers), in order, with the GIL released; across cores
/// (rayon's pool) when `threads` and there are enough of them.
#[pyfunction]
#[pyo3(signature = (pages, *, threads=true))]
fn digest_pages<'py>(
    py: Python<'py>,
    pages: Vec<PyBuffer<u8>>,
    threads: bool,
) -> PyResult<Bound<'py, PyList>> {
    let slices = page_slices(&pages)?;
    let digests = hash_all(py, &slices, threads);
    PyList::new(py, digests.iter().map(|d| PyBytes::new(py, d)))
}

/// For each (digest, page) pair: the page's BLAKE3 digest is `digest` (GIL released).
#[pyfunction]
#[pyo3(signature = (digests, pages, *, threads=true))]
fn pages_match(
    py: Python<'_>,
    digests: Vec<Vec<u8>>,
    pages: Vec<PyBuffer<u8>>,
    threads: bool,
) -> PyResult<Vec<bool>> {
    if digests.len() != pages.len() {
        return Err(PyValueError::new_err("one page per digest"));
    }
    let slices = page_slices(&pages)?;
    let actual = hash_all(py, &slices, threads);
    Ok(digests.iter().zip(&actual).map(|(d, a)| d.as_slice() == a.as_slice()).collect())
}
