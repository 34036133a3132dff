//! The overlay file's header: the first 4 KiB of the file.
//!
//! ```text
//!  0  magic "XDCOWOV\0"     8  version u32 (1)      12  header size u32 (4096)
//! 16  granularity u64      24  base size u64        32  granule count u64
//! 40  bitmap offset u64    48  bitmap length u64    56  data offset u64
//! 64  checksum u64: FNV-1a of bytes 0..64
//! ```
//!
//! All little-endian. Granule `i` lives at `data offset + i * granularity`; the bitmap has
//! bit `i % 8` of byte `i / 8` set when granule `i` is in the overlay.

use xen_disk_plugin_api::{Error, Result};

pub const MAGIC: &[u8; 8] = b"XDCOWOV\0";
pub const VERSION: u32 = 1;
/// The header block; also the unit the bitmap is padded and persisted in.
pub const BLOCK: u64 = 4096;
const CHECKED: usize = 64;

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub granularity: u64,
    pub base_size: u64,
    pub granules: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub data_offset: u64,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

impl Header {
    /// The layout for a new overlay over a base of `base_size` bytes.
    pub fn new(base_size: u64, granularity: u64) -> Header {
        let granules = base_size.div_ceil(granularity);
        let bitmap_len = round_up(granules.div_ceil(8), BLOCK);
        // Granule-aligned data keeps each granule inside as few filesystem blocks as it can.
        let data_offset = round_up(BLOCK + bitmap_len, granularity.max(BLOCK));
        Header {
            granularity,
            base_size,
            granules,
            bitmap_offset: BLOCK,
            bitmap_len,
            data_offset,
        }
    }

    /// The file's length: every granule's slot, sparse until written.
    pub fn file_len(&self) -> u64 {
        self.data_offset + self.granules * self.granularity
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        let fields = [
            self.granularity,
            self.base_size,
            self.granules,
            self.bitmap_offset,
            self.bitmap_len,
            self.data_offset,
        ];
        for (i, v) in fields.iter().enumerate() {
            b[16 + i * 8..24 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let sum = fnv1a(&b[..CHECKED]);
        b[CHECKED..CHECKED + 8].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses and checks a header block; `name` is the file, for messages.
    pub fn decode(b: &[u8], name: &str) -> Result<Header> {
        let bad = |what: String| Error::corrupt(format!("{name}: overlay header: {what}"));
        if b.len() < CHECKED + 8 {
            return Err(bad(format!(
                "file is {} bytes, shorter than the header",
                b.len()
            )));
        }
        if &b[0..8] != MAGIC {
            return Err(bad("wrong magic: not a cow overlay file".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "version {version}, this plugin reads {VERSION}"
            )));
        }
        if fnv1a(&b[..CHECKED]) != u64_at(CHECKED) {
            return Err(bad("checksum mismatch".into()));
        }
        let h = Header {
            granularity: u64_at(16),
            base_size: u64_at(24),
            granules: u64_at(32),
            bitmap_offset: u64_at(40),
            bitmap_len: u64_at(48),
            data_offset: u64_at(56),
        };
        if u32_at(12) as u64 != BLOCK
            || !h.granularity.is_power_of_two()
            || h.granularity < 512
            || h.base_size == 0
            || h != Header::new(h.base_size, h.granularity)
        {
            return Err(bad(format!("inconsistent layout {h:?}")));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let h = Header::new(10 << 20, 64 << 10);
        assert_eq!(h.granules, 160);
        assert_eq!((h.bitmap_len, h.data_offset), (4096, 64 << 10));
        let mut b = h.encode();
        assert_eq!(Header::decode(&b, "x").unwrap(), h);
        b[20] ^= 1;
        let e = Header::decode(&b, "x").unwrap_err();
        assert!(e.message().contains("checksum"), "{e}");
        b[0] = b'Y';
        let e = Header::decode(&b, "x").unwrap_err();
        assert!(e.message().contains("magic"), "{e}");
        assert!(Header::decode(&b[..10], "x").is_err());
    }
}
