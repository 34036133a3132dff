//! The Block Allocation Table: one big-endian u32 sector offset per block, `0xffffffff` for
//! an unallocated block. Loaded and checked against the file's layout on open.

use xen_disk_plugin_api::{Error, Result};

pub const UNALLOCATED: u32 = u32::MAX;

/// Decodes `n` entries and checks every allocated block (bitmap + data, `span` bytes) lies
/// after the metadata end `meta_end`, before `limit`, and overlaps no other block. Returns the
/// entries and the end of the last block.
pub fn parse(
    raw: &[u8],
    n: usize,
    span: u64,
    meta_end: u64,
    limit: u64,
    file: &str,
) -> Result<(Vec<u32>, u64)> {
    let bat: Vec<u32> = raw
        .chunks_exact(4)
        .take(n)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut used: Vec<(u64, usize)> = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let start = u64::from(e) * 512;
        if start < meta_end || start + span > limit {
            return Err(Error::corrupt(format!(
                "{file}: BAT entry {i} points at byte {start:#x}, outside the data area [{meta_end:#x}, {limit:#x})"
            )));
        }
        used.push((start, i));
    }
    used.sort_unstable();
    for w in used.windows(2) {
        if w[0].0 + span > w[1].0 {
            return Err(Error::corrupt(format!(
                "{file}: BAT entries {} and {} overlap",
                w[0].1, w[1].1
            )));
        }
    }
    let end = used.last().map_or(meta_end, |&(s, _)| s + span);
    Ok((bat, end))
}
