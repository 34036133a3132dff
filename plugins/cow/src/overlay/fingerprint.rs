//! Which base an overlay belongs to: a fingerprint of sampled parts of the base's content,
//! taken when the overlay is made and compared each time it is opened or committed.
//!
//! The samples are the first MiB, the last MiB and 16 blocks of 64 KiB spread evenly
//! between them, each part hashed on its own (FNV-1a, 64 bits), so a refusal can say which
//! part differs. About 3 MiB are read per open. Another image of the same size differs in
//! its partition table, its filesystem's superblocks or its data, so it is caught; an edit
//! to the same image that misses every sample is not. The base cannot change under the
//! overlay through cow (it is opened read-only), so a difference means another base, or one
//! changed by something else — and the overlay's granules would land on the wrong bytes.

use xen_disk_plugin_api::Result;

/// Bytes read at each end of the base.
const EDGE: u64 = 1 << 20;
/// Blocks sampled between the ends, and their length.
const SPREAD: u64 = 16;
const SPREAD_LEN: u64 = 64 << 10;
/// The unit reads are made in (and sample offsets aligned to): a multiple of every sector
/// size a base can have.
const CHUNK: u64 = 64 << 10;

/// The hashes of the three sampled parts of a base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub first: u64,
    pub last: u64,
    pub spread: u64,
}

/// FNV-1a, continued from `h`.
pub(crate) fn fnv1a_from(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub(crate) const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

impl Fingerprint {
    /// Samples a disk of `size` bytes with `sector`-byte sectors through `read` (aligned,
    /// in-range reads of at most 64 KiB).
    pub fn of(
        size: u64,
        sector: u32,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Fingerprint> {
        let sector = u64::from(sector.max(1));
        // Whole sectors only: a base's last partial sector (if a plugin had one) is left out.
        let end = size / sector * sector;
        let mut buf = vec![0u8; CHUNK as usize];
        let mut hash = |h: u64, from: u64, to: u64| -> Result<u64> {
            let mut h = h;
            let mut at = from;
            while at < to {
                let n = (to - at).min(CHUNK) as usize;
                read(at, &mut buf[..n])?;
                h = fnv1a_from(h, &buf[..n]);
                at += n as u64;
            }
            Ok(h)
        };
        let first = hash(FNV_START, 0, EDGE.min(end))?;
        let last = hash(FNV_START, end - EDGE.min(end), end)?;
        let mut spread = FNV_START;
        for k in 0..SPREAD {
            // Centres of 16 equal slices, aligned down so every read stays sector-aligned.
            let at = (u128::from(end) * u128::from(2 * k + 1) / u128::from(2 * SPREAD)) as u64;
            let at = at / CHUNK * CHUNK;
            let to = (at + SPREAD_LEN).min(end);
            spread = hash(spread, at, to)?;
        }
        Ok(Fingerprint {
            first,
            last,
            spread,
        })
    }

    /// What differs from `other`, in words ("the first MiB and the last MiB").
    pub fn differences(&self, other: &Fingerprint) -> String {
        let mut parts = Vec::new();
        if self.first != other.first {
            parts.push("the first MiB");
        }
        if self.last != other.last {
            parts.push("the last MiB");
        }
        if self.spread != other.spread {
            parts.push("the 16 sampled blocks between them");
        }
        match parts.split_last() {
            None => String::new(),
            Some((last, [])) => (*last).to_string(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(data: &[u8]) -> Fingerprint {
        Fingerprint::of(data.len() as u64, 512, |at, buf| {
            assert_eq!(at % 512, 0);
            assert_eq!(buf.len() % 512, 0);
            buf.copy_from_slice(&data[at as usize..][..buf.len()]);
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn each_part_is_told_apart() {
        let size = 8 << 20;
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
        let f = of(&data);
        assert_eq!(f, of(&data));
        let changed = |at: usize| {
            let mut d = data.clone();
            d[at] ^= 1;
            of(&d)
        };
        assert_eq!(changed(5).differences(&f), "the first MiB");
        assert_eq!(changed(size - 1).differences(&f), "the last MiB");
        // The centre of the 9th slice: 8 MiB * 17/32, aligned down to 64 KiB.
        assert_eq!(
            changed((size * 17 / 32) / 65536 * 65536 + 100).differences(&f),
            "the 16 sampled blocks between them"
        );
        // Tiny disks: the parts overlap, nothing is read out of range.
        assert_eq!(of(&data[..512]), of(&data[..512]));
        assert_eq!(of(&data[..3 * 512]).differences(&of(&data[..3 * 512])), "");
    }
}
