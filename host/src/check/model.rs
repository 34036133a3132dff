//! A sparse model of disk contents for the conformance suite, and the patterns it writes.
//!
//! Each write gets a fresh seed; a sector's expected bytes are a pure function of (seed,
//! sector number), so the model stores one seed per written sector, not the data.

use std::collections::HashMap;

pub use crate::rng::Rng;

/// Fills `out` with the bytes sector `sector` holds after a write with `seed`.
pub fn sector_bytes(seed: u64, sector: u64, out: &mut [u8]) {
    let mut r = Rng::new(seed.wrapping_mul(31).wrapping_add(sector));
    for chunk in out.chunks_mut(8) {
        let v = r.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Expected contents, per 512-byte sector: `None` = never written (unknown).
#[derive(Debug, Default)]
pub struct Model {
    sectors: HashMap<u64, u64>,
}

impl Model {
    /// Fills `buf` with a write of `seed` at byte `offset` and records it.
    pub fn write(&mut self, seed: u64, offset: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_mut(512).enumerate() {
            let sector = offset / 512 + i as u64;
            sector_bytes(seed, sector, s);
            self.sectors.insert(sector, seed);
        }
    }

    /// Records that a range now reads as zeroes (seed 0 means zeroes).
    pub fn zero(&mut self, offset: u64, len: u64) {
        for sector in offset / 512..(offset + len) / 512 {
            self.sectors.insert(sector, 0);
        }
    }

    /// Forgets a range (after a discard, contents are the disk's choice).
    pub fn forget(&mut self, offset: u64, len: u64) {
        for sector in offset / 512..(offset + len) / 512 {
            self.sectors.remove(&sector);
        }
    }

    /// Compares `buf`, read at `offset`, with the model; returns the first bad sector.
    pub fn verify(&self, offset: u64, buf: &[u8]) -> Result<(), String> {
        let mut want = [0u8; 512];
        for (i, got) in buf.chunks(512).enumerate() {
            let sector = offset / 512 + i as u64;
            match self.sectors.get(&sector) {
                None => continue,
                Some(0) => want.fill(0),
                Some(&seed) => sector_bytes(seed, sector, &mut want),
            }
            if got != &want[..got.len()] {
                return Err(format!(
                    "sector {sector} (byte {}) does not hold what was written",
                    sector * 512
                ));
            }
        }
        Ok(())
    }

    /// Written sectors as sorted (start, count) runs.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut s: Vec<u64> = self.sectors.keys().copied().collect();
        s.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for x in s {
            match runs.last_mut() {
                Some((start, n)) if *start + *n == x => *n += 1,
                _ => runs.push((x, 1)),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_catches_a_wrong_sector() {
        let mut m = Model::default();
        let mut buf = vec![0u8; 2048];
        m.write(7, 4096, &mut buf);
        assert!(m.verify(4096, &buf).is_ok());
        buf[1000] ^= 1;
        assert!(m.verify(4096, &buf).unwrap_err().contains("sector 9"));
        m.zero(4096, 1024);
        assert!(m.verify(4096, &[0u8; 1024]).is_ok());
        assert_eq!(m.runs(), vec![(8, 4)]);
    }
}
