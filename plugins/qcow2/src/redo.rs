//! Metadata changes kept in the host's crash log until they are written back, so that a
//! killed process loses no acknowledged write (see `xen_disk_plugin_api::crash_log`).
//!
//! Every change the image makes to its cached metadata is also noted as a record: the file
//! offset and the bytes that will be written there at the next writeback. The records of a
//! request are appended before the request is answered, after its data was written. On
//! open, records a dead process left are written into the image in the writeback's own
//! order, one class after the other with a sync between (see the image module's "Crash
//! safety"), so a power loss during the replay is no worse than one during a writeback.

use crate::header::Header;
use std::fs::File;
use std::os::unix::fs::FileExt;
use xen_disk_plugin_api::crash_log::Record;
use xen_disk_plugin_api::{Error, Result};

/// Refcount blocks and their entries, new L2 tables, a new refcount table: nothing on disk
/// points at them yet, or they only raise refcounts.
pub const REFCOUNTS: u8 = 0;
/// Entries of the refcount table the header names, and the header's refcount table fields.
pub const TABLE: u8 = 1;
/// L1 and L2 entries: the pointers, written last.
pub const POINTERS: u8 = 2;

/// The header's refcount table offset (8 bytes) and cluster count (4 bytes).
pub const HEADER_REFTABLE_FIELDS: (u64, usize) = (48, 12);

/// Checks every record against the image before any is applied: a record that would write
/// into the header (other than its refcount table fields), past any place the image could
/// have grown to, or in an unknown class means the log is not what this image left.
pub fn check(name: &str, log: &str, hdr: &Header, file_len: u64, records: &[Record]) -> Result<()> {
    let cs = hdr.cluster_size();
    // Allocation only appends: at most one L2 table per L1 entry, refcount blocks and a
    // grown refcount table beyond what the data needed.
    let limit = file_len
        .saturating_add((u64::from(hdr.l1_size) + 64).saturating_mul(cs))
        .saturating_add(crate::header::MAX_REFTABLE_BYTES);
    for (i, r) in records.iter().enumerate() {
        let bad = |why: &str| {
            Err(Error::corrupt(format!(
                "{name}: crash log {log}: record {i} ({} bytes at {:#x}, class {}) {why}; move the log away to open the image without it (losing the writes it describes)",
                r.data.len(),
                r.at,
                r.class
            )))
        };
        if r.class > POINTERS {
            return bad("has an unknown class");
        }
        let end = r.at.checked_add(r.data.len() as u64);
        if end.is_none_or(|e| e > limit) {
            return bad("is past where the image could have grown");
        }
        let header_fields = (r.at, r.data.len()) == HEADER_REFTABLE_FIELDS && r.class == TABLE;
        if r.at < cs && !header_fields {
            return bad("writes into the header");
        }
    }
    Ok(())
}

/// Writes checked records into the image, class by class with a sync after each.
pub fn apply(file: &File, name: &str, records: &[Record]) -> Result<()> {
    let err = |what: &str, e: std::io::Error| {
        Error::io(
            e.raw_os_error().unwrap_or(5),
            format!("{name}: {what}: {e}"),
        )
    };
    for class in [REFCOUNTS, TABLE, POINTERS] {
        for r in records.iter().filter(|r| r.class == class) {
            file.write_all_at(&r.data, r.at)
                .map_err(|e| err("replay crash log", e))?;
        }
        file.sync_data().map_err(|e| err("fdatasync", e))?;
    }
    Ok(())
}
