//! `tmdht._native`: tmdht's per-page loops in Rust, called once per chunk or burst.
//!
//! Layout: pure-Rust cores that never touch Python (`qemu_stream`, `migration::*`), and the
//! PyO3 bindings (`python`) that hand buffers in and out and turn core errors into the exact
//! `tmdht.errors` classes the pure-Python reference raises. Later native paths (cluster
//! datagrams, bulk hashing) go beside `migration` as their own modules with their own bindings.

pub mod dataplane;
pub mod errors;
pub mod migration;
pub mod python;
pub mod python_dataplane;
pub mod qemu_stream;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    python::register(m)?;
    python_dataplane::register(m)
}
