//! The receiver's page store: one anonymous mapping of page slots, faulted in 2 MiB at a time
//! where the kernel has transparent huge pages (a 128 MiB back-reference window would otherwise
//! cost one page fault per 4 KiB on first touch, ~10% of a receiver's CPU).

use crate::qemu_stream::PAGE_SIZE;

/// `slots` pages of anonymous memory (zero-filled on first touch, 2 MiB at a time where the
/// kernel does transparent huge pages on request).
pub struct Slab {
    base: *mut u8,
    mapped: usize,
    start: *mut u8,
    slots: usize,
}

// SAFETY: the mapping is owned by the Ring and only reached through &mut self.
unsafe impl Send for Slab {}
// SAFETY: shared references only read; writes need &mut self.
unsafe impl Sync for Slab {}

const HUGE: usize = 2 << 20;
/// Small slabs (tests, fuzzing, tiny windows) keep 4 KiB pages: zeroing a whole 2 MiB page for
/// a few bodies would cost more than the faults it saves.
const HUGE_FROM: usize = 32 << 20;

impl Slab {
    pub fn new(slots: usize) -> Slab {
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
            panic!("cannot map {} bytes for received pages", mapped);
        }
        let base = base as *mut u8;
        let aligned = (base as usize).next_multiple_of(HUGE) as *mut u8;
        if size >= HUGE_FROM {
            // SAFETY: advice on our own mapping; failure (no THP) is harmless.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
            }
        }
        Slab { base, mapped, start: aligned, slots }
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
    pub fn page_mut(&mut self, slot: usize) -> &mut [u8] {
        assert!(slot < self.slots);
        // SAFETY: in bounds of the mapping, and &mut self excludes other borrows.
        unsafe { std::slice::from_raw_parts_mut(self.start.add(slot * PAGE_SIZE), PAGE_SIZE) }
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

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.mapped);
        }
    }
}
