//! The overlay file's header: the first 4 KiB of the file.
//!
//! ```text
//!  0  magic "XDCOWOV\0"     8  version u32 (2)      12  header size u32 (4096)
//! 16  granularity u64      24  base size u64        32  granule count u64
//! 40  bitmap offset u64    48  bitmap length u64    56  data offset u64
//! 64  checksum u64: FNV-1a of bytes 0..64
//!     version 2 only (version 1 files end here, the rest of the block zero):
//! 72  base record u32: 1 = the fingerprint is the base's, 2 = a commit is under way and it
//!     is the base's with this overlay on top     76  zero u32
//! 80  fingerprint of the base's first MiB u64    88  of its last MiB u64
//! 96  of 16 blocks spread between them u64      104  checksum u64: FNV-1a of bytes 72..104
//! ```
//!
//! All little-endian. Version 1 files, made before the fingerprint, are still read: they
//! record no base (see the crate docs for what that means). Granule `i` lives at `data offset + i * granularity`; the bitmap has
//! bit `i % 8` of byte `i / 8` set when granule `i` is in the overlay.

use super::fingerprint::{fnv1a_from, Fingerprint, FNV_START};
use xen_disk_plugin_api::{Error, Result};

pub const MAGIC: &[u8; 8] = b"XDCOWOV\0";
/// The version written; 1 is still read.
pub const VERSION: u32 = 2;
/// The header block; also the unit the bitmap is padded and persisted in.
pub const BLOCK: u64 = 4096;
const CHECKED: usize = 64;
/// The version 2 base record: bytes 72..104, its checksum at 104.
const RECORD: usize = 72;
const RECORD_END: usize = 104;

/// What a version 2 header records about its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseRecord {
    /// The base's fingerprint; with `committing`, the fingerprint of the base with this
    /// overlay on top, which is what the base becomes once the commit is done.
    pub fingerprint: Fingerprint,
    /// `cow commit` was writing this overlay into the base (it may have stopped midway).
    pub committing: bool,
}

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub granularity: u64,
    pub base_size: u64,
    pub granules: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub data_offset: u64,
    /// None in version 1 files and in memory.
    pub base: Option<BaseRecord>,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_from(FNV_START, bytes)
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
            base: None,
        }
    }

    /// The file's length: every granule's slot, sparse until written.
    pub fn file_len(&self) -> u64 {
        self.data_offset + self.granules * self.granularity
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        b[0..8].copy_from_slice(MAGIC);
        let version: u32 = if self.base.is_some() { VERSION } else { 1 };
        b[8..12].copy_from_slice(&version.to_le_bytes());
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
        if let Some(r) = self.base {
            let state: u32 = if r.committing { 2 } else { 1 };
            b[RECORD..RECORD + 4].copy_from_slice(&state.to_le_bytes());
            let f = r.fingerprint;
            for (i, v) in [f.first, f.last, f.spread].iter().enumerate() {
                b[80 + i * 8..88 + i * 8].copy_from_slice(&v.to_le_bytes());
            }
            let sum = fnv1a(&b[RECORD..RECORD_END]);
            b[RECORD_END..RECORD_END + 8].copy_from_slice(&sum.to_le_bytes());
        }
        b
    }

    /// Parses and checks a header block; `name` is the file, for messages.
    pub fn decode(b: &[u8], name: &str) -> Result<Header> {
        let bad = |what: String| Error::corrupt(format!("{name}: overlay header: {what}"));
        if b.len() < RECORD_END + 8 {
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
        if version != 1 && version != VERSION {
            return Err(bad(format!(
                "version {version}, this plugin reads 1 and {VERSION}"
            )));
        }
        if fnv1a(&b[..CHECKED]) != u64_at(CHECKED) {
            return Err(bad("checksum mismatch".into()));
        }
        let base = if version == 1 {
            None
        } else {
            if fnv1a(&b[RECORD..RECORD_END]) != u64_at(RECORD_END) {
                return Err(bad("base record checksum mismatch".into()));
            }
            let committing = match (u32_at(RECORD), u32_at(RECORD + 4)) {
                (1, 0) => false,
                (2, 0) => true,
                (state, zero) => {
                    return Err(bad(format!(
                        "base record state {state} (reserved {zero}): expected 1 or 2 (and 0)"
                    )))
                }
            };
            Some(BaseRecord {
                fingerprint: Fingerprint {
                    first: u64_at(80),
                    last: u64_at(88),
                    spread: u64_at(96),
                },
                committing,
            })
        };
        let h = Header {
            granularity: u64_at(16),
            base_size: u64_at(24),
            granules: u64_at(32),
            bitmap_offset: u64_at(40),
            bitmap_len: u64_at(48),
            data_offset: u64_at(56),
            base,
        };
        if u32_at(12) as u64 != BLOCK
            || !h.granularity.is_power_of_two()
            || h.granularity < 512
            || h.base_size == 0
            || h != (Header {
                base,
                ..Header::new(h.base_size, h.granularity)
            })
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

    #[test]
    fn version_2_carries_the_base_record_and_version_1_still_reads() {
        let v1 = Header::new(10 << 20, 64 << 10);
        let b = v1.encode();
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 1);
        assert_eq!(Header::decode(&b, "x").unwrap(), v1);
        let v2 = Header {
            base: Some(BaseRecord {
                fingerprint: Fingerprint {
                    first: 1,
                    last: 2,
                    spread: 3,
                },
                committing: true,
            }),
            ..v1
        };
        let mut b = v2.encode();
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 2);
        assert_eq!(Header::decode(&b, "x").unwrap(), v2);
        // The record is checked as strictly as the layout.
        b[90] ^= 1;
        let e = Header::decode(&b, "x").unwrap_err();
        assert!(e.message().contains("base record checksum"), "{e}");
        b[90] ^= 1;
        b[72] = 7;
        let sum = fnv1a(&b[RECORD..RECORD_END]);
        b[RECORD_END..RECORD_END + 8].copy_from_slice(&sum.to_le_bytes());
        let e = Header::decode(&b, "x").unwrap_err();
        assert!(e.message().contains("state 7"), "{e}");
        b[8] = 3;
        let sum = fnv1a(&b[..CHECKED]);
        b[CHECKED..CHECKED + 8].copy_from_slice(&sum.to_le_bytes());
        let e = Header::decode(&b, "x").unwrap_err();
        assert!(e.message().contains("version 3"), "{e}");
    }
}
