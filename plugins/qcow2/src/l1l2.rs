//! L1 and L2 table entries: decoding a guest cluster's mapping into a [`Mapping`].
//!
//! Sits between the image (which walks L1 -> L2) and the data path; every host offset is
//! checked for alignment here so the data path only sees sane numbers.

use xen_disk_plugin_api::{Error, Result};

/// Bit 63 of L1/L2 entries: refcount is exactly one (writable in place).
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (v3): reads as zeroes.
pub const ZERO: u64 = 1;
/// Host offset bits of L1 entries and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What a guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: read from the backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a still-allocated cluster (or 0).
    Zero { host: u64 },
    /// Plain data at `host`.
    Data { host: u64 },
    /// Deflate data at `host`, `len` bytes (may run a little past the real stream).
    Compressed { host: u64, len: u64 },
}

/// Decodes the L2 table offset of an L1 entry (0 = no L2 table).
pub fn l1_to_l2_offset(name: &str, entry: u64, cluster_size: u64, file_len: u64) -> Result<u64> {
    let off = entry & OFFSET_MASK;
    if off != 0
        && (!off.is_multiple_of(cluster_size) || off.saturating_add(cluster_size) > file_len)
    {
        return Err(Error::corrupt(format!(
            "{name}: L1 entry points to L2 table at {off:#x}, unaligned or outside the file ({file_len} bytes)"
        )));
    }
    Ok(off)
}

/// Decodes an L2 entry. `version` is 2 or 3 (the zero flag only exists in v3).
pub fn decode_l2(name: &str, entry: u64, cluster_bits: u32, version: u32) -> Result<Mapping> {
    let cs = 1u64 << cluster_bits;
    if entry & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = (entry & ((1u64 << 62) - 1)) >> x;
        let len = (sectors + 1) * 512 - (host & 511);
        if len > 2 * cs + 512 {
            return Err(Error::corrupt(format!(
                "{name}: compressed L2 entry {entry:#x} is too long"
            )));
        }
        return Ok(Mapping::Compressed { host, len });
    }
    let host = entry & OFFSET_MASK;
    if !host.is_multiple_of(cs) {
        return Err(Error::corrupt(format!(
            "{name}: L2 entry {entry:#x} has unaligned data offset {host:#x}"
        )));
    }
    if version >= 3 && entry & ZERO != 0 {
        return Ok(Mapping::Zero { host });
    }
    Ok(if host == 0 {
        Mapping::Unallocated
    } else {
        Mapping::Data { host }
    })
}
