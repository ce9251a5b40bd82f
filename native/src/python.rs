//! The PyO3 bindings: buffers in, bytes out, errors as `tmdht.errors` classes.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::errors::{Error, Kind};
use crate::migration::receiver::Receiver as ReceiverCore;
use crate::migration::records::{Counts, Hello};
use crate::migration::sender::{Sender as SenderCore, TemplateSet};
use crate::qemu_stream::PAGE_SIZE;

/// Inputs at least this large are processed with the GIL released.
const DETACH_AT: usize = 64 << 10;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Sender>()?;
    m.add_class::<Receiver>()?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_function(wrap_pyfunction!(tune_allocator, m)?)?;
    m.add("PAGE_SIZE", PAGE_SIZE)?;
    Ok(())
}

/// What this build is: versions of the crate and of the libraries inside it.
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let info = PyDict::new(py);
    info.set_item("crate", env!("CARGO_PKG_VERSION"))?;
    info.set_item("zstd", zstd_safe::version_string())?;
    info.set_item("profile", if cfg!(debug_assertions) { "debug" } else { "release" })?;
    Ok(info)
}

/// Keep freed heap memory for reuse (glibc): a proxy allocates and frees buffers of a chunk's
/// size (256 KiB and up) all the time, and by default each comes from a fresh mmap or a heap
/// that was just trimmed, so every 4 KiB of it page-faults again. Process-wide; returns whether
/// the allocator took the settings.
#[pyfunction]
fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator thresholds.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

// -- errors ------------------------------------------------------------------------------------

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn to_py(py: Python<'_>, error: Error) -> PyErr {
    let module = match ERRORS.get_or_try_init(py, || py.import("tmdht.errors").map(Bound::unbind)) {
        Ok(module) => module.bind(py),
        Err(e) => return e,
    };
    let name = match error.kind {
        Kind::Decode => "DecodeError",
        Kind::LimitExceeded => "LimitExceededError",
        Kind::UnsupportedStream | Kind::RamFlags => "UnsupportedStreamError",
        Kind::DigestMismatch => "DigestMismatchError",
        Kind::Value => return PyValueError::new_err(error.message),
    };
    let message = if error.kind == Kind::RamFlags {
        match ram_flags_message(py, &error.message) {
            Ok(text) => text,
            Err(e) => return e,
        }
    } else {
        error.message
    };
    match module.getattr(name) {
        Ok(class) => match class.call1((message,)) {
            Ok(instance) => PyErr::from_value(instance),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

/// The reference's `f"RAM record flags {RamFlag(flags)!r} (disable them)"`.
fn ram_flags_message(py: Python<'_>, flags: &str) -> PyResult<String> {
    let flags: u64 = flags.parse().map_err(|_| PyValueError::new_err("bad flags"))?;
    let class = py.import("tmdht.qemu_stream")?.getattr("RamFlag")?;
    let repr = class.call1((flags,))?.repr()?.to_string();
    Ok(format!("RAM record flags {repr} (disable them)"))
}

trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for crate::errors::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

// -- buffers -----------------------------------------------------------------------------------

/// A read-only view of a C-contiguous byte buffer (bytes, bytearray, memoryview, mmap).
struct Bytes {
    buffer: PyBuffer<u8>,
}

impl Bytes {
    fn new(buffer: PyBuffer<u8>) -> PyResult<Bytes> {
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err("a contiguous buffer is needed"));
        }
        Ok(Bytes { buffer })
    }

    fn slice(&self) -> &[u8] {
        // SAFETY: the buffer is C-contiguous, of u8, and held (exported) for the view's life;
        // callers must not resize it meanwhile (as with every buffer-protocol consumer).
        unsafe {
            std::slice::from_raw_parts(self.buffer.buf_ptr() as *const u8, self.buffer.len_bytes())
        }
    }
}

/// A new `bytes` of `len` bytes filled by `fill` (no zero-fill first: `fill` writes them all).
fn bytes_filled<'py, E>(
    py: Python<'py>,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> PyResult<Result<Bound<'py, PyBytes>, E>> {
    // SAFETY: PyBytes_FromStringAndSize(NULL, n) returns a new, unshared bytes object whose n
    // bytes may be written until it is handed out; fill writes every byte (or we drop it).
    unsafe {
        let raw = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as pyo3::ffi::Py_ssize_t);
        let object = Bound::from_owned_ptr_or_err(py, raw)?.cast_into_unchecked::<PyBytes>();
        let buffer = pyo3::ffi::PyBytes_AsString(raw) as *mut u8;
        let slice = std::slice::from_raw_parts_mut(buffer, len);
        Ok(fill(slice).map(|()| object))
    }
}

fn counts_tuple<'py>(py: Python<'py>, counts: &Counts) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(py, counts.as_array())
}

fn digest32(raw: &[u8], what: &str) -> PyResult<[u8; 32]> {
    raw.try_into().map_err(|_| PyValueError::new_err(format!("{what} is 32 bytes")))
}

// -- the sender --------------------------------------------------------------------------------

/// The sender's core: `feed(qemu_bytes) -> wire bytes` (see tmdht.native.NativeSender).
#[pyclass(module = "tmdht._native")]
struct Sender {
    core: SenderCore,
}

#[pymethods]
impl Sender {
    #[new]
    #[pyo3(signature = (catalog_id, templates, *, compress, backref_window, flow_window, flags))]
    fn new(
        py: Python<'_>,
        catalog_id: &[u8],
        templates: PyBuffer<u8>,
        compress: bool,
        backref_window: u32,
        flow_window: u64,
        flags: u8,
    ) -> PyResult<Sender> {
        let catalog_id = digest32(catalog_id, "a catalog id")?;
        let templates = Bytes::new(templates)?;
        let raw = templates.slice();
        let set = py.detach(|| TemplateSet::from_concatenated(raw)).py_err(py)?;
        let hello = Hello { flags, catalog_id, backref_window, flow_window };
        Ok(Sender { core: SenderCore::new(hello, set, compress) })
    }

    fn start<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.core.hello.encode())
    }

    fn feed<'py>(&mut self, py: Python<'py>, data: PyBuffer<u8>) -> PyResult<Bound<'py, PyBytes>> {
        let data = Bytes::new(data)?;
        let raw = data.slice();
        let core = &mut self.core;
        let out = if raw.len() >= DETACH_AT { py.detach(|| core.feed(raw)) } else { core.feed(raw) };
        Ok(PyBytes::new(py, &out.py_err(py)?))
    }

    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.core.finish().py_err(py)?;
        Ok(PyBytes::new(py, &out))
    }

    fn acknowledge(&mut self, py: Python<'_>, index: u64, qemu_bytes: u64) -> PyResult<()> {
        self.core.acknowledge(index, qemu_bytes).py_err(py)
    }

    fn fallback<'py>(&mut self, py: Python<'py>, indices: Vec<u64>) -> PyResult<Bound<'py, PyBytes>> {
        let out = self.core.fallback(&indices).py_err(py)?;
        Ok(PyBytes::new(py, &out))
    }

    /// (qemu_bytes, pages, zero, template, backref, full, compressed).
    #[getter]
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        counts_tuple(py, &self.core.tally)
    }

    #[getter]
    fn unacknowledged(&self) -> u64 {
        self.core.unacknowledged()
    }

    #[getter]
    fn window_open(&self) -> bool {
        self.core.window_open()
    }

    #[getter]
    fn retained(&self) -> usize {
        self.core.retained()
    }

    #[getter]
    fn ram_bytes(&self) -> u64 {
        self.core.ram_bytes
    }
}

// -- the receiver ------------------------------------------------------------------------------

/// The receiver's core (see tmdht.native.NativeReceiver).
#[pyclass(module = "tmdht._native")]
struct Receiver {
    core: ReceiverCore,
}

#[pymethods]
impl Receiver {
    #[new]
    #[pyo3(signature = (expected_catalog_id=None))]
    fn new(expected_catalog_id: Option<&[u8]>) -> PyResult<Receiver> {
        let expected = expected_catalog_id.map(|raw| digest32(raw, "a catalog id")).transpose()?;
        Ok(Receiver { core: ReceiverCore::new(expected) })
    }

    fn feed(&mut self, py: Python<'_>, data: PyBuffer<u8>) -> PyResult<()> {
        let data = Bytes::new(data)?;
        let raw = data.slice();
        let core = &mut self.core;
        let result = if raw.len() >= DETACH_AT { py.detach(|| core.feed(raw)) } else { core.feed(raw) };
        result.py_err(py)
    }

    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        self.core.close().py_err(py)
    }

    /// (catalog_id, backref_window, flow_window, flags) once the hello arrived.
    #[getter]
    fn hello<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        self.core
            .hello()
            .map(|h| {
                let id = PyBytes::new(py, &h.catalog_id);
                PyTuple::new(
                    py,
                    [id.into_any(), h.backref_window.into_pyobject(py)?.into_any(),
                     h.flow_window.into_pyobject(py)?.into_any(),
                     h.flags.into_pyobject(py)?.into_any()],
                )
            })
            .transpose()
    }

    #[getter]
    fn queued_bytes(&self) -> u64 {
        self.core.queued_bytes()
    }

    #[getter]
    fn end_seen(&self) -> bool {
        self.core.end_seen()
    }

    #[getter]
    fn waiting(&self) -> usize {
        self.core.waiting()
    }

    #[getter]
    fn to_resolve(&self) -> usize {
        self.core.to_resolve()
    }

    #[getter]
    fn verified(&self) -> bool {
        self.core.verified
    }

    /// (pages, template, backref, full, compressed, cluster, fallback, qemu_bytes, end counts).
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let s = &self.core.stats;
        let end = counts_tuple(py, &s.end)?;
        let mut items: Vec<Bound<'py, PyAny>> = Vec::with_capacity(9);
        for v in [s.pages, s.template_pages, s.backref_pages, s.full_pages, s.compressed_pages,
                  s.cluster_pages, s.fallback_pages, s.qemu_bytes] {
            items.push(v.into_pyobject(py)?.into_any());
        }
        items.push(end.into_any());
        PyTuple::new(py, items)
    }

    /// Up to `limit` template slots not yet asked for: (body indices, their digests as one
    /// buffer of 32 bytes each).
    fn wanted<'py>(&mut self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyTuple>> {
        let batch = self.core.wanted(limit);
        let indices = PyList::new(py, batch.iter().map(|(i, _)| *i))?;
        let digests = PyBytes::new_with(py, batch.len() * 32, |buf| {
            for (chunk, (_, digest)) in buf.chunks_exact_mut(32).zip(&batch) {
                chunk.copy_from_slice(digest);
            }
            Ok(())
        })?;
        PyTuple::new(py, [indices.into_any(), digests.into_any()])
    }

    /// Pages of template slots, checked by the caller: `pages` holds one 4096-byte page per
    /// index, in order (one buffer, or a sequence of page buffers).
    fn supply(&mut self, py: Python<'_>, indices: Vec<u64>, pages: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Ok(buffer) = pages.extract::<PyBuffer<u8>>() {
            let pages = Bytes::new(buffer)?;
            let raw = pages.slice();
            if raw.len() != indices.len() * PAGE_SIZE {
                return Err(PyValueError::new_err(format!(
                    "{} bytes of pages for {} indices", raw.len(), indices.len())));
            }
            for (index, page) in indices.iter().zip(raw.chunks_exact(PAGE_SIZE)) {
                self.core.supply(*index, page).py_err(py)?;
            }
            return Ok(());
        }
        let list: Vec<PyBuffer<u8>> = pages.extract()?;
        if list.len() != indices.len() {
            return Err(PyValueError::new_err("one page per index"));
        }
        for (index, page) in indices.iter().zip(list) {
            let page = Bytes::new(page)?;
            self.core.supply(*index, page.slice()).py_err(py)?;
        }
        Ok(())
    }

    fn unavailable(&mut self, indices: Vec<u64>) {
        self.core.unavailable(&indices);
    }

    fn requests<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.core.requests())
    }

    #[pyo3(signature = (every=1 << 20))]
    fn ack<'py>(&mut self, py: Python<'py>, every: u64) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.core.ack(every))
    }

    /// QEMU bytes ready to write, in order: a list of at most two buffers (the device state
    /// after a verified END comes as its own buffer).
    fn output<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let plan = self.core.plan().py_err(py)?;
        if plan.items > 0 {
            let core = &mut self.core;
            let chunk = bytes_filled(py, plan.bytes, |buf| {
                if plan.bytes >= DETACH_AT {
                    let address = buf.as_mut_ptr() as usize;
                    let len = buf.len();
                    py.detach(|| {
                        // SAFETY: the bytes object is ours alone until output() returns it.
                        let buf = unsafe { std::slice::from_raw_parts_mut(address as *mut u8, len) };
                        core.emit(plan.items, buf)
                    })
                } else {
                    core.emit(plan.items, buf)
                }
            })?
            .map_err(|e| to_py(py, e))?;
            if plan.bytes > 0 {
                out.append(chunk)?;
            }
        }
        if plan.end_next {
            let held = self.core.end_reached().py_err(py)?;
            if !held.is_empty() {
                out.append(PyBytes::new(py, &held))?;
            }
        }
        Ok(out)
    }
}
