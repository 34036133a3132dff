//! Rebuilding the refcounts of a dirty image.
//!
//! A v3 image with lazy refcounts carries the dirty bit while refcount updates are still
//! pending; after a crash its refcounts may be too low, and the spec requires a scan of the
//! L1/L2 tables before the image is written again (what `qemu-img check -r all` does). The
//! scan here counts every cluster the image references (the header, the L1 table, each L2
//! table, data and compressed clusters), writes a complete new refcount table and the blocks
//! that count something past the end of the file, syncs them, and only then points the header at them and clears the
//! dirty bit. A crash before the header write leaves the dirty image as it was; after it, the
//! new table is already complete. The old refcount structures are simply no longer referenced
//! (free space, not leaks).
//!
//! Images with internal snapshots are never written, so they are never repaired.

use crate::header::{Header, INCOMPAT_DIRTY};
use crate::l1l2::{self, Mapping};
use crate::refcount;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use xen_disk_plugin_api::{Error, Result};

/// Counts per host cluster, and which clusters are used as plain (never shared) clusters.
struct Census {
    cs: u64,
    file_len: u64,
    counts: HashMap<u64, u64>,
    plain: std::collections::HashSet<u64>,
}

impl Census {
    /// Counts the clusters under `[off, off + len)`. `plain` clusters (tables and data) may be
    /// referenced once only; compressed streams may share a cluster.
    fn add(&mut self, name: &str, what: &str, off: u64, len: u64, plain: bool) -> Result<()> {
        // A compressed stream's length may run up to a sector past its data.
        let slack = if plain { 0 } else { self.cs };
        let end = off
            .checked_add(len)
            .filter(|&e| e <= self.file_len + slack)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "{name}: {what} at {off:#x} ({len} bytes) lies outside the file ({} bytes)",
                    self.file_len
                ))
            })?;
        for c in off / self.cs..end.div_ceil(self.cs) {
            let n = self.counts.entry(c).or_insert(0);
            if *n > 0 && (plain || self.plain.contains(&c)) {
                return Err(Error::corrupt(format!(
                    "{name}: host cluster at {:#x} is referenced twice ({what}); repair it with qemu-img check -r all",
                    c * self.cs
                )));
            }
            *n += 1;
            if plain {
                self.plain.insert(c);
            }
        }
        Ok(())
    }
}

/// Rebuilds the refcounts of the dirty image open in `file` (writable) and clears its dirty
/// bit. `first` is the start of the file the header was parsed from.
pub fn rebuild_refcounts(
    name: &str,
    file: &File,
    hdr: &Header,
    first: &[u8],
    file_len: u64,
) -> Result<()> {
    let cs = hdr.cluster_size();
    let ioerr = |what: &str, e: std::io::Error| {
        Error::io(
            e.raw_os_error().unwrap_or(5),
            format!("{name}: rebuilding refcounts: {what}: {e}"),
        )
    };
    let mut c = Census {
        cs,
        file_len,
        counts: HashMap::new(),
        plain: Default::default(),
    };
    // The header cluster(s), with the extensions and the backing file name.
    let be = |at: usize, n: usize| {
        first
            .get(at..at + n)
            .map_or(0, |b| b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
    };
    let backing_end = be(8, 8).saturating_add(be(16, 4));
    let header_end = u64::from(hdr.header_length)
        .max(backing_end)
        .max(1)
        .min(file_len);
    c.add(name, "header", 0, header_end, true)?;
    if hdr.l1_size > 0 {
        c.add(
            name,
            "L1 table",
            hdr.l1_table_offset,
            u64::from(hdr.l1_size) * 8,
            true,
        )?;
    }
    let mut l1b = vec![0u8; hdr.l1_size as usize * 8];
    file.read_exact_at(&mut l1b, hdr.l1_table_offset)
        .map_err(|e| ioerr("L1 table", e))?;
    let mut l2b = vec![0u8; cs as usize];
    for e in l1b.chunks_exact(8) {
        let entry = u64::from_be_bytes(e.try_into().unwrap_or([0; 8]));
        let l2 = l1l2::l1_to_l2_offset(name, entry, cs, file_len)?;
        if l2 == 0 {
            continue;
        }
        c.add(name, "L2 table", l2, cs, true)?;
        file.read_exact_at(&mut l2b, l2)
            .map_err(|e| ioerr("L2 table", e))?;
        for e in l2b.chunks_exact(8) {
            let entry = u64::from_be_bytes(e.try_into().unwrap_or([0; 8]));
            match l1l2::decode_l2(name, entry, hdr.cluster_bits, hdr.version)? {
                Mapping::Data { host } | Mapping::Zero { host } if host != 0 => {
                    c.add(name, "data cluster", host, cs, true)?
                }
                Mapping::Compressed { host, len } => {
                    c.add(name, "compressed cluster", host, len, false)?
                }
                _ => {}
            }
        }
    }

    // Lay the new table out past everything: the file's end and every referenced cluster.
    // Only refcount blocks that count something are written (a sparse file may be huge and
    // mostly unreferenced); the table covers up to the last of them.
    let bits = 1u32 << hdr.refcount_order;
    let per_block = cs * 8 / u64::from(bits);
    let start = c
        .counts
        .keys()
        .max()
        .map_or(0, |&m| m + 1)
        .max(file_len.div_ceil(cs));
    let used: std::collections::BTreeSet<u64> = c.counts.keys().map(|k| k / per_block).collect();
    let (mut blocks, mut table) = (0u64, 1u64);
    let mut indices;
    loop {
        // The new blocks and table are clusters start .. start + blocks + table.
        let end = start + blocks + table;
        indices = used.clone();
        indices.extend(start / per_block..=(end - 1) / per_block);
        let need_blocks = indices.len() as u64;
        let last = indices.last().copied().unwrap_or(0);
        let need_table = ((last + 1) * 8).div_ceil(cs);
        if need_blocks == blocks && need_table == table {
            break;
        }
        (blocks, table) = (need_blocks, need_table);
    }
    if table * cs > crate::header::MAX_REFTABLE_BYTES {
        return Err(Error::corrupt(format!(
            "{name}: rebuilding refcounts needs a {} byte table, over the limit",
            table * cs
        )));
    }
    for k in start..start + blocks + table {
        c.counts.insert(k, 1);
    }
    let max = refcount::max(bits);
    // Block index -> where it goes and its bytes.
    let slot: HashMap<u64, u64> = indices
        .iter()
        .enumerate()
        .map(|(i, &b)| (b, i as u64))
        .collect();
    let mut rb = vec![0u8; (blocks * cs) as usize];
    for (&k, &n) in &c.counts {
        if n > max {
            return Err(Error::corrupt(format!(
                "{name}: host cluster at {:#x} has {n} references, more than {bits}-bit refcounts hold",
                k * cs
            )));
        }
        let at = slot[&(k / per_block)] as usize * cs as usize;
        refcount::set(
            &mut rb[at..at + cs as usize],
            bits,
            (k % per_block) as usize,
            n,
        );
    }
    let mut rt = vec![0u8; (table * cs) as usize];
    for (&b, &i) in &slot {
        let at = (start + i) * cs;
        rt[b as usize * 8..b as usize * 8 + 8].copy_from_slice(&at.to_be_bytes());
    }
    file.write_all_at(&rb, start * cs)
        .map_err(|e| ioerr("write refcount blocks", e))?;
    file.write_all_at(&rt, (start + blocks) * cs)
        .map_err(|e| ioerr("write refcount table", e))?;
    file.sync_data().map_err(|e| ioerr("fdatasync", e))?;
    // Then the header: table offset and size (bytes 48..60), and the dirty bit (72..80).
    let mut h = [0u8; 32];
    file.read_exact_at(&mut h, 48)
        .map_err(|e| ioerr("read header", e))?;
    h[0..8].copy_from_slice(&((start + blocks) * cs).to_be_bytes());
    h[8..12].copy_from_slice(&(table as u32).to_be_bytes());
    let incompat = u64::from_be_bytes(h[24..32].try_into().unwrap_or([0; 8])) & !INCOMPAT_DIRTY;
    h[24..32].copy_from_slice(&incompat.to_be_bytes());
    file.write_all_at(&h, 48)
        .map_err(|e| ioerr("write header", e))?;
    file.sync_data().map_err(|e| ioerr("fdatasync", e))
}
