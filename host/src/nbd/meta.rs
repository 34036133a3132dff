//! Metadata contexts: what `NBD_CMD_BLOCK_STATUS` reports.
//!
//! - `base:allocation`: holes and zero ranges, from the plugin stack's block status
//!   ([`GuardedDisk::extents`](crate::plugin::GuardedDisk::extents)); a plugin that does not
//!   report any reads as all data.
//! - `qemu:dirty-bitmap:NAME`: the blocks a [`DirtyMap`] marks, with the flag qemu uses
//!   (bit 0 = dirty), so `nbdinfo --map=qemu:dirty-bitmap:NAME` and qemu's backup jobs
//!   read it.
//!
//! Queries: `LIST_META_CONTEXT` with no query or with `base:` / `qemu:` /
//! `qemu:dirty-bitmap:` lists what the export has; `SET_META_CONTEXT` selects exact names
//! only, and ignores the rest as the protocol asks.

use super::wire::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use super::Export;
pub use crate::plugin::DirtyMap;

/// Most descriptors sent in one block status chunk (the protocol asks for at most 2^20).
pub const MAX_DESCRIPTORS: usize = 1 << 16;

/// A context a client selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:dirty-bitmap:NAME`, by its index in [`Export::bitmaps`].
    Dirty(usize),
}

const ALLOCATION: &str = "base:allocation";
const DIRTY_PREFIX: &str = "qemu:dirty-bitmap:";

impl Context {
    /// The context's full name.
    pub fn name(self, export: &Export) -> String {
        match self {
            Context::Allocation => ALLOCATION.to_string(),
            Context::Dirty(i) => format!("{DIRTY_PREFIX}{}", export.bitmaps[i].0),
        }
    }
}

/// Every context the export offers.
pub fn all(export: &Export) -> Vec<Context> {
    let mut v = vec![Context::Allocation];
    v.extend((0..export.bitmaps.len()).map(Context::Dirty));
    v
}

/// What a `LIST_META_CONTEXT` query matches (wildcards by namespace allowed).
pub fn list_matches(export: &Export, query: &str) -> Vec<Context> {
    all(export)
        .into_iter()
        .filter(|c| {
            let name = c.name(export);
            name == query
                || (query.ends_with(':') && name.starts_with(query))
                || (query == DIRTY_PREFIX && name.starts_with(DIRTY_PREFIX))
        })
        .collect()
}

/// What a `SET_META_CONTEXT` query selects: an exact name, or nothing.
pub fn set_match(export: &Export, query: &str) -> Option<Context> {
    all(export).into_iter().find(|c| c.name(export) == query)
}

/// The descriptors (length, flags) for `context` from `offset`, covering at least one byte
/// and at most `len` bytes (`len` > 0, inside the disk: the caller checked). Each length is
/// a whole number of `align` bytes except where the disk ends.
pub fn status(
    export: &Export,
    context: Context,
    offset: u64,
    len: u64,
    align: u64,
) -> Vec<(u32, u32)> {
    // u32 lengths: keep each descriptor below 4 GiB, on the alignment.
    let cap = u64::from(u32::MAX) / align * align;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let push = |len: u64, flags: u32, out: &mut Vec<(u32, u32)>| {
        let mut left = len;
        while left > 0 {
            let n = left.min(cap);
            match out.last_mut() {
                Some((l, f)) if *f == flags && u64::from(*l) + n <= cap => *l += n as u32,
                _ => out.push((n as u32, flags)),
            }
            left -= n;
        }
    };
    match context {
        Context::Allocation => {
            let runs = export.disk.extents(offset, len, MAX_DESCRIPTORS);
            for e in runs {
                let flags =
                    if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
                push(e.len, flags, &mut out);
                if out.len() >= MAX_DESCRIPTORS {
                    break;
                }
            }
        }
        Context::Dirty(i) => {
            let map = &export.bitmaps[i].1;
            let end = offset + len;
            let mut pos = offset;
            while pos < end && out.len() < MAX_DESCRIPTORS {
                let (dirty, run_end) = map.run(pos, end);
                push(run_end - pos, if dirty { STATE_DIRTY } else { 0 }, &mut out);
                pos = run_end;
            }
        }
    }
    out
}
