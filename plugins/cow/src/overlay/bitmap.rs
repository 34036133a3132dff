//! Which granules are in the overlay: one bit each, read without locks.
//!
//! A bit is set (Release) only after its granule's data is in the overlay store, so a
//! reader that sees it (Acquire) reads that data. Bits only ever go from 0 to 1 while a disk
//! is open; `reset` clears them offline. Each 4 KiB page of the bitmap carries a dirty flag
//! so `flush` persists only what changed.

use super::header::BLOCK;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const WORDS_PER_PAGE: usize = BLOCK as usize / 8;

pub struct Bitmap {
    words: Vec<AtomicU64>,
    dirty: Vec<AtomicBool>,
}

impl Bitmap {
    /// A bitmap stored in `len` bytes (a multiple of 4096), all clear.
    pub fn zeroed(len: usize) -> Bitmap {
        Self::from_bytes(&vec![0; len])
    }

    /// A bitmap from its on-disk bytes (length a multiple of 8).
    pub fn from_bytes(bytes: &[u8]) -> Bitmap {
        let words: Vec<AtomicU64> = bytes
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                AtomicU64::new(u64::from_le_bytes(w))
            })
            .collect();
        let pages = words.len().div_ceil(WORDS_PER_PAGE);
        Bitmap {
            words,
            dirty: (0..pages).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    pub fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    pub fn set(&self, i: u64) {
        let w = (i / 64) as usize;
        self.words[w].fetch_or(1 << (i % 64), Ordering::Release);
        self.dirty[w / WORDS_PER_PAGE].store(true, Ordering::Release);
    }

    /// Allocated granule numbers, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, word)| {
            let v = word.load(Ordering::Acquire);
            (0..64u64)
                .filter(move |b| v & (1 << b) != 0)
                .map(move |b| w as u64 * 64 + b)
        })
    }

    /// Takes the dirty pages: (byte offset in the bitmap, the page's bytes now).
    pub fn take_dirty(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for (p, flag) in self.dirty.iter().enumerate() {
            if !flag.swap(false, Ordering::AcqRel) {
                continue;
            }
            let first = p * WORDS_PER_PAGE;
            let last = (first + WORDS_PER_PAGE).min(self.words.len());
            let bytes = self.words[first..last]
                .iter()
                .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
                .collect();
            out.push((p as u64 * BLOCK, bytes));
        }
        out
    }

    /// Marks pages dirty again after a failed persist, so the next flush retries them.
    pub fn redirty(&self, byte_offsets: &[u64]) {
        for &o in byte_offsets {
            self.dirty[(o / BLOCK) as usize].store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_pages_and_bytes_agree() {
        let b = Bitmap::zeroed(8192);
        b.set(3);
        b.set(40_000);
        assert!(b.get(3) && b.get(40_000) && !b.get(4));
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![3, 40_000]);
        let pages = b.take_dirty();
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[0].1[0], 0b1000);
        assert_eq!(pages[1].0, 4096);
        assert!(b.take_dirty().is_empty());
        let mut all = pages[0].1.clone();
        all.extend_from_slice(&pages[1].1);
        let again = Bitmap::from_bytes(&all);
        assert_eq!(again.iter_set().collect::<Vec<_>>(), vec![3, 40_000]);
    }
}
