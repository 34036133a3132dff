//! A bitmap of the blocks written to a disk: the guard marks it after each write completes,
//! and live backup publishes it (`qemu:dirty-bitmap:NAME`) and copies what it marks.

use std::sync::atomic::{AtomicU64, Ordering};

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

    /// True when block `index` is marked, or lies past the size the map was made for: a
    /// disk that grew after its map was made had writes there the map could not see, so an
    /// incremental backup must copy them (reporting them clean would lose them).
    pub fn get(&self, index: u64) -> bool {
        if index >= self.size.div_ceil(self.granularity) {
            return true;
        }
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

    /// Marks every block `other` marks (a map of the same disk and granularity).
    pub fn add(&self, other: &DirtyMap) {
        for (w, o) in self.words.iter().zip(&other.words) {
            w.fetch_or(o.load(Ordering::Acquire), Ordering::AcqRel);
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

    /// The disk grew after the map was made: writes past its old end were never marked, so
    /// everything there reads as dirty (an incremental backup copies it) and runs reach it.
    #[test]
    fn blocks_past_the_maps_size_count_as_written() {
        let m = DirtyMap::new(2 * 65536, 65536);
        m.mark(3 * 65536, 4096);
        assert!(!m.get(1) && m.get(2) && m.get(3) && m.get(1000));
        assert_eq!(m.run(0, 4 * 65536), (false, 2 * 65536));
        assert_eq!(m.run(2 * 65536, 4 * 65536), (true, 4 * 65536));
        assert!(!m.take(3), "nothing past the end was ever set");
        assert_eq!((m.count(), m.marked()), (0, vec![]));
    }
}
