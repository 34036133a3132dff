//! The pages a ring keeps mapped, by grant reference: looked up once per segment, 256 times
//! per 1 MiB request, on the ring thread.
//!
//! A hash table spreads neighbouring references over the whole table, and a large request's
//! data copy evicts it from the cache between requests: profiled on a 1 MiB read through
//! `ceph-rbd`, its lookups took a sixth of the ring thread's time. A reference indexes the
//! guest's grant table, 512 entries a page, which Xen limits to a few dozen pages unless told
//! otherwise (`gnttab_max_frames`), so references below [`DIRECT`] index an array directly,
//! in chunks of 4 KiB allocated on first use: neighbouring references share a cache line, and
//! memory follows the references a guest uses. The rest go to a hash table seeded per table,
//! since the guest picks the keys.

use std::collections::HashMap;

/// References below this index the array (512 KiB of pointers when all are used).
const DIRECT: u32 = 1 << 16;
/// Pointers per chunk of the array (one 4 KiB allocation).
const CHUNK: usize = 512;

/// Page pointers by grant reference. A mapped page is never null, so null marks a reference
/// the table does not hold.
pub(super) struct GrefTable {
    chunks: Vec<Option<Box<[*mut u8; CHUNK]>>>,
    others: HashMap<u32, *mut u8, GrefHasher>,
    len: usize,
}

impl GrefTable {
    pub(super) fn new() -> GrefTable {
        GrefTable {
            chunks: Vec::new(),
            others: HashMap::with_hasher(GrefHasher::random()),
            len: 0,
        }
    }

    /// The page held for `gref`.
    #[inline]
    pub(super) fn get(&self, gref: u32) -> Option<*mut u8> {
        if gref < DIRECT {
            let (chunk, i) = (gref as usize / CHUNK, gref as usize % CHUNK);
            let p = self.chunks.get(chunk)?.as_ref()?[i];
            (!p.is_null()).then_some(p)
        } else {
            self.others.get(&gref).copied()
        }
    }

    /// Holds `page` (not null) for `gref`, replacing what was held.
    pub(super) fn insert(&mut self, gref: u32, page: *mut u8) {
        debug_assert!(!page.is_null());
        let previous = if gref < DIRECT {
            let (chunk, i) = (gref as usize / CHUNK, gref as usize % CHUNK);
            if self.chunks.len() <= chunk {
                self.chunks.resize_with(chunk + 1, || None);
            }
            let slots =
                self.chunks[chunk].get_or_insert_with(|| Box::new([std::ptr::null_mut(); CHUNK]));
            std::mem::replace(&mut slots[i], page)
        } else {
            self.others
                .insert(gref, page)
                .unwrap_or(std::ptr::null_mut())
        };
        if previous.is_null() {
            self.len += 1;
        }
    }

    /// References held.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Holds nothing any more (and frees the chunks).
    pub(super) fn clear(&mut self) {
        self.chunks.clear();
        self.others.clear();
        self.len = 0;
    }
}

/// A hash for grant references above [`DIRECT`], where SipHash would cost several percent of
/// a large read. The key comes from the guest, so the multiplier is seeded per table: a guest
/// cannot pick references that collide.
#[derive(Clone)]
struct GrefHasher {
    seed: u64,
}

impl GrefHasher {
    fn random() -> GrefHasher {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64);
        GrefHasher { seed }
    }
}

impl std::hash::BuildHasher for GrefHasher {
    type Hasher = GrefHash;
    fn build_hasher(&self) -> GrefHash {
        GrefHash {
            seed: self.seed,
            value: 0,
        }
    }
}

/// See [`GrefHasher`].
struct GrefHash {
    seed: u64,
    value: u64,
}

impl std::hash::Hasher for GrefHash {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        // Multiply by an odd seeded constant, then fold the high bits down: the low bits pick
        // the bucket and the high bits the tag, and both must depend on every key bit.
        let x = (n ^ self.value ^ self.seed).wrapping_mul(self.seed | 1 | 0x9e37_79b9_0000_0000);
        self.value = x ^ (x >> 29) ^ (x >> 47);
    }
    fn finish(&self) -> u64 {
        self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: usize) -> *mut u8 {
        // Never dereferenced: distinct non-null values stand for pages.
        (n * 4096 + 4096) as *mut u8
    }

    #[test]
    fn references_on_both_sides_of_the_array_are_held_and_counted_once() {
        let mut t = GrefTable::new();
        let refs = [0, 1, 511, 512, DIRECT - 1, DIRECT, DIRECT + 1, u32::MAX];
        for (i, &r) in refs.iter().enumerate() {
            assert_eq!(t.get(r), None, "{r} before insert");
            t.insert(r, page(i));
        }
        assert_eq!(t.len(), refs.len());
        for (i, &r) in refs.iter().enumerate() {
            assert_eq!(t.get(r), Some(page(i)), "{r}");
        }
        // Neighbours of held references in a chunk that exists are not held.
        assert_eq!(t.get(2), None);
        assert_eq!(t.get(513), None);
        assert_eq!(t.get(DIRECT + 2), None);
        // A reference beyond every chunk allocated so far.
        assert_eq!(t.get(DIRECT - 600), None);
        // Replacing keeps the count.
        t.insert(511, page(99));
        t.insert(u32::MAX, page(98));
        assert_eq!(t.len(), refs.len());
        assert_eq!(t.get(511), Some(page(99)));
        assert_eq!(t.get(u32::MAX), Some(page(98)));
        t.clear();
        assert_eq!(t.len(), 0);
        assert!(refs.iter().all(|&r| t.get(r).is_none()));
    }

    #[test]
    fn only_the_chunks_a_guest_uses_are_allocated() {
        let mut t = GrefTable::new();
        t.insert(40_000, page(1));
        let allocated = t.chunks.iter().filter(|c| c.is_some()).count();
        assert_eq!(allocated, 1);
        assert_eq!(t.chunks.len(), 40_000 / CHUNK + 1);
    }
}
