//! Simulated guest memory: a memfd of 4 KiB pages, mapped shared, so another process given
//! the descriptor sees the same bytes (as a backend sees granted pages under Xen).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Bytes per page.
pub const PAGE: usize = 4096;

/// A shared-memory region, mapped in this process.
pub struct SharedPages {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; access goes through raw pointers with bounds
// checks, and the other side of the sharing is another party by design.
unsafe impl Send for SharedPages {}
// SAFETY: as above.
unsafe impl Sync for SharedPages {}

impl SharedPages {
    /// A fresh zeroed region of `pages` pages.
    pub fn new(name: &str, pages: usize) -> io::Result<SharedPages> {
        let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // SAFETY: a valid C string; the result is checked.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = pages
            .checked_mul(PAGE)
            .ok_or_else(|| io::Error::other("too many pages"))?;
        // SAFETY: resizing our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, len)
    }

    /// Maps a region another process created (its whole size).
    pub fn from_fd(fd: OwnedFd) -> io::Result<SharedPages> {
        // SAFETY: fstat into a zeroed stat buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above, on a descriptor we own.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = st.st_size as usize;
        if len == 0 || !len.is_multiple_of(PAGE) {
            return Err(io::Error::other(format!("shared region of {len} bytes")));
        }
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<SharedPages> {
        // SAFETY: a shared mapping of our descriptor's whole length.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedPages {
            fd,
            base: base.cast(),
            len,
        })
    }

    /// The descriptor (to hand to another process).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        self.len / PAGE
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty region (never: regions have at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte of page `i` (`i < pages()`).
    pub fn page_ptr(&self, i: usize) -> Option<*mut u8> {
        // SAFETY: i < pages, so the offset is inside the mapping.
        (i < self.pages()).then(|| unsafe { self.base.add(i * PAGE) })
    }

    /// The base of the mapping.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Copies `data` in at `offset`; false if it does not fit.
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        match offset.checked_add(data.len()) {
            Some(end) if end <= self.len => {
                // SAFETY: inside the mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(offset), data.len())
                };
                true
            }
            _ => false,
        }
    }

    /// Copies out from `offset`; false if out of range.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        match offset.checked_add(out.len()) {
            Some(end) if end <= self.len => {
                // SAFETY: inside the mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.base.add(offset),
                        out.as_mut_ptr(),
                        out.len(),
                    )
                };
                true
            }
            _ => false,
        }
    }
}

impl Drop for SharedPages {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}
