//! An open qcow2 image: the L1 -> L2 -> data walk for reads, cluster allocation with
//! refcount updates and copy-on-write for writes, zero clusters for discard/write-zeroes.
//!
//! # Locking
//!
//! `meta` is a `RwLock`. Reads take it shared, so parallel reads of allocated clusters only
//! meet at the L2-cache `RwLock` (itself taken shared on a hit) and then `pread` in
//! parallel. Writes that land entirely in allocated data clusters change no metadata and
//! also take it shared; writes that allocate, discards and metadata writeback (flush) take
//! it exclusive. The disk is therefore declared
//! [`ThreadModel::Parallel`](xen_disk_plugin_api::ThreadModel).
//!
//! # Allocation
//!
//! A write is cut into runs: clusters already mapped to contiguous host clusters are
//! written in place with one `pwrite`; consecutive clusters that need a new host cluster
//! (unallocated, zero without a host cluster, compressed) get one contiguous range at the
//! end of the file, filled with one `pwrite` (copy-on-write of a partial first/last cluster
//! is assembled in memory). L2 tables a run needs are allocated before the run, so the data
//! stays contiguous.
//!
//! # Crash safety (power loss)
//!
//! Metadata is a write-back cache: refcount blocks, L2 tables, L1 entries and refcount
//! table entries changed by writes are kept dirty in memory and written at [`Image::flush`]
//! (or when the dirty set grows past a bound, or on close), in this order:
//!
//! 1. refcount blocks (and new L2 tables, and a grown refcount table, none of which anything
//!    on disk points at yet); the guest data was already written by the write itself;
//! 2. `fdatasync`, then, only if refcount blocks were added or the table grew, the refcount
//!    table entries or the header's refcount-table fields, and another `fdatasync`;
//! 3. `fdatasync` (barrier), then L2 tables that already existed and L1 entries;
//! 4. `fdatasync`; only now may clusters whose last reference was removed (discard, or a
//!    compressed cluster rewritten) have their refcounts decremented, in memory, to be
//!    written by the next writeback.
//!
//! This is the "refcounts first" order: at every instant the on-disk image only has
//! pointers to clusters whose refcount and contents are durable, so a power loss leaves at
//! worst leaked clusters (refcount 1, unreferenced; `qemu-img check` reports leaks, exit
//! 3, never corruption) and loses writes the guest had not flushed. It was chosen over
//! data -> L2 -> refcount with the v3 dirty bit (lazy refcounts) because it keeps the image
//! consistent for QEMU and for v2 images without a refcount rebuild after a crash, and
//! because batching makes its cost small: no `fdatasync` at all per write or allocation
//! batch, and two per flush when metadata changed (one when only data changed; three when
//! refcount blocks were added). Clusters are never reused (allocation is always at the end
//! of the file), so a deferred decrement can never free a cluster still being written.
//!
//! Every write and sync goes through [`Image::record_io`]'s optional log so tests can
//! replay prefixes and subsets of the writes between syncs, as a power loss would leave.

use crate::backing::{io_err, Backing};
use crate::compressed::inflate_cluster;
use crate::header::{self, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::l1l2::{self, decode_l2, l1_to_l2_offset, Mapping, COPIED, ZERO};
use crate::redo::{self, POINTERS, REFCOUNTS, TABLE};
use crate::refcount;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use xen_disk_plugin_api::crash_log::{self, CrashLog, Record};
use xen_disk_plugin_api::{Error, Extent, Result};

const L2_CACHE_TABLES: usize = 1024;
const REFBLOCK_CACHE: usize = 256;
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;
/// Dirty metadata (L2 tables and refcount blocks, in bytes) that triggers a writeback.
const DIRTY_LIMIT: u64 = 32 << 20;
/// Deferred refcount decrements that trigger a writeback.
const PENDING_FREE_LIMIT: usize = 1 << 16;

/// One I/O an image did on its file, as recorded by [`Image::record_io`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoEvent {
    /// `pwrite` of `data` at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// `fdatasync`: every earlier write is durable.
    Sync,
}

/// A shared log of [`IoEvent`]s.
pub type IoLog = Arc<Mutex<Vec<IoEvent>>>;

struct Meta {
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    reftable: Vec<u64>,
    rt_off: u64,
    rt_clusters: u64,
    /// Reftable entries for new refcount blocks, not yet written.
    rt_dirty: BTreeSet<usize>,
    /// The table grew: the on-disk table (offset, clusters) the header still names.
    rt_moved_from: Option<(u64, u64)>,
    refblocks: HashMap<u64, Vec<u8>>,
    rb_dirty: BTreeSet<u64>,
    /// Dirty L2 tables (authoritative over the cache and the file).
    l2_dirty: BTreeMap<u64, Vec<u64>>,
    /// L2 tables allocated since the last writeback (no L1 entry on disk yet).
    l2_new: BTreeSet<u64>,
    /// Host clusters to decref once the removal of the pointer to them is durable.
    pending_free: Vec<u64>,
    next_free: u64,
    file_len: u64,
    /// Changes not yet in the crash log (only with one): appended before a request is answered.
    redo: Vec<Record>,
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
    l2_cache: RwLock<HashMap<u64, Arc<Vec<u64>>>>,
    io_log: OnceLock<IoLog>,
    /// Where metadata changes go until written back, when the host keeps state across
    /// crashes (see [`crate::redo`]).
    crash_log: Option<CrashLog>,
}

/// Clusters looked at per block status call; the host asks again for the rest.
pub const MAX_STATUS_CLUSTERS: u64 = 1 << 16;

fn lock_err() -> Error {
    Error::msg("qcow2: a lock was poisoned by an earlier panic")
}

fn be64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

fn to_be(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Whether writing to a cluster mapped as `m` needs a new host cluster.
fn needs_alloc(m: Mapping) -> bool {
    match m {
        Mapping::Data { .. } => false,
        Mapping::Zero { host } => host == 0,
        Mapping::Unallocated | Mapping::Compressed { .. } => true,
    }
}

impl Image {
    /// Opens `path`; `chain` holds the canonical paths of the images above it (loop check).
    /// Written images keep a crash log under the host's state dir, if it has one.
    pub fn open(path: &Path, readonly: bool, chain: &[PathBuf]) -> Result<Image> {
        Image::open_logged(path, readonly, chain, crash_log::state_dir().as_deref())
    }

    /// [`Image::open`] with the crash log under `log_dir` (none: no log).
    pub fn open_logged(
        path: &Path,
        readonly: bool,
        chain: &[PathBuf],
        log_dir: Option<&Path>,
    ) -> Result<Image> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|e| {
                let e = io_err(path, e);
                if readonly {
                    e
                } else {
                    e.read_only_hint("readonly=true")
                }
            })?;
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
                // Lazy refcounts after a crash: rebuilt from the L1/L2 tables, as the spec
                // asks before any write, then the image is opened afresh.
                crate::repair::rebuild_refcounts(&name, &file, &hdr, &first, file_len)?;
                drop(file);
                return Image::open_logged(path, readonly, chain, log_dir);
            }
        }
        let crash_log = match log_dir {
            Some(dir) if !readonly => {
                let Some((log, left)) = CrashLog::open_or_warn(dir, "qcow2", &file, &name)? else {
                    return Image::open_logged(path, readonly, chain, None);
                };
                if !left.is_empty() {
                    // A process died with metadata not yet written back: write it, then
                    // open afresh from what the file now says.
                    let log_name = log.path().display().to_string();
                    redo::check(&name, &log_name, &hdr, file_len, &left)?;
                    redo::apply(&file, &name, &left)?;
                    log.clear()?;
                    drop((log, file));
                    return Image::open_logged(path, readonly, chain, log_dir);
                }
                Some(log)
            }
            _ => None,
        };
        let mut l1b = vec![0u8; hdr.l1_size as usize * 8];
        file.read_exact_at(&mut l1b, hdr.l1_table_offset)
            .map_err(|e| io_err(path, e))?;
        let l1 = be64s(&l1b);
        let mut rtb = vec![0u8; (u64::from(hdr.refcount_table_clusters) * cs) as usize];
        file.read_exact_at(&mut rtb, hdr.refcount_table_offset)
            .map_err(|e| io_err(path, e))?;
        let reftable = be64s(&rtb);
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
                l1_dirty: BTreeSet::new(),
                reftable,
                rt_off: hdr.refcount_table_offset,
                rt_clusters: u64::from(hdr.refcount_table_clusters),
                rt_dirty: BTreeSet::new(),
                rt_moved_from: None,
                refblocks: HashMap::new(),
                rb_dirty: BTreeSet::new(),
                l2_dirty: BTreeMap::new(),
                l2_new: BTreeSet::new(),
                pending_free: Vec::new(),
                next_free: file_len.div_ceil(cs) * cs,
                file_len,
                redo: Vec::new(),
            }),
            l2_cache: RwLock::new(HashMap::new()),
            io_log: OnceLock::new(),
            crash_log,
            hdr,
        })
    }

    pub fn size(&self) -> u64 {
        self.hdr.size
    }

    pub fn header(&self) -> &Header {
        &self.hdr
    }

    /// Records every later write and sync of this image's file into `log` (for crash
    /// tests). Only the first call takes effect.
    pub fn record_io(&self, log: IoLog) {
        let _ = self.io_log.set(log);
    }

    fn ioerr(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(
            e.raw_os_error().unwrap_or(5),
            format!("{}: {what}: {e}", self.name),
        )
    }

    fn pwrite(&self, buf: &[u8], off: u64, what: &str) -> Result<()> {
        if let Some(log) = self.io_log.get() {
            if let Ok(mut l) = log.lock() {
                l.push(IoEvent::Write {
                    offset: off,
                    data: buf.to_vec(),
                });
            }
        }
        self.file
            .write_all_at(buf, off)
            .map_err(|e| self.ioerr(what, e))
    }

    fn sync(&self) -> Result<()> {
        if let Some(log) = self.io_log.get() {
            if let Ok(mut l) = log.lock() {
                l.push(IoEvent::Sync);
            }
        }
        self.file
            .sync_data()
            .map_err(|e| self.ioerr("fdatasync", e))
    }

    /// `OutOfRange` unless `[offset, offset+len)` lies inside the virtual disk.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
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

    /// A clean L2 table (from the cache or the file). Callers check `l2_dirty` first.
    fn l2_table(&self, m: &Meta, off: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2_cache.read().map_err(|_| lock_err())?.get(&off) {
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
        let t = Arc::new(be64s(&b));
        let mut cache = self.l2_cache.write().map_err(|_| lock_err())?;
        if cache.len() >= L2_CACHE_TABLES {
            cache.clear();
        }
        cache.insert(off, t.clone());
        Ok(t)
    }

    /// The L1 index, L2 table offset (0: no table) and entry index for guest cluster `vcl`.
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
        let e = match m.l2_dirty.get(&l2) {
            Some(t) => t[i],
            None => self.l2_table(m, l2)?[i],
        };
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

    /// Reads `buf.len()` guest bytes at `offset`. Past the virtual size: an `OutOfRange`
    /// error.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let m = self.meta.read().map_err(|_| lock_err())?;
        let mut done = 0usize;
        let mut scratch = Vec::new();
        while done < buf.len() {
            let pos = offset + done as u64;
            let vcl = pos / self.cs;
            let in_cl = pos % self.cs;
            let mut n = ((self.cs - in_cl) as usize).min(buf.len() - done);
            match self.lookup(&m, vcl)? {
                Mapping::Data { host } => {
                    // Extend over following clusters stored right after this one.
                    let mut next = host + self.cs;
                    while done + n < buf.len()
                        && self.lookup(&m, vcl + (n as u64 + in_cl) / self.cs)?
                            == (Mapping::Data { host: next })
                    {
                        n += (self.cs as usize).min(buf.len() - done - n);
                        next += self.cs;
                    }
                    self.file
                        .read_exact_at(&mut buf[done..done + n], host + in_cl)
                        .map_err(|e| self.ioerr("read", e))?
                }
                map @ (Mapping::Zero { .. } | Mapping::Unallocated) => {
                    // Extend over following clusters that read the same way.
                    let from_backing = map == Mapping::Unallocated && self.backing.is_some();
                    while done + n < buf.len() {
                        let next = self.lookup(&m, vcl + (n as u64 + in_cl) / self.cs)?;
                        let same = match next {
                            Mapping::Unallocated => from_backing || self.backing.is_none(),
                            Mapping::Zero { .. } => !from_backing,
                            _ => false,
                        };
                        if !same {
                            break;
                        }
                        n += (self.cs as usize).min(buf.len() - done - n);
                    }
                    match &self.backing {
                        Some(b) if from_backing => b.read_at(pos, &mut buf[done..done + n])?,
                        _ => buf[done..done + n].fill(0),
                    }
                }
                Mapping::Compressed { host, len } => {
                    scratch.resize(self.cs as usize, 0);
                    self.read_compressed(&m, host, len, &mut scratch)?;
                    buf[done..done + n]
                        .copy_from_slice(&scratch[in_cl as usize..in_cl as usize + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Block status of `[offset, offset + len)` (ABI 1.2), cluster by cluster, at most
    /// [`MAX_STATUS_CLUSTERS`] clusters per call: data and compressed clusters are data,
    /// zero clusters and unallocated ones without a backing file read as zeroes and are
    /// reported as holes (not stored as data), as qemu maps them; unallocated clusters over
    /// a backing file take the backing file's status (a raw backing file is all data).
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let m = self.meta.read().map_err(|_| lock_err())?;
        let mut out: Vec<Extent> = Vec::new();
        let push = |e: Extent, out: &mut Vec<Extent>| match out.last_mut() {
            Some(l) if l.hole == e.hole && l.zero == e.zero => l.len += e.len,
            _ => out.push(e),
        };
        let end = offset + len;
        let mut pos = offset;
        let mut clusters = 0;
        while pos < end && clusters < MAX_STATUS_CLUSTERS {
            let vcl = pos / self.cs;
            let n = ((vcl + 1) * self.cs).min(end) - pos;
            match self.lookup(&m, vcl)? {
                Mapping::Data { .. } | Mapping::Compressed { .. } => {
                    push(Extent::data(n), &mut out)
                }
                Mapping::Zero { .. } => push(Extent::hole(n), &mut out),
                Mapping::Unallocated => match &self.backing {
                    None => push(Extent::hole(n), &mut out),
                    Some(b) => {
                        for e in b.extents(pos, n)? {
                            push(e, &mut out);
                        }
                    }
                },
            }
            pos += n;
            clusters += 1;
        }
        Ok(out)
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
                let dirty = &m.rb_dirty;
                m.refblocks.retain(|k, _| dirty.contains(k));
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

    /// Reserves `n` contiguous clusters at the end of the file (refcounts not yet set).
    fn reserve(&self, m: &mut Meta, n: u64) -> u64 {
        let host = m.next_free;
        m.next_free += n * self.cs;
        m.file_len = m.file_len.max(m.next_free);
        host
    }

    /// Replaces the refcount table by one big enough for reftable index `need`, at the end
    /// of the file. The header keeps naming the old table until the writeback.
    fn grow_reftable(&self, m: &mut Meta, need: usize) -> Result<()> {
        let (_, per) = self.refblock_geometry();
        let entries_per_cluster = self.cs / 8;
        let mut clusters = (m.rt_clusters * 2).max((need as u64 + 1).div_ceil(entries_per_cluster));
        // The new table must also cover itself and the refcount blocks it may need.
        while clusters * entries_per_cluster * per * self.cs
            <= m.next_free + (clusters + 2 * clusters + 4) * self.cs
        {
            clusters *= 2;
        }
        if clusters * self.cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::unsupported(&format!(
                "{}: the refcount table would exceed {} bytes",
                self.name,
                header::MAX_REFTABLE_BYTES
            )));
        }
        let new_off = self.reserve(m, clusters);
        let old = (m.rt_off, m.rt_clusters);
        m.reftable
            .resize((clusters * entries_per_cluster) as usize, 0);
        m.rt_off = new_off;
        m.rt_clusters = clusters;
        m.rt_dirty.clear();
        if self.crash_log.is_some() {
            let table = to_be(&m.reftable);
            let mut h = new_off.to_be_bytes().to_vec();
            h.extend_from_slice(&(clusters as u32).to_be_bytes());
            self.note(m, REFCOUNTS, new_off, table);
            self.note(m, TABLE, redo::HEADER_REFTABLE_FIELDS.0, h);
        }
        let intermediate = if m.rt_moved_from.is_none() {
            m.rt_moved_from = Some(old);
            None
        } else {
            // A table grown since the last writeback: nothing on disk names it.
            Some(old)
        };
        for c in 0..clusters {
            self.set_refcount(m, new_off + c * self.cs, 1)?;
        }
        if let Some((off, n)) = intermediate {
            for c in 0..n {
                self.decref(m, off + c * self.cs)?;
            }
        }
        Ok(())
    }

    /// Sets a refcount in the cache (written at the next writeback).
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
            self.grow_reftable(m, ti)?;
        }
        let mut off = m.reftable[ti] & REFTABLE_OFFSET_MASK;
        if off == 0 {
            // A new refcount block at the end of the file; it describes itself when it falls
            // in its own range, otherwise its own refcount is set after it is hooked in.
            off = self.reserve(m, 1);
            let mut b = vec![0u8; self.cs as usize];
            let self_covered = (off / self.cs) / per == ti as u64;
            if self_covered {
                refcount::set(&mut b, bits, ((off / self.cs) % per) as usize, 1);
            }
            m.reftable[ti] = off;
            if m.rt_moved_from.is_none() {
                m.rt_dirty.insert(ti);
            }
            if self.crash_log.is_some() {
                // A moved table is written whole before the header names it; entries of
                // the table the header names go in the middle step.
                let class = if m.rt_moved_from.is_some() {
                    REFCOUNTS
                } else {
                    TABLE
                };
                let entry_at = m.rt_off + ti as u64 * 8;
                self.note(m, REFCOUNTS, off, b.clone());
                self.note(m, class, entry_at, off.to_be_bytes().to_vec());
            }
            m.refblocks.insert(off, b);
            m.rb_dirty.insert(off);
            if !self_covered {
                self.set_refcount(m, off, 1)?;
            }
        }
        let idx = (ci % per) as usize;
        let b = self.refblock(m, off)?;
        let changed = refcount::set(b, bits, idx, value);
        if self.crash_log.is_some() {
            let bytes = b[changed.clone()].to_vec();
            self.note(m, REFCOUNTS, off + changed.start as u64, bytes);
        }
        m.rb_dirty.insert(off);
        Ok(())
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

    /// Queues whatever `map` holds on the host for freeing once the pointer to it is gone
    /// on disk (see the module docs).
    fn release(&self, m: &mut Meta, map: Mapping) {
        match map {
            Mapping::Data { host } | Mapping::Zero { host } if host != 0 => {
                m.pending_free.push(host)
            }
            Mapping::Compressed { host, len } => {
                let first = host / self.cs;
                let last = (host + len - 1).min(m.file_len.saturating_sub(1)) / self.cs;
                for c in first..=last.max(first) {
                    m.pending_free.push(c * self.cs);
                }
            }
            _ => {}
        }
    }

    /// Makes sure guest cluster `vcl` has an L2 table, allocating a zeroed one if needed.
    fn ensure_l2(&self, m: &mut Meta, vcl: u64) -> Result<()> {
        let (l1i, l2, _) = self.l2_slot(m, vcl)?;
        if l2 != 0 {
            return Ok(());
        }
        let new = self.reserve(m, 1);
        self.set_refcount(m, new, 1)?;
        m.l2_dirty.insert(new, vec![0u64; (self.cs / 8) as usize]);
        m.l2_new.insert(new);
        m.l1[l1i] = new | COPIED;
        m.l1_dirty.insert(l1i);
        if self.crash_log.is_some() {
            self.note(m, REFCOUNTS, new, vec![0u8; self.cs as usize]);
            let at = self.hdr.l1_table_offset + l1i as u64 * 8;
            self.note(m, POINTERS, at, (new | COPIED).to_be_bytes().to_vec());
        }
        Ok(())
    }

    /// Sets the L2 entry of guest cluster `vcl` (whose L2 table exists) in the cache.
    fn set_l2(&self, m: &mut Meta, vcl: u64, entry: u64) -> Result<()> {
        let (_, l2, i) = self.l2_slot(m, vcl)?;
        if l2 == 0 {
            return Err(Error::msg(format!(
                "{}: internal error: no L2 table for cluster {vcl}",
                self.name
            )));
        }
        if !m.l2_dirty.contains_key(&l2) {
            let t = self.l2_table(m, l2)?.as_ref().clone();
            m.l2_dirty.insert(l2, t);
        }
        if let Some(t) = m.l2_dirty.get_mut(&l2) {
            t[i] = entry;
        }
        if self.crash_log.is_some() {
            self.note(m, POINTERS, l2 + i as u64 * 8, entry.to_be_bytes().to_vec());
        }
        Ok(())
    }

    /// Notes a metadata change for the crash log (appended by [`Image::log_changes`]).
    fn note(&self, m: &mut Meta, class: u8, at: u64, data: Vec<u8>) {
        m.redo.push(Record { class, at, data });
    }

    /// Puts the changes noted since the last call in the crash log, before the request that
    /// made them is answered. If the log cannot take them, the metadata is written back
    /// instead: slower, but what was acknowledged stays so.
    fn log_changes(&self, m: &mut Meta) -> Result<()> {
        let Some(log) = &self.crash_log else {
            return Ok(());
        };
        if m.redo.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut m.redo);
        if log.append(&records).is_err() {
            self.writeback(m)?;
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
        {
            // Only allocated clusters: no metadata changes, so the shared lock will do and
            // reads (and other such writes) go on in parallel.
            let m = self.meta.read().map_err(|_| lock_err())?;
            if self.write_in_place(&m, offset, data)? {
                return Ok(());
            }
        }
        let mut m = self.meta.write().map_err(|_| lock_err())?;
        let cs = self.cs;
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let vcl = pos / cs;
            let in_cl = pos % cs;
            let first_end = (pos - in_cl + cs).min(end);
            let map = self.lookup(&m, vcl)?;
            let slice = |a: u64, b: u64| &data[(a - offset) as usize..(b - offset) as usize];
            match map {
                Mapping::Data { host } => {
                    // In place, over following clusters stored right after this one.
                    let mut run_end = first_end;
                    let mut next = host + cs;
                    while run_end < end
                        && self.lookup(&m, run_end / cs)? == (Mapping::Data { host: next })
                    {
                        run_end = (run_end + cs).min(end);
                        next += cs;
                    }
                    self.pwrite(slice(pos, run_end), host + in_cl, "write")?;
                    pos = run_end;
                }
                Mapping::Zero { host } if host != 0 => {
                    // Preallocated zero cluster: fill its host cluster, then map it as data.
                    let mut whole = vec![0u8; cs as usize];
                    whole[in_cl as usize..(first_end - pos + in_cl) as usize]
                        .copy_from_slice(slice(pos, first_end));
                    self.pwrite(&whole, host, "write")?;
                    self.set_l2(&mut m, vcl, host | COPIED)?;
                    pos = first_end;
                }
                _ => {
                    let mut maps = vec![map];
                    let mut run_end = first_end;
                    while run_end < end {
                        let next = self.lookup(&m, run_end / cs)?;
                        if !needs_alloc(next) {
                            break;
                        }
                        maps.push(next);
                        run_end = (run_end + cs).min(end);
                    }
                    self.write_new_run(&mut m, vcl, in_cl, slice(pos, run_end), &maps)?;
                    pos = run_end;
                }
            }
        }
        // Changes noted by a write that failed halfway stay in `redo` and go with the next.
        self.maybe_writeback(&mut m)?;
        self.log_changes(&mut m)
    }

    /// Writes `data` at `offset` if every cluster it touches is plain data (false, having
    /// written nothing, otherwise). Contiguous host clusters take one `pwrite`.
    fn write_in_place(&self, m: &Meta, offset: u64, data: &[u8]) -> Result<bool> {
        let cs = self.cs;
        let end = offset + data.len() as u64;
        // (host offset, start, end) of each run, in guest bytes.
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let Mapping::Data { host } = self.lookup(m, pos / cs)? else {
                return Ok(false);
            };
            let in_cl = pos % cs;
            let next = (pos - in_cl + cs).min(end);
            match runs.last_mut() {
                Some((h, a, b)) if *b == pos && *h + (pos - *a) == host + in_cl => *b = next,
                _ => runs.push((host + in_cl, pos, next)),
            }
            pos = next;
        }
        for (host, a, b) in runs {
            let buf = &data[(a - offset) as usize..(b - offset) as usize];
            self.pwrite(buf, host, "write")?;
        }
        Ok(true)
    }

    /// Writes `data` (starting `in_cl` bytes into guest cluster `vcl0`, spanning
    /// `maps.len()` clusters whose current mappings are `maps`) into newly allocated,
    /// contiguous host clusters: one data `pwrite`, then refcounts and L2 entries in cache.
    fn write_new_run(
        &self,
        m: &mut Meta,
        vcl0: u64,
        in_cl: u64,
        data: &[u8],
        maps: &[Mapping],
    ) -> Result<()> {
        let cs = self.cs;
        let k = maps.len() as u64;
        for j in 0..k {
            self.ensure_l2(m, vcl0 + j)?;
        }
        let host0 = self.reserve(m, k);
        let total = k * cs;
        let head_partial = in_cl != 0 || (data.len() as u64) < cs;
        let tail_partial = k > 1 && !(in_cl + data.len() as u64).is_multiple_of(cs);
        if !head_partial && !tail_partial {
            self.pwrite(data, host0, "write")?;
        } else {
            let mut buf = vec![0u8; total as usize];
            let c = cs as usize;
            if head_partial {
                self.read_cluster(m, vcl0, maps[0], &mut buf[..c])?;
            }
            if tail_partial {
                let last = (k - 1) as usize;
                self.read_cluster(m, vcl0 + k - 1, maps[last], &mut buf[last * c..])?;
            }
            buf[in_cl as usize..in_cl as usize + data.len()].copy_from_slice(data);
            self.pwrite(&buf, host0, "write")?;
        }
        for (j, &old) in maps.iter().enumerate() {
            let host = host0 + j as u64 * cs;
            self.set_refcount(m, host, 1)?;
            self.set_l2(m, vcl0 + j as u64, host | COPIED)?;
            self.release(m, old);
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeroes. Whole clusters become zero clusters (v3)
    /// and their host clusters are freed; `discard` leaves partial clusters (and v2 images,
    /// which have no zero flag) alone, `write_zeroes` writes zeroes there.
    pub fn zero_range(&self, offset: u64, len: u64, discard: bool) -> Result<()> {
        self.writable()?;
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let vcl = pos / self.cs;
            let in_cl = pos % self.cs;
            let n = (self.cs - in_cl).min(end - pos);
            if n == self.cs && self.hdr.version >= 3 {
                let mut m = self.meta.write().map_err(|_| lock_err())?;
                let map = self.lookup(&m, vcl)?;
                // Already zero, or unallocated with nothing below and no L2 table to touch.
                let already_zero = map == (Mapping::Zero { host: 0 })
                    || (map == Mapping::Unallocated
                        && self.backing.is_none()
                        && self.l2_slot(&m, vcl)?.1 == 0);
                if !already_zero {
                    self.ensure_l2(&mut m, vcl)?;
                    self.set_l2(&mut m, vcl, ZERO)?;
                    self.release(&mut m, map);
                }
                self.maybe_writeback(&mut m)?;
                self.log_changes(&mut m)?;
            } else if !discard {
                self.write_at(pos, &vec![0u8; n as usize])?;
            }
            pos += n;
        }
        Ok(())
    }

    fn maybe_writeback(&self, m: &mut Meta) -> Result<()> {
        let dirty = (m.l2_dirty.len() + m.rb_dirty.len()) as u64 * self.cs;
        if dirty > DIRTY_LIMIT || m.pending_free.len() > PENDING_FREE_LIMIT {
            self.writeback(m)?;
        }
        Ok(())
    }

    /// Writes all dirty metadata in crash-safe order (see the module docs) and makes it and
    /// every earlier data write durable. Dirty state is only dropped once written, so after
    /// an I/O error a later flush writes it again.
    fn writeback(&self, m: &mut Meta) -> Result<()> {
        let cs = self.cs;
        // 1. Refcount blocks, new L2 tables, a grown refcount table: nothing on disk points
        //    at any of them yet (or they only raise refcounts).
        for &off in &m.rb_dirty {
            let b = m.refblocks.get(&off).ok_or_else(lock_err)?;
            self.pwrite(b, off, "write refcount block")?;
        }
        m.rb_dirty.clear();
        for off in &m.l2_new {
            if let Some(t) = m.l2_dirty.get(off) {
                self.pwrite(&to_be(t), *off, "write L2 table")?;
            }
        }
        for off in std::mem::take(&mut m.l2_new) {
            if let Some(t) = m.l2_dirty.remove(&off) {
                self.cache_l2(off, t)?;
            }
        }
        if m.rt_moved_from.is_some() {
            self.pwrite(&to_be(&m.reftable), m.rt_off, "write refcount table")?;
        }
        // 2. Whatever points at new refcount blocks or the new table.
        if let Some((old_off, old_n)) = m.rt_moved_from {
            self.sync()?;
            let mut h = [0u8; 12];
            h[..8].copy_from_slice(&m.rt_off.to_be_bytes());
            h[8..].copy_from_slice(&(m.rt_clusters as u32).to_be_bytes());
            self.pwrite(&h, 48, "write header")?;
            self.sync()?;
            m.rt_moved_from = None;
            m.rt_dirty.clear();
            m.pending_free.extend((0..old_n).map(|c| old_off + c * cs));
        } else if !m.rt_dirty.is_empty() {
            self.sync()?;
            for &ti in &m.rt_dirty {
                let e = m.reftable[ti].to_be_bytes();
                self.pwrite(&e, m.rt_off + ti as u64 * 8, "write refcount table")?;
            }
            self.sync()?;
            m.rt_dirty.clear();
        }
        // 3. Pointers: only once the refcounts and data they point at are durable.
        if !m.l2_dirty.is_empty() || !m.l1_dirty.is_empty() {
            self.sync()?;
            for (&off, t) in &m.l2_dirty {
                self.pwrite(&to_be(t), off, "write L2 table")?;
            }
            for (off, t) in std::mem::take(&mut m.l2_dirty) {
                self.cache_l2(off, t)?;
            }
            for &i in &m.l1_dirty {
                let e = m.l1[i].to_be_bytes();
                self.pwrite(
                    &e,
                    self.hdr.l1_table_offset + i as u64 * 8,
                    "write L1 table",
                )?;
            }
            m.l1_dirty.clear();
        }
        // 4. Durable; now freed clusters may lose their references' counts. The crash
        //    log's records are all on the image now (the decrements start a new one).
        self.sync()?;
        if let Some(log) = &self.crash_log {
            m.redo.clear();
            log.clear()?;
        }
        for host in std::mem::take(&mut m.pending_free) {
            self.decref(m, host)?;
        }
        Ok(())
    }

    fn cache_l2(&self, off: u64, t: Vec<u64>) -> Result<()> {
        let mut cache = self.l2_cache.write().map_err(|_| lock_err())?;
        if cache.len() >= L2_CACHE_TABLES {
            cache.clear();
        }
        cache.insert(off, Arc::new(t));
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        let mut m = self.meta.write().map_err(|_| lock_err())?;
        self.writeback(&mut m)?;
        self.log_changes(&mut m)
    }

    /// Writes back everything, including the refcount decrements a writeback leaves dirty,
    /// so a closed image has no leaks.
    pub fn close(&self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        let mut m = self.meta.write().map_err(|_| lock_err())?;
        self.writeback(&mut m)?;
        if !m.rb_dirty.is_empty() {
            self.writeback(&mut m)?;
        }
        self.log_changes(&mut m)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Errors cannot be reported from here; an unwritten decrement is only a leak. A log
        // whose records may not all be on the image stays for the next open.
        if self.close().is_ok() {
            if let Some(log) = self.crash_log.take() {
                let _ = log.remove();
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// An image path in a scratch folder that is removed when the test ends, pass or fail.
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn scratch(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("qcow2-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d.join("u.qcow2"))
    }

    impl Image {
        /// What a killed process leaves: no writeback, the crash log's lock released.
        fn die(mut self) {
            drop(self.crash_log.take());
            std::mem::forget(self);
        }
    }

    /// Allocating writes, a discard, enough new clusters to need new L2 tables and refcount
    /// blocks and to move the refcount table: none of it written back when the process
    /// dies, all of it back from the crash log on the next open, and the image clean.
    #[test]
    fn a_crash_log_brings_back_every_write_a_dead_process_acknowledged() {
        let path = scratch("crashlog");
        let logs = path.parent().unwrap().join("state");
        // 4 KiB clusters with 64-bit refcounts, the file stretched to the 1 GiB the first
        // refcount table covers: every allocation needs new L2 tables and refcount blocks,
        // and the first one moves the refcount table.
        let made = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096,refcount_bits=64",
            ])
            .arg(&*path)
            .arg("64M")
            .status()
            .expect("qemu-img (qemu-utils) is needed");
        assert!(made.success());
        let f = OpenOptions::new().write(true).open(&*path).unwrap();
        f.set_len(1 << 30).unwrap();
        drop(f);
        let img = Image::open_logged(&path, false, &[], Some(&logs)).unwrap();
        let rt_before = img.header().refcount_table_offset;
        let mut want = vec![0u8; 64 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..3000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % ((64 << 20) / 512 - 8)) * 512;
            let len = 512 * (1 + (x >> 40) % 8) as usize;
            let data: Vec<u8> = (0..len).map(|j| (i as usize * 7 + j) as u8).collect();
            img.write_at(off, &data).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&data);
        }
        img.zero_range(4096, 8192, true).unwrap();
        want[4096..4096 + 8192].fill(0);
        img.die();
        // Without the log, the file alone lacks the writes.
        let bare = Image::open_logged(&path, true, &[], None).unwrap();
        let mut got = vec![0u8; 64 << 20];
        bare.read_at(0, &mut got).unwrap();
        assert_ne!(
            got, want,
            "the writes reached the file without a writeback?"
        );
        drop(bare);
        let img = Image::open_logged(&path, false, &[], Some(&logs)).unwrap();
        img.read_at(0, &mut got).unwrap();
        assert!(
            got == want,
            "the replayed image differs from what was written"
        );
        assert_ne!(
            img.header().refcount_table_offset,
            rt_before,
            "the table never moved"
        );
        drop(img);
        // A clean close removes the log; the file alone now has everything.
        assert_eq!(std::fs::read_dir(logs.join("qcow2")).unwrap().count(), 0);
        let bare = Image::open_logged(&path, true, &[], None).unwrap();
        bare.read_at(0, &mut got).unwrap();
        assert!(got == want);
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&*path)
            .output()
            .expect("qemu-img (qemu-utils) is needed");
        // No corruption; the discarded clusters' deferred decrements died with the
        // process, so they may leak (exit 3), and nothing else may.
        let text = String::from_utf8_lossy(&out.stdout);
        match out.status.code() {
            Some(0) => {}
            Some(3) => assert!(
                text.lines().any(|l| l.starts_with("2 leaked clusters")),
                "{text}"
            ),
            c => panic!("qemu-img check exit {c:?}: {text}"),
        }
    }

    /// A log whose records would write into the header, or far past the file, is refused
    /// with the log named, and left alone; the image is not touched.
    #[test]
    fn a_crash_log_that_is_not_this_images_is_refused_by_name() {
        let path = scratch("badlog");
        let logs = path.parent().unwrap().join("state");
        create(&path, 1 << 20, 65536, None).unwrap();
        let before = std::fs::read(&*path).unwrap();
        for (rec, why) in [
            (
                Record {
                    class: 2,
                    at: 0,
                    data: vec![0xff; 8],
                },
                "writes into the header",
            ),
            (
                Record {
                    class: 0,
                    at: 1 << 50,
                    data: vec![1; 8],
                },
                "past where the image",
            ),
            (
                Record {
                    class: 9,
                    at: 1 << 16,
                    data: vec![1; 8],
                },
                "unknown class",
            ),
        ] {
            let file = File::open(&*path).unwrap();
            let (log, _) = CrashLog::open(&logs, "qcow2", &file, "u").unwrap();
            log.append(&[rec]).unwrap();
            drop(log);
            let e = Image::open_logged(&path, false, &[], Some(&logs))
                .err()
                .unwrap();
            assert!(e.to_string().contains(why), "{e}");
            assert!(e.to_string().contains("crash log"), "{e}");
            assert_eq!(std::fs::read(&*path).unwrap(), before);
            let file = File::open(&*path).unwrap();
            let (log, left) = CrashLog::open(&logs, "qcow2", &file, "u").unwrap();
            assert_eq!(left.len(), 1);
            log.clear().unwrap();
        }
    }

    /// Reads never wait for each other: with the metadata lock held shared by one reader
    /// (as during its `pread`), another thread's reads of allocated clusters complete.
    #[test]
    fn reads_share_the_metadata_lock() {
        let p = scratch("shared");
        create(&p, 4 << 20, 65536, None).unwrap();
        let img = Image::open(&p, false, &[]).unwrap();
        img.write_at(0, &vec![7u8; 1 << 20]).unwrap();
        img.flush().unwrap();
        let held = img.meta.read().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (img, tx) = (&img, tx.clone());
                s.spawn(move || {
                    let mut b = vec![0u8; 65536];
                    let r = img.read_at(t * 65536, &mut b);
                    let _ = tx.send(r.is_ok() && b.iter().all(|&x| x == 7));
                });
            }
            for _ in 0..2 {
                assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
            }
            drop(held);
        });
    }

    /// Writes into allocated clusters need no metadata change: they share the lock too.
    #[test]
    fn in_place_writes_share_the_metadata_lock() {
        let p = scratch("inplace");
        create(&p, 4 << 20, 65536, None).unwrap();
        let img = Image::open(&p, false, &[]).unwrap();
        img.write_at(0, &vec![7u8; 1 << 20]).unwrap();
        let held = img.meta.read().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = tx.send(img.write_at(65536 - 512, &[9u8; 1024]).is_ok());
            });
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
            drop(held);
        });
        let mut b = vec![0u8; 2048];
        img.read_at(65536 - 1024, &mut b).unwrap();
        assert_eq!(&b[..512], &[7u8; 512][..]);
        assert_eq!(&b[512..1536], &[9u8; 1024][..]);
        assert_eq!(&b[1536..], &[7u8; 512][..]);
    }

    /// A write that allocates takes the lock exclusively, so it waits for readers (and they
    /// for it).
    #[test]
    fn writes_wait_for_readers() {
        let p = scratch("excl");
        create(&p, 4 << 20, 65536, None).unwrap();
        let img = Image::open(&p, false, &[]).unwrap();
        let held = img.meta.read().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let r = img.write_at(0, &[1u8; 512]);
                let _ = tx.send(r.is_ok());
            });
            assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
            drop(held);
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        });
    }
}
