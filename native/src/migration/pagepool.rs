//! Page buffers: a free list of boxed pages (reused, so their memory stays mapped and hot), and
//! the receiver's back-reference ring in one huge-page-backed anonymous mapping (a 128 MiB
//! window would otherwise cost one page fault per 4 KiB on first touch).

use crate::qemu_stream::PAGE_SIZE;

pub type PageBox = Box<[u8; PAGE_SIZE]>;

#[derive(Default)]
pub struct PagePool {
    free: Vec<PageBox>,
}

impl PagePool {
    pub fn take(&mut self) -> PageBox {
        self.free.pop().unwrap_or_else(|| Box::new([0u8; PAGE_SIZE]))
    }

    pub fn give(&mut self, page: PageBox) {
        if self.free.len() < 1 << 16 {
            self.free.push(page);
        }
    }
}

/// `slots` pages of anonymous memory (zero-filled on first touch, 2 MiB at a time where the
/// kernel does transparent huge pages on request).
pub struct Ring {
    base: *mut u8,
    mapped: usize,
    start: *mut u8,
    slots: usize,
}

// SAFETY: the mapping is owned by the Ring and only reached through &mut self.
unsafe impl Send for Ring {}
// SAFETY: shared references only read; writes need &mut self.
unsafe impl Sync for Ring {}

const HUGE: usize = 2 << 20;

impl Ring {
    pub fn new(slots: usize) -> Ring {
        let size = slots * PAGE_SIZE;
        let mapped = size + HUGE;
        // SAFETY: a fresh private anonymous mapping; checked for failure.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            panic!("cannot map {} bytes for the back-reference ring", mapped);
        }
        let base = base as *mut u8;
        let aligned = (base as usize).next_multiple_of(HUGE) as *mut u8;
        // SAFETY: advice on our own mapping; failure (no THP) is harmless.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        Ring { base, mapped, start: aligned, slots }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    #[inline]
    pub fn page(&self, slot: usize) -> &[u8] {
        assert!(slot < self.slots);
        // SAFETY: in bounds of the mapping.
        unsafe { std::slice::from_raw_parts(self.start.add(slot * PAGE_SIZE), PAGE_SIZE) }
    }

    #[inline]
    pub fn put(&mut self, slot: usize, page: &[u8]) {
        assert!(slot < self.slots && page.len() == PAGE_SIZE);
        // SAFETY: in bounds; `page` may be this very slot (a back-reference to the body one
        // window back), hence copy (memmove) rather than copy_nonoverlapping.
        unsafe { std::ptr::copy(page.as_ptr(), self.start.add(slot * PAGE_SIZE), PAGE_SIZE) }
    }

    /// Copy slot `from` to slot `to` (possibly the same).
    #[inline]
    pub fn copy_within(&mut self, from: usize, to: usize) {
        assert!(from < self.slots && to < self.slots);
        if from != to {
            // SAFETY: both in bounds and distinct slots do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.start.add(from * PAGE_SIZE),
                    self.start.add(to * PAGE_SIZE),
                    PAGE_SIZE,
                )
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.mapped);
        }
    }
}
