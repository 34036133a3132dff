//! Metadata contexts: what `NBD_CMD_BLOCK_STATUS` reports.
//!
//! - `base:allocation`: holes and zero ranges, from the plugin stack's block status
//!   ([`GuardedDisk::extents`](crate::plugin::GuardedDisk::extents)); a plugin that does not
//!   report any reads as all data.
//! - `qemu:dirty-bitmap:NAME`: the blocks a [`DirtyMap`] marks, with the flag qemu uses
//!   (bit 0 = dirty), so `nbdinfo --map=qemu:dirty-bitmap:NAME` and qemu's backup jobs
//!   read it.
//!
//! Queries: `LIST_META_CONTEXT` with no query or with `base:` / `qemu:` /
//! `qemu:dirty-bitmap:` lists what the export has; `SET_META_CONTEXT` selects exact names
//! only, and ignores the rest as the protocol asks.

use super::wire::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use super::Export;
use std::sync::atomic::{AtomicU64, Ordering};

/// Most descriptors sent in one block status chunk (the protocol asks for at most 2^20).
pub const MAX_DESCRIPTORS: usize = 1 << 16;

/// A context a client selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:dirty-bitmap:NAME`, by its index in [`Export::bitmaps`].
    Dirty(usize),
}

const ALLOCATION: &str = "base:allocation";
const DIRTY_PREFIX: &str = "qemu:dirty-bitmap:";

impl Context {
    /// The context's full name.
    pub fn name(self, export: &Export) -> String {
        match self {
            Context::Allocation => ALLOCATION.to_string(),
            Context::Dirty(i) => format!("{DIRTY_PREFIX}{}", export.bitmaps[i].0),
        }
    }
}

/// Every context the export offers.
pub fn all(export: &Export) -> Vec<Context> {
    let mut v = vec![Context::Allocation];
    v.extend((0..export.bitmaps.len()).map(Context::Dirty));
    v
}

/// What a `LIST_META_CONTEXT` query matches (wildcards by namespace allowed).
pub fn list_matches(export: &Export, query: &str) -> Vec<Context> {
    all(export)
        .into_iter()
        .filter(|c| {
            let name = c.name(export);
            name == query
                || (query.ends_with(':') && name.starts_with(query))
                || (query == DIRTY_PREFIX && name.starts_with(DIRTY_PREFIX))
        })
        .collect()
}

/// What a `SET_META_CONTEXT` query selects: an exact name, or nothing.
pub fn set_match(export: &Export, query: &str) -> Option<Context> {
    all(export).into_iter().find(|c| c.name(export) == query)
}

/// The descriptors (length, flags) for `context` from `offset`, covering at least one byte
/// and at most `len` bytes (`len` > 0, inside the disk: the caller checked). Each length is
/// a whole number of `align` bytes except where the disk ends.
pub fn status(
    export: &Export,
    context: Context,
    offset: u64,
    len: u64,
    align: u64,
) -> Vec<(u32, u32)> {
    // u32 lengths: keep each descriptor below 4 GiB, on the alignment.
    let cap = u64::from(u32::MAX) / align * align;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let push = |len: u64, flags: u32, out: &mut Vec<(u32, u32)>| {
        let mut left = len;
        while left > 0 {
            let n = left.min(cap);
            match out.last_mut() {
                Some((l, f)) if *f == flags && u64::from(*l) + n <= cap => *l += n as u32,
                _ => out.push((n as u32, flags)),
            }
            left -= n;
        }
    };
    match context {
        Context::Allocation => {
            let runs = export.disk.extents(offset, len, MAX_DESCRIPTORS);
            for e in runs {
                let flags =
                    if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
                push(e.len, flags, &mut out);
                if out.len() >= MAX_DESCRIPTORS {
                    break;
                }
            }
        }
        Context::Dirty(i) => {
            let map = &export.bitmaps[i].1;
            let end = offset + len;
            let mut pos = offset;
            while pos < end && out.len() < MAX_DESCRIPTORS {
                let (dirty, run_end) = map.run(pos, end);
                push(run_end - pos, if dirty { STATE_DIRTY } else { 0 }, &mut out);
                pos = run_end;
            }
        }
    }
    out
}

/// A bitmap of blocks written: one bit per `granularity` bytes. Setting is lock-free, so
/// the write path pays one atomic OR per block.
pub struct DirtyMap {
    granularity: u64,
    size: u64,
    words: Vec<AtomicU64>,
}

impl DirtyMap {
    /// A clean map of a `size`-byte disk; `granularity` is a power of two ≥ 512.
    pub fn new(size: u64, granularity: u64) -> DirtyMap {
        assert!(granularity.is_power_of_two() && granularity >= 512);
        let blocks = size.div_ceil(granularity);
        DirtyMap {
            granularity,
            size,
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The disk size the map covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Marks every block that `[offset, offset + len)` touches (clipped to the map).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let (first, last) = (offset / self.granularity, (end - 1) / self.granularity);
        for b in first..=last {
            self.words[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::AcqRel);
        }
    }

    /// True when block `index` is marked.
    pub fn get(&self, index: u64) -> bool {
        self.words
            .get((index / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (index % 64)) != 0)
    }

    /// Clears block `index`; returns whether it was marked.
    pub fn take(&self, index: u64) -> bool {
        match self.words.get((index / 64) as usize) {
            Some(w) => {
                w.fetch_and(!(1 << (index % 64)), Ordering::AcqRel) & (1 << (index % 64)) != 0
            }
            None => false,
        }
    }

    /// Number of marked blocks.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Indices of the marked blocks, in order.
    pub fn marked(&self) -> Vec<u64> {
        let blocks = self.size.div_ceil(self.granularity);
        (0..blocks).filter(|&b| self.get(b)).collect()
    }

    /// The run from `pos` (< `end`) of blocks all marked or all not: (marked?, run end).
    pub fn run(&self, pos: u64, end: u64) -> (bool, u64) {
        let g = self.granularity;
        let marked = self.get(pos / g);
        let mut next = (pos / g + 1) * g;
        while next < end && self.get(next / g) == marked {
            next += g;
        }
        (marked, next.min(end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dirty_map_marks_every_block_a_range_touches_and_runs_merge() {
        let m = DirtyMap::new(10 * 65536 + 512, 65536);
        m.mark(65536 - 512, 1024);
        m.mark(10 * 65536, 512);
        m.mark(u64::MAX - 5, 100);
        assert_eq!(m.marked(), vec![0, 1, 10]);
        assert_eq!(m.run(0, 10 * 65536), (true, 2 * 65536));
        assert_eq!(m.run(2 * 65536, 10 * 65536), (false, 10 * 65536));
        assert!(m.take(1) && !m.take(1));
        assert_eq!(m.count(), 2);
    }
}
