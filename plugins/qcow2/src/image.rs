//! An open qcow2 image: the L1 -> L2 -> data walk for reads, cluster allocation with
//! refcount updates and copy-on-write for writes, zero clusters for discard/write-zeroes.
//!
//! Locking: `meta` is a `RwLock`. Reads take it shared (so parallel reads of allocated
//! clusters only meet at the short L2-cache mutex); writes, discards and allocation take it
//! exclusive.
//!
//! Crash ordering (allocation): a new cluster's refcount is written *before* anything points
//! at it (data, then the L2 entry, then for a new L2 table the L1 entry), and when a cluster
//! is freed the pointer to it is cleared *before* its refcount drops. A crash between the
//! steps therefore leaves at worst a leaked cluster (refcount 1, unreferenced), never a
//! referenced cluster with refcount 0. The steps are ordered `pwrite`s, which survive a
//! killed process in the page cache; `flush` (fsync) makes them durable across power loss.

use crate::backing::{io_err, Backing};
use crate::compressed::inflate_cluster;
use crate::header::{self, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::l1l2::{self, decode_l2, l1_to_l2_offset, Mapping, COPIED, ZERO};
use crate::refcount;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use xen_disk_plugin_api::{Error, Result};

const L2_CACHE_TABLES: usize = 1024;
const REFBLOCK_CACHE: usize = 64;
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

struct Meta {
    l1: Vec<u64>,
    reftable: Vec<u64>,
    refblocks: HashMap<u64, Vec<u8>>,
    next_free: u64,
    file_len: u64,
}

/// An open qcow2 image.
pub struct Image {
    name: String,
    file: File,
    hdr: Header,
    cs: u64,
    readonly: bool,
    backing: Option<Backing>,
    meta: RwLock<Meta>,
    l2_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

fn lock_err() -> Error {
    Error::msg("qcow2: a lock was poisoned by an earlier panic")
}

impl Image {
    /// Opens `path`; `chain` holds the canonical paths of the images above it (loop check).
    pub fn open(path: &Path, readonly: bool, chain: &[PathBuf]) -> Result<Image> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let mut first = vec![0u8; file_len.min(2 << 20) as usize];
        file.read_exact_at(&mut first, 0)
            .map_err(|e| io_err(path, e))?;
        let hdr = Header::parse(&name, &first, file_len)?;
        let cs = hdr.cluster_size();
        if !readonly {
            let refuse = |why: &str| {
                Err(Error::unsupported(&format!(
                    "{name}: {why}; open it with readonly = true"
                )))
            };
            if hdr.nb_snapshots > 0 {
                return refuse("writing an image with internal snapshots is not supported");
            }
            if hdr.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return refuse("the image is marked corrupt (run qemu-img check -r all)");
            }
            if hdr.incompatible_features & INCOMPAT_DIRTY != 0 {
                return refuse("the image is dirty and its refcounts must be rebuilt (run qemu-img check -r all)");
            }
        }
        let mut l1b = vec![0u8; hdr.l1_size as usize * 8];
        file.read_exact_at(&mut l1b, hdr.l1_table_offset)
            .map_err(|e| io_err(path, e))?;
        let l1 = l1b
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let mut rtb = vec![0u8; (u64::from(hdr.refcount_table_clusters) * cs) as usize];
        file.read_exact_at(&mut rtb, hdr.refcount_table_offset)
            .map_err(|e| io_err(path, e))?;
        let reftable = rtb
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        if !readonly && hdr.autoclear_features != 0 {
            // We keep no bitmaps up to date: clearing autoclear bits tells others so.
            file.write_all_at(&[0u8; 8], 88)
                .map_err(|e| io_err(path, e))?;
        }
        let backing = match &hdr.backing_file {
            Some(b) => {
                let mut chain = chain.to_vec();
                if chain.is_empty() {
                    chain.push(path.canonicalize().map_err(|e| io_err(path, e))?);
                }
                Some(Backing::open(
                    path,
                    b,
                    hdr.backing_format.as_deref(),
                    &chain,
                )?)
            }
            None => None,
        };
        Ok(Image {
            name,
            file,
            cs,
            readonly,
            backing,
            meta: RwLock::new(Meta {
                l1,
                reftable,
                refblocks: HashMap::new(),
                next_free: file_len.div_ceil(cs) * cs,
                file_len,
            }),
            l2_cache: Mutex::new(HashMap::new()),
            hdr,
        })
    }

    pub fn size(&self) -> u64 {
        self.hdr.size
    }

    pub fn header(&self) -> &Header {
        &self.hdr
    }

    fn ioerr(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(
            e.raw_os_error().unwrap_or(5),
            format!("{}: {what}: {e}", self.name),
        )
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.hdr.size) {
            return Err(Error::new(
                xen_disk_plugin_api::ErrorKind::OutOfRange,
                format!(
                    "{}: request {offset}+{len} is past the end ({} bytes)",
                    self.name, self.hdr.size
                ),
            ));
        }
        Ok(())
    }

    fn l2_table(&self, m: &Meta, off: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2_cache.lock().map_err(|_| lock_err())?.get(&off) {
            return Ok(t.clone());
        }
        let mut b = vec![0u8; self.cs as usize];
        if off + self.cs > m.file_len {
            return Err(Error::corrupt(format!(
                "{}: L2 table at {off:#x} is outside the file",
                self.name
            )));
        }
        self.file
            .read_exact_at(&mut b, off)
            .map_err(|e| self.ioerr("read L2 table", e))?;
        let t: Arc<Vec<u64>> = Arc::new(
            b.chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        );
        let mut cache = self.l2_cache.lock().map_err(|_| lock_err())?;
        if cache.len() >= L2_CACHE_TABLES {
            cache.clear();
        }
        cache.insert(off, t.clone());
        Ok(t)
    }

    /// The L2 table offset and entry index for guest cluster `vcl` (offset 0: no table).
    fn l2_slot(&self, m: &Meta, vcl: u64) -> Result<(usize, u64, usize)> {
        let l2_bits = self.hdr.cluster_bits - 3;
        let l1i = (vcl >> l2_bits) as usize;
        let e = *m
            .l1
            .get(l1i)
            .ok_or_else(|| Error::corrupt(format!("{}: L1 index {l1i} out of range", self.name)))?;
        let l2 = l1_to_l2_offset(&self.name, e, self.cs, m.file_len)?;
        Ok((l1i, l2, (vcl & ((1 << l2_bits) - 1)) as usize))
    }

    fn lookup(&self, m: &Meta, vcl: u64) -> Result<Mapping> {
        let (_, l2, i) = self.l2_slot(m, vcl)?;
        if l2 == 0 {
            return Ok(Mapping::Unallocated);
        }
        let e = self.l2_table(m, l2)?[i];
        let map = decode_l2(&self.name, e, self.hdr.cluster_bits, self.hdr.version)?;
        match map {
            Mapping::Data { host } | Mapping::Zero { host }
                if host != 0 && host + self.cs > m.file_len.div_ceil(self.cs) * self.cs =>
            {
                Err(Error::corrupt(format!(
                    "{}: data cluster {host:#x} is outside the file",
                    self.name
                )))
            }
            Mapping::Compressed { host, .. } if host >= m.file_len => Err(Error::corrupt(format!(
                "{}: compressed cluster {host:#x} is outside the file",
                self.name
            ))),
            _ => Ok(map),
        }
    }

    fn read_compressed(&self, m: &Meta, host: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let len = len.min(m.file_len - host) as usize;
        let mut data = vec![0u8; len];
        self.file
            .read_exact_at(&mut data, host)
            .map_err(|e| self.ioerr("read compressed cluster", e))?;
        inflate_cluster(&self.name, host, &data, out)
    }

    /// Reads the whole of guest cluster `vcl` as it currently reads (for copy-on-write).
    fn read_cluster(&self, m: &Meta, vcl: u64, map: Mapping, out: &mut [u8]) -> Result<()> {
        match map {
            Mapping::Unallocated => match &self.backing {
                Some(b) => b.read_at(vcl * self.cs, out),
                None => {
                    out.fill(0);
                    Ok(())
                }
            },
            Mapping::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            Mapping::Data { host } => self
                .file
                .read_exact_at(out, host)
                .map_err(|e| self.ioerr("read", e)),
            Mapping::Compressed { host, len } => self.read_compressed(m, host, len, out),
        }
    }

    /// Reads `buf.len()` guest bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let m = self.meta.read().map_err(|_| lock_err())?;
        let mut done = 0usize;
        let mut scratch = Vec::new();
        while done < buf.len() {
            let pos = offset + done as u64;
            let vcl = pos / self.cs;
            let in_cl = pos % self.cs;
            let n = ((self.cs - in_cl) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.lookup(&m, vcl)? {
                Mapping::Data { host } => self
                    .file
                    .read_exact_at(out, host + in_cl)
                    .map_err(|e| self.ioerr("read", e))?,
                Mapping::Zero { .. } => out.fill(0),
                Mapping::Unallocated => match &self.backing {
                    Some(b) => b.read_at(pos, out)?,
                    None => out.fill(0),
                },
                Mapping::Compressed { host, len } => {
                    scratch.resize(self.cs as usize, 0);
                    self.read_compressed(&m, host, len, &mut scratch)?;
                    out.copy_from_slice(&scratch[in_cl as usize..in_cl as usize + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn refblock_geometry(&self) -> (u32, u64) {
        let bits = 1u32 << self.hdr.refcount_order;
        (bits, self.cs * 8 / u64::from(bits))
    }

    fn refblock<'m>(&self, m: &'m mut Meta, off: u64) -> Result<&'m mut Vec<u8>> {
        if !m.refblocks.contains_key(&off) {
            if !off.is_multiple_of(self.cs) || off + self.cs > m.next_free {
                return Err(Error::corrupt(format!(
                    "{}: refcount block at {off:#x} unaligned or outside the file",
                    self.name
                )));
            }
            let mut b = vec![0u8; self.cs as usize];
            self.file
                .read_exact_at(&mut b, off)
                .map_err(|e| self.ioerr("read refcount block", e))?;
            if m.refblocks.len() >= REFBLOCK_CACHE {
                m.refblocks.clear();
            }
            m.refblocks.insert(off, b);
        }
        m.refblocks.get_mut(&off).ok_or_else(lock_err)
    }

    fn get_refcount(&self, m: &mut Meta, host: u64) -> Result<u64> {
        let (bits, per) = self.refblock_geometry();
        let ci = host / self.cs;
        let ti = (ci / per) as usize;
        let Some(&rte) = m.reftable.get(ti) else {
            return Ok(0);
        };
        let off = rte & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        Ok(refcount::get(
            self.refblock(m, off)?,
            bits,
            (ci % per) as usize,
        ))
    }

    fn set_refcount(&self, m: &mut Meta, host: u64, value: u64) -> Result<()> {
        let (bits, per) = self.refblock_geometry();
        if value > refcount::max(bits) {
            return Err(Error::msg(format!(
                "{}: refcount of {host:#x} would overflow",
                self.name
            )));
        }
        let ci = host / self.cs;
        let ti = (ci / per) as usize;
        if ti >= m.reftable.len() {
            return Err(Error::unsupported(&format!(
                "{}: the refcount table is full (growing it is not supported)",
                self.name
            )));
        }
        let mut off = m.reftable[ti] & REFTABLE_OFFSET_MASK;
        if off == 0 {
            // A new refcount block at the end of the file; it describes itself when it falls
            // in its own range, otherwise its own refcount is set after it is hooked in.
            off = m.next_free;
            m.next_free += self.cs;
            m.file_len = m.file_len.max(m.next_free);
            let mut b = vec![0u8; self.cs as usize];
            let self_covered = (off / self.cs) / per == ti as u64;
            if self_covered {
                refcount::set(&mut b, bits, ((off / self.cs) % per) as usize, 1);
            }
            self.file
                .write_all_at(&b, off)
                .map_err(|e| self.ioerr("write refcount block", e))?;
            self.file
                .write_all_at(
                    &off.to_be_bytes(),
                    self.hdr.refcount_table_offset + ti as u64 * 8,
                )
                .map_err(|e| self.ioerr("write refcount table", e))?;
            m.reftable[ti] = off;
            m.refblocks.insert(off, b);
            if !self_covered {
                self.set_refcount(m, off, 1)?;
            }
        }
        let idx = (ci % per) as usize;
        let b = self.refblock(m, off)?;
        let r = refcount::set(b, bits, idx, value);
        let bytes = b[r.clone()].to_vec();
        self.file
            .write_all_at(&bytes, off + r.start as u64)
            .map_err(|e| self.ioerr("write refcount block", e))
    }

    fn decref(&self, m: &mut Meta, host: u64) -> Result<()> {
        let r = self.get_refcount(m, host)?;
        if r == 0 {
            return Err(Error::corrupt(format!(
                "{}: freeing cluster {host:#x} whose refcount is already 0",
                self.name
            )));
        }
        self.set_refcount(m, host, r - 1)
    }

    /// Allocates one cluster at the end of the file, refcount written first.
    fn alloc(&self, m: &mut Meta) -> Result<u64> {
        let host = m.next_free;
        m.next_free += self.cs;
        m.file_len = m.file_len.max(m.next_free);
        self.set_refcount(m, host, 1)?;
        Ok(host)
    }

    /// Frees whatever `map` holds on the host (called after the pointer to it is gone).
    fn release(&self, m: &mut Meta, map: Mapping) -> Result<()> {
        match map {
            Mapping::Data { host } | Mapping::Zero { host } if host != 0 => self.decref(m, host),
            Mapping::Compressed { host, len } => {
                let first = host / self.cs;
                let last = (host + len - 1).min(m.file_len.saturating_sub(1)) / self.cs;
                for c in first..=last.max(first) {
                    self.decref(m, c * self.cs)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The L2 table for `vcl`, allocating (refcount, zeroed table, then L1 entry) if needed.
    fn ensure_l2(&self, m: &mut Meta, vcl: u64) -> Result<(u64, usize)> {
        let (l1i, l2, i) = self.l2_slot(m, vcl)?;
        if l2 != 0 {
            return Ok((l2, i));
        }
        let new = self.alloc(m)?;
        self.file
            .write_all_at(&vec![0u8; self.cs as usize], new)
            .map_err(|e| self.ioerr("write L2 table", e))?;
        let e = new | COPIED;
        self.file
            .write_all_at(&e.to_be_bytes(), self.hdr.l1_table_offset + l1i as u64 * 8)
            .map_err(|e| self.ioerr("write L1 table", e))?;
        m.l1[l1i] = e;
        Ok((new, i))
    }

    fn set_l2(&self, l2: u64, i: usize, entry: u64) -> Result<()> {
        self.file
            .write_all_at(&entry.to_be_bytes(), l2 + i as u64 * 8)
            .map_err(|e| self.ioerr("write L2 table", e))?;
        if let Some(t) = self.l2_cache.lock().map_err(|_| lock_err())?.get_mut(&l2) {
            Arc::make_mut(t)[i] = entry;
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.readonly {
            return Err(Error::new(
                xen_disk_plugin_api::ErrorKind::ReadOnly,
                format!("{}: opened read-only", self.name),
            ));
        }
        Ok(())
    }

    /// Writes `data` at guest `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.writable()?;
        self.check_range(offset, data.len() as u64)?;
        let mut m = self.meta.write().map_err(|_| lock_err())?;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let vcl = pos / self.cs;
            let in_cl = pos % self.cs;
            let n = ((self.cs - in_cl) as usize).min(data.len() - done);
            self.write_in_cluster(&mut m, vcl, in_cl, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn write_in_cluster(&self, m: &mut Meta, vcl: u64, in_cl: u64, data: &[u8]) -> Result<()> {
        let map = self.lookup(m, vcl)?;
        if let Mapping::Data { host } = map {
            return self
                .file
                .write_all_at(data, host + in_cl)
                .map_err(|e| self.ioerr("write", e));
        }
        // Copy-on-write: build the whole new cluster (unless the write covers it), then
        // point at it.
        let mut whole = Vec::new();
        let buf: &[u8] = if data.len() as u64 == self.cs {
            data
        } else {
            whole.resize(self.cs as usize, 0);
            self.read_cluster(m, vcl, map, &mut whole)?;
            whole[in_cl as usize..in_cl as usize + data.len()].copy_from_slice(data);
            &whole
        };
        let (l2, i) = self.ensure_l2(m, vcl)?;
        if let Mapping::Zero { host } = map {
            if host != 0 {
                // Preallocated zero cluster: reuse its host cluster in place.
                self.file
                    .write_all_at(buf, host)
                    .map_err(|e| self.ioerr("write", e))?;
                return self.set_l2(l2, i, host | COPIED);
            }
        }
        let host = self.alloc(m)?;
        self.file
            .write_all_at(buf, host)
            .map_err(|e| self.ioerr("write", e))?;
        self.set_l2(l2, i, host | COPIED)?;
        self.release(m, map)
    }

    /// Makes `[offset, offset+len)` read as zeroes. Whole clusters become zero clusters (v3)
    /// and their host clusters are freed; `discard` leaves partial clusters (and v2 images,
    /// which have no zero flag) alone, `write_zeroes` writes zeroes there.
    pub fn zero_range(&self, offset: u64, len: u64, discard: bool) -> Result<()> {
        self.writable()?;
        self.check_range(offset, len)?;
        let mut m = self.meta.write().map_err(|_| lock_err())?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let vcl = pos / self.cs;
            let in_cl = pos % self.cs;
            let n = (self.cs - in_cl).min(end - pos);
            if n == self.cs && self.hdr.version >= 3 {
                let map = self.lookup(&m, vcl)?;
                // Already zero, or unallocated with nothing below and no L2 table to touch.
                let already_zero = map == (Mapping::Zero { host: 0 })
                    || (map == Mapping::Unallocated
                        && self.backing.is_none()
                        && self.l2_slot(&m, vcl)?.1 == 0);
                if !already_zero {
                    let (l2, i) = self.ensure_l2(&mut m, vcl)?;
                    self.set_l2(l2, i, ZERO)?;
                    self.release(&mut m, map)?;
                }
            } else if !discard {
                self.write_in_cluster(&mut m, vcl, in_cl, &vec![0u8; n as usize])?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        let _m = self.meta.write().map_err(|_| lock_err())?;
        self.file.sync_all().map_err(|e| self.ioerr("fsync", e))
    }
}

/// Creates a new, empty v3 image (16-bit refcounts, lazy refcounts off).
pub fn create(
    path: &Path,
    size: u64,
    cluster_size: u64,
    backing: Option<(&str, &str)>,
) -> Result<()> {
    let name = path.display().to_string();
    if !cluster_size.is_power_of_two() || !(4096..=2 << 20).contains(&cluster_size) {
        return Err(Error::config(
            "cluster-size",
            format!("{cluster_size} is not a power of two in 4K..2M"),
        ));
    }
    if size == 0 || size > header::MAX_SIZE {
        return Err(Error::config(
            "size",
            format!("{size} is 0 or above {}", header::MAX_SIZE),
        ));
    }
    let cs = cluster_size;
    let bits = cs.trailing_zeros();
    let l1_size = size.div_ceil(cs * (cs / 8));
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let per_block = cs * 8 / 16;
    // Enough refcount blocks for every data cluster, its L2 tables and copy-on-write slack.
    let est_clusters = 2 * (size.div_ceil(cs) + l1_size) + 64;
    let rt_clusters = (est_clusters.div_ceil(per_block) * 8).div_ceil(cs).max(1);
    if l1_size * 8 > header::MAX_L1_BYTES || rt_clusters * cs > header::MAX_REFTABLE_BYTES {
        return Err(Error::config(
            "size",
            format!("{size} is too large for cluster-size {cs}"),
        ));
    }
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + cs;
    let meta_clusters = l1_off / cs + l1_clusters;
    if meta_clusters > per_block {
        return Err(Error::config(
            "size",
            format!("{size} is too large for cluster-size {cs}"),
        ));
    }
    let hdr = header::encode_v3(
        bits,
        size,
        l1_size as u32,
        l1_off,
        rt_off,
        rt_clusters as u32,
        backing,
    );
    if hdr.len() as u64 > cs {
        return Err(Error::config("backing", "backing file name too long"));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let w = |b: &[u8], off: u64| {
        file.write_all_at(b, off).map_err(|e| {
            Error::io(
                e.raw_os_error().unwrap_or(5),
                format!("{name}: create: {e}"),
            )
        })
    };
    let mut rb = vec![0u8; cs as usize];
    for c in 0..meta_clusters as usize {
        refcount::set(&mut rb, 16, c, 1);
    }
    w(&rb, rb_off)?;
    w(&rb_off.to_be_bytes(), rt_off)?;
    w(&vec![0u8; (l1_clusters * cs) as usize], l1_off)?;
    w(&hdr, 0)?;
    file.set_len(l1_off + l1_clusters * cs)
        .map_err(|e| io_err(path, e))?;
    file.sync_all().map_err(|e| io_err(path, e))?;
    let _ = l1l2::OFFSET_MASK;
    Ok(())
}
