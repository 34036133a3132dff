//! The 512-byte hard disk footer: the last sector of every VHD (and, for dynamic and
//! differencing disks, a copy in sector 0). Parsed into a validated [`Footer`]; encoded back
//! with a fresh checksum.

use xen_disk_plugin_api::{Error, Result};

pub const FOOTER_SIZE: usize = 512;
pub const COOKIE: &[u8; 8] = b"conectix";
/// 2040 GiB: the largest size the format's CHS geometry and 32-bit BAT sector offsets allow.
pub const MAX_SIZE: u64 = 2040 << 30;

/// The disk types the footer names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

/// A validated footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub data_offset: u64,
    pub timestamp: u32,
    pub current_size: u64,
    pub geometry: (u16, u8, u8),
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    /// The raw sector, kept so rewriting it preserves fields we do not interpret.
    pub raw: [u8; FOOTER_SIZE],
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// One's complement of the byte sum, skipping the 4-byte checksum field at `skip`.
pub fn checksum(b: &[u8], skip: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

impl Footer {
    /// Parses and validates a footer read from `file` (named in errors).
    pub fn parse(b: &[u8; FOOTER_SIZE], file: &str) -> Result<Footer> {
        if &b[0..8] != COOKIE {
            return Err(Error::corrupt(format!(
                "{file}: footer cookie is not \"conectix\""
            )));
        }
        let stored = be32(b, 64);
        let want = checksum(b, 64);
        if stored != want {
            return Err(Error::corrupt(format!(
                "{file}: footer checksum is {stored:#010x}, computed {want:#010x}"
            )));
        }
        let version = be32(b, 12);
        if version >> 16 != 1 {
            return Err(Error::corrupt(format!(
                "{file}: footer file format version {version:#x} is not supported"
            )));
        }
        let disk_type = match be32(b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => {
                return Err(Error::corrupt(format!(
                    "{file}: footer disk type {t} is not supported (fixed 2, dynamic 3, differencing 4)"
                )))
            }
        };
        let current_size = be64(b, 48);
        if current_size == 0 || !current_size.is_multiple_of(512) || current_size > MAX_SIZE {
            return Err(Error::corrupt(format!(
                "{file}: footer current size {current_size} is not a non-zero multiple of 512 up to 2040 GiB"
            )));
        }
        let data_offset = be64(b, 16);
        if disk_type != DiskType::Fixed
            && (!data_offset.is_multiple_of(512) || data_offset == u64::MAX)
        {
            return Err(Error::corrupt(format!(
                "{file}: footer data offset {data_offset:#x} is not a sector offset"
            )));
        }
        let mut unique_id = [0; 16];
        unique_id.copy_from_slice(&b[68..84]);
        Ok(Footer {
            data_offset,
            timestamp: be32(b, 24),
            current_size,
            geometry: (u16::from_be_bytes([b[56], b[57]]), b[58], b[59]),
            disk_type,
            unique_id,
            raw: *b,
        })
    }

    /// Builds a new footer.
    pub fn new(disk_type: DiskType, size: u64, data_offset: u64, unique_id: [u8; 16]) -> Footer {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&2u32.to_be_bytes());
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[16..24].copy_from_slice(&data_offset.to_be_bytes());
        let ts = vhd_timestamp();
        b[24..28].copy_from_slice(&ts.to_be_bytes());
        b[28..32].copy_from_slice(b"xdsk");
        b[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[36..40].copy_from_slice(b"Wi2k");
        b[40..48].copy_from_slice(&size.to_be_bytes());
        b[48..56].copy_from_slice(&size.to_be_bytes());
        let (c, h, s) = geometry(size);
        b[56..58].copy_from_slice(&c.to_be_bytes());
        b[58] = h;
        b[59] = s;
        let t: u32 = match disk_type {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        };
        b[60..64].copy_from_slice(&t.to_be_bytes());
        b[68..84].copy_from_slice(&unique_id);
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        Footer::parse(&b, "new footer").expect("a footer we build is valid")
    }
}

/// Seconds since 2000-01-01 00:00:00 UTC, the format's epoch.
pub fn vhd_timestamp() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    unix.saturating_sub(946_684_800) as u32
}

/// The spec's CHS geometry for `size` bytes.
pub fn geometry(size: u64) -> (u16, u8, u8) {
    let mut total = size / 512;
    if total > 65535 * 16 * 255 {
        total = 65535 * 16 * 255;
    }
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// Rounds `size` up to what the CHS geometry can express, as other VHD tools do, so they
/// all agree on the disk size.
pub fn chs_size(size: u64) -> u64 {
    let want = size.div_ceil(512);
    let mut total = want;
    loop {
        let (c, h, s) = geometry(total * 512);
        let chs = u64::from(c) * u64::from(h) * u64::from(s);
        if chs >= want || total >= 65535 * 16 * 255 {
            return chs.max(1) * 512;
        }
        total += 1;
    }
}

/// A random-enough UUID for a new image (time, pid and a counter through a hash).
pub fn new_uuid() -> [u8; 16] {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for chunk in out.chunks_mut(8) {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out[6] = (out[6] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}
