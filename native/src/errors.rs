//! Errors of the native cores, as kinds that map one-to-one onto `tmdht.errors` classes.
//!
//! The pure-Rust cores never touch Python: they return [`Error`], and the bindings turn it into
//! the very exception class the pure-Python reference raises (same class, same message), so a
//! caller cannot tell which implementation ran.

use std::fmt;

/// Which `tmdht.errors` class an error becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `tmdht.errors.DecodeError`: bytes from outside break their format.
    Decode,
    /// `tmdht.errors.LimitExceededError`: a length or count above the format's limits.
    LimitExceeded,
    /// `tmdht.errors.UnsupportedStreamError`: a QEMU stream feature tmdht does not handle.
    UnsupportedStream,
    /// `tmdht.errors.DigestMismatchError`: content does not match the digest sent with it.
    DigestMismatch,
    /// `ValueError`: the caller asked to encode something outside the format.
    Value,
    /// `tmdht.errors.UnsupportedStreamError` whose message embeds `repr(RamFlag(flags))`,
    /// which only Python can spell; the message holds the decimal flags.
    RamFlags,
}

/// An error of a native core: its kind and the reference implementation's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

impl Error {
    pub fn decode(message: impl Into<String>) -> Self {
        Error { kind: Kind::Decode, message: message.into() }
    }
    pub fn limit(message: impl Into<String>) -> Self {
        Error { kind: Kind::LimitExceeded, message: message.into() }
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error { kind: Kind::UnsupportedStream, message: message.into() }
    }
    pub fn mismatch(message: impl Into<String>) -> Self {
        Error { kind: Kind::DigestMismatch, message: message.into() }
    }
    pub fn value(message: impl Into<String>) -> Self {
        Error { kind: Kind::Value, message: message.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Python's `repr()` of an ASCII `str` (the QEMU parser decodes idstrs as ASCII first).
pub fn py_repr(text: &[u8]) -> String {
    let has_single = text.contains(&b'\'');
    let has_double = text.contains(&b'"');
    let quote = if has_single && !has_double { b'"' } else { b'\'' };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote as char);
    for &c in text {
        match c {
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c as char);
            }
            c if c < 0x20 || c == 0x7f => out.push_str(&format!("\\x{c:02x}")),
            c => out.push(c as char),
        }
    }
    out.push(quote as char);
    out
}

/// Python's `f"{n:#04x}"`.
pub fn hex04(n: u64) -> String {
    format!("{n:#04x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repr_matches_python() {
        assert_eq!(py_repr(b"pc.ram"), "'pc.ram'");
        assert_eq!(py_repr(b"a'b"), "\"a'b\"");
        assert_eq!(py_repr(b"a'b\""), "'a\\'b\"'");
        assert_eq!(py_repr(b"\x00\n\\"), "'\\x00\\n\\\\'");
        assert_eq!(hex04(7), "0x07");
        assert_eq!(hex04(0x1ff), "0x1ff");
    }
}
