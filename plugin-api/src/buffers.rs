//! Scatter-gather buffers: the guest's memory as the plugin sees it.
//!
//! A request's data lives in the guest pages the host mapped (one buffer per ring segment,
//! 512 bytes to 4 KiB each). The host hands the plugin a list of them, never a copy: a read
//! fills them, a write reads from them. [`RawBuf`] has the layout of C's `struct iovec`, so a
//! plugin can pass [`ReadBufs::as_io_slices_mut`] / [`WriteBufs::as_io_slices`] straight to
//! `preadv`/`pwritev`.

use std::io::{IoSlice, IoSliceMut};
use std::marker::PhantomData;

/// One buffer: a base pointer and a length; the same layout as `struct iovec`.
#[repr(C)]
#[derive(Debug, Clone, Copy, abi_stable::StableAbi)]
pub struct RawBuf {
    /// First byte.
    pub base: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

impl RawBuf {
    /// Describes a mutable slice (its lifetime is the caller's to keep).
    pub fn from_mut(slice: &mut [u8]) -> Self {
        RawBuf {
            base: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }

    /// Describes a shared slice; only for buffers a plugin will read (writes).
    pub fn from_ref(slice: &[u8]) -> Self {
        RawBuf {
            base: slice.as_ptr() as *mut u8,
            len: slice.len(),
        }
    }
}

/// The buffers of a read: the plugin fills all of them, in order, with the bytes that start
/// at the request's offset. Their total is [`ReadBufs::len`].
pub struct ReadBufs<'a> {
    bufs: &'a [RawBuf],
    _borrow: PhantomData<&'a mut [u8]>,
}

/// The buffers of a write: the bytes to store, in order, starting at the request's offset.
pub struct WriteBufs<'a> {
    bufs: &'a [RawBuf],
    _borrow: PhantomData<&'a [u8]>,
}

fn total(bufs: &[RawBuf]) -> usize {
    bufs.iter().map(|b| b.len).sum()
}

impl<'a> ReadBufs<'a> {
    /// Wraps raw buffers.
    ///
    /// # Safety
    /// Each buffer must be valid for writes of `len` bytes for `'a` and must not overlap
    /// another buffer of the list or be accessed by the caller while the `ReadBufs` lives.
    pub unsafe fn from_raw(bufs: &'a [RawBuf]) -> Self {
        ReadBufs {
            bufs,
            _borrow: PhantomData,
        }
    }

    /// The raw list (to hand on to another disk, e.g. in a filter plugin).
    pub fn raw(&self) -> &[RawBuf] {
        self.bufs
    }

    /// Total bytes to read.
    pub fn len(&self) -> usize {
        total(self.bufs)
    }

    /// True when there is nothing to read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of buffers.
    pub fn count(&self) -> usize {
        self.bufs.len()
    }

    /// Buffer `i` as a mutable slice.
    pub fn get_mut(&mut self, i: usize) -> &mut [u8] {
        let b = self.bufs[i];
        // SAFETY: from_raw's contract: valid for writes of len bytes, not aliased, for 'a;
        // the &mut self borrow keeps this the only live slice of it.
        unsafe { std::slice::from_raw_parts_mut(b.base, b.len) }
    }

    /// Calls `f` with each buffer and its byte offset from the start of the request.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(usize, &mut [u8])) {
        let mut at = 0;
        for i in 0..self.bufs.len() {
            let s = self.get_mut(i);
            let n = s.len();
            f(at, s);
            at += n;
        }
    }

    /// Fills the buffers from `src`, which must be exactly [`len`](Self::len) bytes.
    pub fn copy_from(&mut self, src: &[u8]) {
        assert_eq!(
            src.len(),
            self.len(),
            "ReadBufs::copy_from: length mismatch"
        );
        self.for_each_mut(|at, s| s.copy_from_slice(&src[at..at + s.len()]));
    }

    /// Fills every byte with `byte` (e.g. zeroes for a hole).
    pub fn fill(&mut self, byte: u8) {
        self.for_each_mut(|_, s| s.fill(byte));
    }

    /// Fills bytes `[from, from + len)` of the request (across buffer edges) with `byte`.
    pub fn fill_range(&mut self, from: usize, len: usize, byte: u8) {
        self.for_each_mut(|at, s| {
            let (lo, hi) = (from.max(at), (from + len).min(at + s.len()));
            if lo < hi {
                s[lo - at..hi - at].fill(byte);
            }
        });
    }

    /// Copies `src` into bytes `[from, from + src.len())` of the request, across buffer edges.
    pub fn copy_in_at(&mut self, from: usize, src: &[u8]) {
        self.for_each_mut(|at, s| {
            let (lo, hi) = (from.max(at), (from + src.len()).min(at + s.len()));
            if lo < hi {
                s[lo - at..hi - at].copy_from_slice(&src[lo - from..hi - from]);
            }
        });
    }

    /// The buffers as `IoSliceMut`s, ready for `preadv` (which fills the buffers; the list
    /// itself is shared and must not be changed, e.g. with `IoSliceMut::advance_slices` — copy
    /// it first to handle a short read).
    pub fn as_io_slices_mut(&mut self) -> &[IoSliceMut<'_>] {
        // SAFETY: RawBuf is repr(C) {pointer, usize}, the layout of struct iovec, and std
        // guarantees IoSliceMut is ABI-compatible with iovec on Unix. The list is only read;
        // the buffers it names are valid for writes and unaliased (from_raw's contract) for
        // the &mut self borrow.
        unsafe {
            std::slice::from_raw_parts(self.bufs.as_ptr() as *const IoSliceMut<'_>, self.bufs.len())
        }
    }
}

impl<'a> WriteBufs<'a> {
    /// Wraps raw buffers.
    ///
    /// # Safety
    /// Each buffer must be valid for reads of `len` bytes for `'a`.
    pub unsafe fn from_raw(bufs: &'a [RawBuf]) -> Self {
        WriteBufs {
            bufs,
            _borrow: PhantomData,
        }
    }

    /// The raw list (to hand on to another disk, e.g. in a filter plugin).
    pub fn raw(&self) -> &[RawBuf] {
        self.bufs
    }

    /// Total bytes to write.
    pub fn len(&self) -> usize {
        total(self.bufs)
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of buffers.
    pub fn count(&self) -> usize {
        self.bufs.len()
    }

    /// Buffer `i` as a slice.
    pub fn get(&self, i: usize) -> &[u8] {
        let b = self.bufs[i];
        // SAFETY: from_raw's contract: valid for reads of len bytes for 'a.
        unsafe { std::slice::from_raw_parts(b.base, b.len) }
    }

    /// Iterates over the buffers with their byte offset from the start of the request.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[u8])> + '_ {
        let mut at = 0;
        (0..self.bufs.len()).map(move |i| {
            let s = self.get(i);
            let here = at;
            at += s.len();
            (here, s)
        })
    }

    /// Copies all bytes into `dst`, which must be exactly [`len`](Self::len) bytes.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len(), "WriteBufs::copy_to: length mismatch");
        for (at, s) in self.iter() {
            dst[at..at + s.len()].copy_from_slice(s);
        }
    }

    /// Copies bytes `[from, from + dst.len())` of the request into `dst`, across buffer edges.
    pub fn copy_out_at(&self, from: usize, dst: &mut [u8]) {
        for (at, s) in self.iter() {
            let (lo, hi) = (from.max(at), (from + dst.len()).min(at + s.len()));
            if lo < hi {
                dst[lo - from..hi - from].copy_from_slice(&s[lo - at..hi - at]);
            }
        }
    }

    /// True when every byte is zero (lets a plugin turn a zero write into a cheaper op).
    pub fn is_all_zero(&self) -> bool {
        self.iter().all(|(_, s)| s.iter().all(|&b| b == 0))
    }

    /// The buffers as `IoSlice`s, ready for `pwritev`.
    pub fn as_io_slices(&self) -> &[IoSlice<'_>] {
        // SAFETY: RawBuf has the iovec layout and IoSlice is ABI-compatible with iovec on
        // Unix; the buffers are valid for reads for the borrow (from_raw's contract).
        unsafe {
            std::slice::from_raw_parts(self.bufs.as_ptr() as *const IoSlice<'_>, self.bufs.len())
        }
    }
}

/// Lists of up to this many buffers are built on the stack by [`with_read_bufs`] and
/// [`with_write_bufs`] (a Xen request has at most 11 direct segments).
const INLINE_BUFS: usize = 16;

const EMPTY: RawBuf = RawBuf {
    base: std::ptr::null_mut(),
    len: 0,
};

/// Runs `f` with `slices` as a [`ReadBufs`]: the safe way to call a disk from ordinary code.
/// No allocation for up to 16 slices.
pub fn with_read_bufs<R>(slices: &mut [&mut [u8]], f: impl FnOnce(&mut ReadBufs<'_>) -> R) -> R {
    let mut inline = [EMPTY; INLINE_BUFS];
    let mut heap = Vec::new();
    let raw: &mut [RawBuf] = if slices.len() <= INLINE_BUFS {
        &mut inline[..slices.len()]
    } else {
        heap.resize(slices.len(), EMPTY);
        &mut heap
    };
    for (r, s) in raw.iter_mut().zip(slices.iter_mut()) {
        *r = RawBuf::from_mut(s);
    }
    // SAFETY: each RawBuf comes from a distinct &mut slice borrowed for this call.
    let mut bufs = unsafe { ReadBufs::from_raw(raw) };
    f(&mut bufs)
}

/// Runs `f` with `slices` as a [`WriteBufs`]. No allocation for up to 16 slices.
pub fn with_write_bufs<R>(slices: &[&[u8]], f: impl FnOnce(&WriteBufs<'_>) -> R) -> R {
    let mut inline = [EMPTY; INLINE_BUFS];
    let mut heap = Vec::new();
    let raw: &mut [RawBuf] = if slices.len() <= INLINE_BUFS {
        &mut inline[..slices.len()]
    } else {
        heap.resize(slices.len(), EMPTY);
        &mut heap
    };
    for (r, s) in raw.iter_mut().zip(slices.iter()) {
        *r = RawBuf::from_ref(s);
    }
    // SAFETY: each RawBuf comes from a shared slice borrowed for this call; WriteBufs only reads.
    let bufs = unsafe { WriteBufs::from_raw(raw) };
    f(&bufs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cross_buffer_edges() {
        let (mut a, mut b) = ([0u8; 3], [0u8; 5]);
        with_read_bufs(&mut [&mut a, &mut b], |r| {
            assert_eq!(r.len(), 8);
            r.fill_range(2, 3, 7);
            r.copy_in_at(5, &[1, 2]);
        });
        assert_eq!(a, [0, 0, 7]);
        assert_eq!(b, [7, 7, 1, 2, 0]);
        let mut out = [0u8; 4];
        with_write_bufs(&[&a, &b], |w| w.copy_out_at(1, &mut out));
        assert_eq!(out, [0, 7, 7, 7]);
    }

    #[test]
    fn long_lists_spill_to_the_heap() {
        let mut store = [[0u8; 2]; 40];
        let mut slices: Vec<&mut [u8]> = store.iter_mut().map(|a| &mut a[..]).collect();
        with_read_bufs(&mut slices, |r| {
            assert_eq!((r.count(), r.len()), (40, 80));
            r.fill(3);
        });
        assert!(store.iter().all(|a| a == &[3, 3]));
    }

    #[test]
    fn io_slices_see_the_same_memory() {
        let mut a = [1u8; 4];
        with_read_bufs(&mut [&mut a], |r| {
            let s = r.as_io_slices_mut();
            assert_eq!((s.len(), s[0].len()), (1, 4));
            // SAFETY: writing through the iovec's base, as preadv would.
            unsafe { *(s[0].as_ptr() as *mut u8) = 9 };
        });
        assert_eq!(a[0], 9);
    }
}
