//! The host's guard in front of every plugin disk.
//!
//! Plugins are promised that every call they get is inside the disk, aligned to the logical
//! sector size, not a write to a read-only disk, and only for capabilities they declared
//! (see the plugin-api docs). This module keeps that promise, so a plugin bug cannot be
//! reached by a hostile guest through an out-of-range request. It also emulates what a
//! plugin lacks: write-zeroes by writing zero buffers, FUA by write + flush, and serializes
//! calls for plugins that asked for it.

use super::DirtyMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use xen_disk_plugin_api::{
    Disk, DiskInfo, Error, ErrorKind, Extent, RawBuf, ReadBufs, Result, Submission, SubmitOp,
    ThreadModel, WriteBufs,
};

/// Largest run of zeroes written per call when emulating write-zeroes.
const ZERO_CHUNK: usize = 256 * 1024;
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// Why the guard refuses a disk, a sector size or a swap. Each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The plugin's logical sector size.
    #[error("logical sector size {0} (must be 512 or 4096)")]
    LogicalSectorSize(u32),
    /// The plugin's physical sector size.
    #[error("physical sector size {physical} (must be a power of two from {logical} to 1 MiB)")]
    PhysicalSectorSize { physical: u32, logical: u32 },
    /// The plugin's size.
    #[error("size {size} (must be a non-zero multiple of {sector})")]
    Size { size: u64, sector: u32 },
    /// A sector size to present that is not 512 or 4096.
    #[error("sector size {0}: must be 512 or 4096")]
    PresentedSectorSize(u32),
    /// A sector size to present smaller than the plugin's.
    #[error("sector size {presented}: the plugin's sectors are {plugin} bytes")]
    SmallerThanPlugin { presented: u32, plugin: u32 },
    /// A sector size to present that does not divide the disk.
    #[error("sector size {presented}: the disk's {size} bytes are not a whole number of sectors")]
    NotWholeSectors { presented: u32, size: u64 },
    /// A new plugin with larger sectors than the guest's.
    #[error("the plugin's sectors are {plugin} bytes, the guest's {guest}")]
    LargerSectors { plugin: u32, guest: u32 },
    /// A new plugin smaller than one sector.
    #[error("the plugin's size {0} is less than a sector")]
    LessThanASector(u64),
    /// A swap to a smaller disk without leave.
    #[error("the new plugin's disk is {new} bytes, smaller than the guest's {guest}; `ctl swap --allow-shrink` allows that")]
    Shrink { new: u64, guest: u64 },
    /// A swap to a read-only disk under a writable one.
    #[error("the new plugin's disk is read-only; the guest's is writable")]
    ReadOnly,
    /// The plugin's discard alignment (ABI 1.1).
    #[error("discard alignment {alignment} (must be a multiple of {sector} below the discard granularity {granularity})")]
    DiscardAlignment {
        alignment: u32,
        sector: u32,
        granularity: u32,
    },
    /// The old plugin's flush failed: it keeps serving.
    #[error("flushing the old plugin: {0}; it keeps serving")]
    Flush(Box<Error>),
}

/// Checks that a plugin's `info` describes a disk the host can serve.
pub fn check_info(info: &DiskInfo) -> std::result::Result<(), GuardError> {
    let ls = info.logical_sector_size;
    if ls != 512 && ls != 4096 {
        return Err(GuardError::LogicalSectorSize(ls));
    }
    let ps = info.physical_sector_size;
    if ps < ls || !ps.is_power_of_two() || ps > 1 << 20 {
        return Err(GuardError::PhysicalSectorSize {
            physical: ps,
            logical: ls,
        });
    }
    if info.size == 0 || !info.size.is_multiple_of(u64::from(ls)) {
        return Err(GuardError::Size {
            size: info.size,
            sector: ls,
        });
    }
    let granularity = info.discard_granularity.max(ps);
    let alignment = info.discard_alignment;
    if info.can_discard && (alignment >= granularity || !alignment.is_multiple_of(ls)) {
        return Err(GuardError::DiscardAlignment {
            alignment,
            sector: ls,
            granularity,
        });
    }
    Ok(())
}

/// The plugin disk currently plugged in, with what it declared.
struct Plugged {
    disk: Arc<dyn Disk>,
    /// Its own info (capabilities); sizes and sector sizes are the guard's.
    info: DiskInfo,
    serial: Option<Mutex<()>>,
}

impl Plugged {
    fn new(disk: Arc<dyn Disk>) -> std::result::Result<Plugged, GuardError> {
        let info = disk.info();
        check_info(&info)?;
        Ok(Plugged {
            serial: (info.thread_model == ThreadModel::Serialized).then(|| Mutex::new(())),
            info,
            disk,
        })
    }
}

/// A plugin disk behind the host's checks. The plugin behind it can be swapped while the
/// guest runs ([`swap`](Self::swap)): each call holds a read lock on the plugged disk for its
/// duration, so a swap (the write lock) waits for the calls in flight and holds back new ones.
pub struct GuardedDisk {
    plugged: RwLock<Plugged>,
    /// Submissions an asynchronous plugin has not completed yet: a swap waits for none.
    submitted: Arc<AtomicUsize>,
    /// The plugged disk's thread model is `Async`: read on every request, so kept here
    /// rather than behind the lock (set at creation and by each swap).
    is_async: AtomicBool,
    /// What the guest was told at first (sector sizes, capabilities advertised).
    info: DiskInfo,
    size: AtomicU64,
    read_only: bool,
    /// Dirty maps every write marks (live backup), with a flag so that a disk without any
    /// pays one relaxed load per write.
    trackers: Arc<Trackers>,
    /// Counts swaps: a [`CompletionTaker`] of an earlier plugged disk is stale.
    generation: AtomicU64,
}

/// A ring thread's attachment to the plugged disk's completions (plugin ABI 1.3): it
/// watches [`fd`](Self::fd) beside the guest's event channel and calls
/// [`take`](Self::take) once per pass, so a reply is read and answered by the thread that
/// sent its request. Holds the disk weakly: a swap closes the old disk when it is done
/// with it, not when the ring thread notices. Detaches when dropped.
pub struct CompletionTaker {
    disk: std::sync::Weak<dyn Disk>,
    fd: i32,
    generation: u64,
}

impl CompletionTaker {
    /// The descriptor to watch while asleep.
    pub fn fd(&self) -> i32 {
        self.fd
    }

    /// Takes what the plugin has ready, completing submissions on this thread.
    pub fn take(&self) {
        if let Some(d) = self.disk.upgrade() {
            d.take_completions();
        }
    }
}

impl Drop for CompletionTaker {
    fn drop(&mut self) {
        if let Some(d) = self.disk.upgrade() {
            d.detach_completions();
        }
    }
}

/// The dirty maps a disk's writes mark.
#[derive(Default)]
struct Trackers {
    any: AtomicBool,
    maps: RwLock<Vec<Arc<DirtyMap>>>,
}

impl Trackers {
    /// Marks `[offset, offset + len)` in every map.
    fn mark(&self, offset: u64, len: u64) {
        if self.any.load(Ordering::Acquire) {
            for m in self.maps.read().unwrap_or_else(|p| p.into_inner()).iter() {
                m.mark(offset, len);
            }
        }
    }
}

/// What a swap did.
#[derive(Debug, Clone, Copy)]
pub struct Swapped {
    /// How long the disk held new requests back: drain, flush of the old plugin, switch.
    pub pause: Duration,
    /// The new plugin's size, when it differs (the device tells the guest).
    pub new_size: Option<u64>,
}

impl GuardedDisk {
    /// Wraps `inner`; `read_only` forces a read-only disk whatever the plugin says.
    pub fn new(inner: Box<dyn Disk>, read_only: bool) -> std::result::Result<Self, GuardError> {
        let plugged = Plugged::new(Arc::from(inner))?;
        let info = plugged.info;
        Ok(GuardedDisk {
            size: AtomicU64::new(info.size),
            read_only: read_only || info.read_only,
            info,
            is_async: AtomicBool::new(info.thread_model == ThreadModel::Async),
            plugged: RwLock::new(plugged),
            submitted: Arc::new(AtomicUsize::new(0)),
            trackers: Arc::default(),
            generation: AtomicU64::new(0),
        })
    }

    /// The plugin disk plugged in now, shared: a live backup reads it as its frozen base
    /// once [`swap_with`](Self::swap_with) has put an overlay over it.
    pub fn current(&self) -> Arc<dyn Disk> {
        self.plugged().disk.clone()
    }

    /// Adds a dirty map that writes mark from now on (a write completing at this instant
    /// may mark it or not: callers that need it fold in a map that was already there).
    pub fn add_tracker(&self, map: Arc<DirtyMap>) {
        let mut maps = self
            .trackers
            .maps
            .write()
            .unwrap_or_else(|p| p.into_inner());
        maps.push(map);
        self.trackers.any.store(true, Ordering::Release);
    }

    /// Stops marking `map`.
    pub fn remove_tracker(&self, map: &Arc<DirtyMap>) {
        let mut maps = self
            .trackers
            .maps
            .write()
            .unwrap_or_else(|p| p.into_inner());
        maps.retain(|m| !Arc::ptr_eq(m, map));
        self.trackers.any.store(!maps.is_empty(), Ordering::Release);
    }

    /// The dirty maps writes mark now.
    pub fn trackers(&self) -> Vec<Arc<DirtyMap>> {
        self.trackers
            .maps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the plugged disk as [`swap`](Self::swap) does (drain, flush the old disk,
    /// switch), with the old disk at hand: `build` gets it, with no request in flight and
    /// none let in, and returns the disk to plug (the live-backup overlay over it, or the
    /// base once the overlay is copied down). Refused, and nothing changed, when the plugged
    /// disk is no longer `expected` (another swap came between). `retrack` edits the dirty
    /// maps at the same instant, so that each write marks the maps of one side of the switch.
    pub fn swap_with(
        &self,
        expected: &Arc<dyn Disk>,
        build: impl FnOnce(&dyn Disk) -> std::result::Result<Arc<dyn Disk>, String>,
        retrack: impl FnOnce(&mut Vec<Arc<DirtyMap>>),
    ) -> std::result::Result<Swapped, String> {
        let started = Instant::now();
        let mut plugged = self.plugged.write().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&plugged.disk, expected) {
            return Err("the device's plugin was swapped meanwhile; nothing done".into());
        }
        while self.submitted.load(Ordering::Acquire) > 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
        if plugged.info.can_flush {
            plugged
                .disk
                .flush()
                .map_err(|e| GuardError::Flush(Box::new(e)).to_string())?;
        }
        let new = Plugged::new(build(&*plugged.disk)?).map_err(|e| e.to_string())?;
        let new_size = self.plugin_size(&new.info).map_err(|e| e.to_string())?;
        if new_size != self.size() {
            return Err(format!(
                "the new disk is {new_size} bytes, the device's {}",
                self.size()
            ));
        }
        if new.info.read_only && !self.read_only {
            return Err(GuardError::ReadOnly.to_string());
        }
        {
            let mut maps = self
                .trackers
                .maps
                .write()
                .unwrap_or_else(|p| p.into_inner());
            retrack(&mut maps);
            self.trackers.any.store(!maps.is_empty(), Ordering::Release);
        }
        self.is_async.store(
            new.info.thread_model == ThreadModel::Async,
            Ordering::Relaxed,
        );
        let old = std::mem::replace(&mut *plugged, new);
        self.generation.fetch_add(1, Ordering::Relaxed);
        drop(plugged);
        let pause = started.elapsed();
        drop(old);
        Ok(Swapped {
            pause,
            new_size: None,
        })
    }

    /// Attaches to the plugged disk's completions, if it is asynchronous and offers them
    /// (see [`CompletionTaker`]); `None` otherwise, or while another thread is attached.
    pub fn attach_completions(&self) -> Option<CompletionTaker> {
        let plugged = self.plugged();
        if plugged.info.thread_model != ThreadModel::Async {
            return None;
        }
        let fd = plugged.disk.attach_completions()?;
        Some(CompletionTaker {
            disk: Arc::downgrade(&plugged.disk),
            fd,
            // Read under the lock a swap writes under: this attachment is to this disk.
            generation: self.generation.load(Ordering::Relaxed),
        })
    }

    /// False once a swap has replaced the disk `taker` is attached to.
    pub fn still_plugged(&self, taker: &CompletionTaker) -> bool {
        self.generation.load(Ordering::Relaxed) == taker.generation
    }

    fn plugged(&self) -> std::sync::RwLockReadGuard<'_, Plugged> {
        self.plugged.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Presents `sector_size`-byte logical sectors (512 or 4096) whatever the plugin's are:
    /// `--sector-size 4096` over a 512-byte image gives a guest a 4Kn disk. The guard then
    /// refuses I/O not aligned to it. A plugin's 4096-byte sectors cannot be presented as 512.
    pub fn with_sector_size(mut self, sector_size: u32) -> std::result::Result<Self, GuardError> {
        if sector_size != 512 && sector_size != 4096 {
            return Err(GuardError::PresentedSectorSize(sector_size));
        }
        if sector_size < self.info.logical_sector_size {
            return Err(GuardError::SmallerThanPlugin {
                presented: sector_size,
                plugin: self.info.logical_sector_size,
            });
        }
        if !self.size().is_multiple_of(u64::from(sector_size)) {
            return Err(GuardError::NotWholeSectors {
                presented: sector_size,
                size: self.size(),
            });
        }
        self.info.logical_sector_size = sector_size;
        self.info.physical_sector_size = self.info.physical_sector_size.max(sector_size);
        Ok(self)
    }

    /// What the guest is told: the plugin's info with the host's read-only override and the
    /// current size.
    pub fn info(&self) -> DiskInfo {
        let mut info = self.info;
        info.read_only = self.read_only;
        info.size = self.size();
        info
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// The plugin's size rounded down to whole logical sectors, checked.
    fn plugin_size(&self, info: &DiskInfo) -> std::result::Result<u64, GuardError> {
        if info.logical_sector_size > self.info.logical_sector_size {
            return Err(GuardError::LargerSectors {
                plugin: info.logical_sector_size,
                guest: self.info.logical_sector_size,
            });
        }
        let ls = u64::from(self.info.logical_sector_size);
        let size = info.size / ls * ls;
        if size == 0 {
            return Err(GuardError::LessThanASector(info.size));
        }
        Ok(size)
    }

    /// Re-reads the plugin's size (online resize). Returns the new size if it changed.
    pub fn refresh_size(&self) -> std::result::Result<Option<u64>, GuardError> {
        let now = self.plugged().disk.info();
        let size = self.plugin_size(&now)?;
        let old = self.size.swap(size, Ordering::Relaxed);
        Ok((old != size).then_some(size))
    }

    /// Replaces the plugin behind the disk while the guest runs: waits for the calls in flight,
    /// flushes the old plugin, and switches; the guest sees a pause. `new` must present the
    /// same sectors, be writable if the guest's disk is, and be at least as large unless
    /// `allow_shrink`. On any error the old plugin stays and keeps serving.
    pub fn swap(
        &self,
        new: Box<dyn Disk>,
        allow_shrink: bool,
    ) -> std::result::Result<Swapped, GuardError> {
        let new = Plugged::new(Arc::from(new))?;
        let new_size = self.plugin_size(&new.info)?;
        if new_size < self.size() && !allow_shrink {
            return Err(GuardError::Shrink {
                new: new_size,
                guest: self.size(),
            });
        }
        if new.info.read_only && !self.read_only {
            return Err(GuardError::ReadOnly);
        }
        let started = Instant::now();
        let mut plugged = self.plugged.write().unwrap_or_else(|p| p.into_inner());
        // Submissions hold no lock while in flight: wait for the old plugin to complete them.
        while self.submitted.load(Ordering::Acquire) > 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
        if plugged.info.can_flush {
            plugged
                .disk
                .flush()
                .map_err(|e| GuardError::Flush(Box::new(e)))?;
        }
        self.is_async.store(
            new.info.thread_model == ThreadModel::Async,
            Ordering::Relaxed,
        );
        let old = std::mem::replace(&mut *plugged, new);
        self.generation.fetch_add(1, Ordering::Relaxed);
        let previous = self.size.swap(new_size, Ordering::Relaxed);
        drop(plugged);
        let pause = started.elapsed();
        // Closing the old disk happens after the guest's requests flow again.
        drop(old);
        Ok(Swapped {
            pause,
            new_size: (previous != new_size).then_some(new_size),
        })
    }

    /// True when discard reaches the plugin (the only case it is advertised).
    pub fn can_discard(&self) -> bool {
        self.info.can_discard && !self.read_only
    }

    /// True when flush means something (the plugin has a volatile cache).
    pub fn can_flush(&self) -> bool {
        self.info.can_flush
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let ls = u64::from(self.info.logical_sector_size);
        if !offset.is_multiple_of(ls) || !len.is_multiple_of(ls) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("request at {offset}+{len} is not aligned to the {ls}-byte sector size"),
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "request at {offset}+{len} is outside the {}-byte disk",
                    self.size()
                ),
            )),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::new(ErrorKind::ReadOnly, "the disk is read-only"))
        } else {
            Ok(())
        }
    }

    /// As [`call`](Self::call) for a call that changes `[offset, offset + len)`: the dirty
    /// maps are marked once it returns, before the plugged disk may change.
    fn call_writing<T>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&dyn Disk, &DiskInfo) -> Result<T>,
    ) -> Result<T> {
        let plugged = self.plugged();
        let _serial = plugged
            .serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        let r = f(&*plugged.disk, &plugged.info);
        // Marked whatever the result: a failed write may have changed part of the range.
        self.trackers.mark(offset, len);
        r
    }

    /// Runs `f` on the plugged disk, with its declared capabilities, serialized if it asked.
    fn call<T>(&self, f: impl FnOnce(&dyn Disk, &DiskInfo) -> Result<T>) -> Result<T> {
        let plugged = self.plugged();
        let _serial = plugged
            .serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        f(&*plugged.disk, &plugged.info)
    }

    /// True when reads and writes go to the plugin as submissions ([`Self::submit`]).
    pub fn is_async(&self) -> bool {
        self.is_async.load(Ordering::Relaxed)
    }

    /// Starts a read or write and returns; `done` runs once with the result, on whichever
    /// thread completes it (at once when the request is refused, or when the plugin is not
    /// asynchronous and serves it here).
    ///
    /// # Safety
    /// The buffers must stay valid (and untouched by the caller) until `done` has run.
    pub unsafe fn submit(
        &self,
        op: SubmitOp,
        offset: u64,
        bufs: Vec<RawBuf>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let len: u64 = bufs.iter().map(|b| b.len as u64).sum();
        let checked = if len == 0 {
            Err(Error::new(ErrorKind::OutOfRange, "zero-length request"))
        } else if op == SubmitOp::Read {
            self.check_range(offset, len)
        } else {
            self.check_writable()
                .and_then(|()| self.check_range(offset, len))
        };
        if let Err(e) = checked {
            return done(Err(e));
        }
        let plugged = self.plugged();
        if op == SubmitOp::WriteFua && !plugged.info.can_fua {
            // Emulated FUA needs a flush after the write: served here, blocking.
            drop(plugged);
            // SAFETY: the caller's contract covers the buffers for this call.
            let b = unsafe { WriteBufs::from_raw(&bufs) };
            return done(self.write(offset, &b, true));
        }
        let submitted = self.submitted.clone();
        submitted.fetch_add(1, Ordering::AcqRel);
        let trackers = (op != SubmitOp::Read).then(|| self.trackers.clone());
        // SAFETY: the caller's contract: valid until `done`, which the submission calls.
        let sub = unsafe {
            Submission::with_closure(op, offset, bufs, move |r| {
                // Marked before the submission counts as done: a swap waits for that.
                if let Some(t) = trackers {
                    t.mark(offset, len);
                }
                submitted.fetch_sub(1, Ordering::AcqRel);
                done(r)
            })
        };
        let _serial = plugged
            .serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        plugged.disk.submit(sub);
    }

    /// Reads into `bufs` from `offset`.
    pub fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        let len = bufs.len() as u64;
        if len == 0 {
            return Err(Error::new(ErrorKind::OutOfRange, "zero-length read"));
        }
        self.check_range(offset, len)?;
        self.call(|d, _| d.read(offset, bufs))
    }

    /// Writes `bufs` at `offset`; with `fua` the data is durable on return.
    pub fn write(&self, offset: u64, bufs: &WriteBufs<'_>, fua: bool) -> Result<()> {
        self.check_writable()?;
        let len = bufs.len() as u64;
        if len == 0 {
            return Err(Error::new(ErrorKind::OutOfRange, "zero-length write"));
        }
        self.check_range(offset, len)?;
        self.call_writing(offset, len, |d, info| match (fua, info.can_fua) {
            (true, true) => d.write_fua(offset, bufs),
            (true, false) => {
                d.write(offset, bufs)?;
                if info.can_flush {
                    d.flush()
                } else {
                    Ok(())
                }
            }
            (false, _) => d.write(offset, bufs),
        })
    }

    /// Makes completed writes durable (a no-op for disks without a volatile cache).
    pub fn flush(&self) -> Result<()> {
        self.call(|d, info| if info.can_flush { d.flush() } else { Ok(()) })
    }

    /// Discards a range; only for disks that declared discard.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.info.can_discard {
            return Err(Error::unsupported("discard"));
        }
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.call_writing(offset, len, |d, info| {
            if info.can_discard {
                d.discard(offset, len)
            } else {
                // Swapped in without discard: the guest may still ask; discard is advisory.
                Ok(())
            }
        })
    }

    /// Block status of `[offset, offset + len)`: consecutive extents from `offset`, at least
    /// one and at most `max`, covering all or a prefix of the range. What the plugin does not
    /// report (it predates ABI 1.2, it fails, or it answers something malformed) is data,
    /// which is always true. A range outside the disk or off the sector grid is data too:
    /// callers check ranges themselves and refuse those first.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        let ls = u64::from(self.info.logical_sector_size);
        if len == 0 || self.check_range(offset, len).is_err() {
            return vec![Extent::data(len.max(1))];
        }
        let (end, max) = (offset + len, max.max(1));
        let mut out: Vec<Extent> = Vec::new();
        // Appends `e`, merged with the last extent when alike; false when `out` is full.
        let add = |out: &mut Vec<Extent>, e: Extent| {
            if let Some(l) = out
                .last_mut()
                .filter(|l| l.hole == e.hole && l.zero == e.zero)
            {
                l.len += e.len;
            } else if out.len() >= max {
                return false;
            } else {
                out.push(e);
            }
            true
        };
        let mut pos = offset;
        'ask: while pos < end {
            let Ok(runs) = self.call(|d, _| d.extents(pos, end - pos)) else {
                break;
            };
            if runs.is_empty() {
                break;
            }
            for e in runs {
                if e.len == 0 || !e.len.is_multiple_of(ls) || e.len > end - pos {
                    // A malformed answer: nothing more from this plugin is trusted.
                    break 'ask;
                }
                if !add(&mut out, e) {
                    return out;
                }
                pos += e.len;
            }
        }
        if pos < end {
            add(&mut out, Extent::data(end - pos));
        }
        out
    }

    /// Makes a range read as zeroes, natively or by writing zero buffers.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.call_writing(offset, len, |d, info| {
            if info.can_write_zeroes {
                return d.write_zeroes(offset, len);
            }
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(ZERO_CHUNK as u64) as usize;
                let raw = [RawBuf::from_ref(&ZEROES[..n])];
                // SAFETY: the buffer is a static, immutable slice; WriteBufs only reads it.
                let bufs = unsafe { WriteBufs::from_raw(&raw) };
                d.write(offset + at, &bufs)?;
                at += n as u64;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use xen_disk_plugin_api::{with_read_bufs, with_write_bufs};

    /// A disk that counts the calls that reach it and stores nothing.
    struct Spy(Arc<AtomicUsize>, DiskInfo);
    impl Disk for Spy {
        fn info(&self) -> DiskInfo {
            self.1
        }
        fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn spy(info: DiskInfo, ro: bool) -> (GuardedDisk, Arc<AtomicUsize>) {
        let n = Arc::new(AtomicUsize::new(0));
        (
            GuardedDisk::new(Box::new(Spy(n.clone(), info)), ro).unwrap(),
            n,
        )
    }

    #[test]
    fn out_of_range_and_unaligned_never_reach_the_plugin() {
        let (g, n) = spy(DiskInfo::new(1 << 20).sector_size(4096), false);
        let mut b = vec![0u8; 4096];
        for off in [1 << 20, (1 << 20) - 512, u64::MAX - 4095, 512] {
            let e = with_read_bufs(&mut [&mut b], |r| g.read(off, r)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::OutOfRange, "offset {off}");
        }
        assert_eq!(
            g.discard(0, 4096).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(n.load(Ordering::SeqCst), 0);
        with_read_bufs(&mut [&mut b], |r| g.read((1 << 20) - 4096, r)).unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_4096_byte_sector_size_can_be_presented_over_512() {
        let (g, n) = spy(DiskInfo::new(1 << 20), false);
        let g = g.with_sector_size(4096).unwrap();
        assert_eq!(g.info().logical_sector_size, 4096);
        assert_eq!(g.info().physical_sector_size, 4096);
        let mut b = vec![0u8; 4096];
        let e = with_read_bufs(&mut [&mut b[..512]], |r| g.read(0, r)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        let e = with_read_bufs(&mut [&mut b], |r| g.read(512, r)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        assert_eq!(n.load(Ordering::SeqCst), 0);
        with_read_bufs(&mut [&mut b], |r| g.read(4096, r)).unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(g.refresh_size().unwrap(), None);
        let (g, _) = spy(DiskInfo::new(1 << 20).sector_size(4096), false);
        assert!(g
            .with_sector_size(512)
            .err()
            .unwrap()
            .to_string()
            .contains("4096 bytes"));
        let (g, _) = spy(DiskInfo::new(5 * 512), false);
        assert!(g
            .with_sector_size(4096)
            .err()
            .unwrap()
            .to_string()
            .contains("whole number"));
        let (g, _) = spy(DiskInfo::new(1 << 20), false);
        assert!(g.with_sector_size(1024).is_err());
    }

    #[test]
    fn read_only_refuses_writes_before_the_plugin() {
        let (g, n) = spy(DiskInfo::new(1 << 20), true);
        let b = [0u8; 512];
        let e = with_write_bufs(&[&b], |w| g.write(0, w, false)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert_eq!(
            g.write_zeroes(0, 512).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        assert_eq!(n.load(Ordering::SeqCst), 0);
        assert!(g.info().read_only);
    }

    #[test]
    fn write_zeroes_is_emulated_in_chunks() {
        let (g, n) = spy(DiskInfo::new(4 << 20), false);
        g.write_zeroes(0, 1 << 20).unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 4);
    }

    /// Records every range that reaches it.
    struct Ranges(Arc<std::sync::Mutex<Vec<(u64, u64)>>>, DiskInfo);
    impl Disk for Ranges {
        fn info(&self) -> DiskInfo {
            self.1
        }
        fn read(&self, o: u64, b: &mut ReadBufs<'_>) -> Result<()> {
            self.0.lock().unwrap().push((o, b.len() as u64));
            Ok(())
        }
        fn write(&self, o: u64, b: &WriteBufs<'_>) -> Result<()> {
            self.0.lock().unwrap().push((o, b.len() as u64));
            Ok(())
        }
        fn discard(&self, o: u64, l: u64) -> Result<()> {
            self.0.lock().unwrap().push((o, l));
            Ok(())
        }
        fn write_zeroes(&self, o: u64, l: u64) -> Result<()> {
            self.0.lock().unwrap().push((o, l));
            Ok(())
        }
    }

    #[test]
    fn no_random_request_reaches_the_plugin_out_of_bounds() {
        let mut rng = crate::rng::Rng::new(42);
        for sector in [512u32, 4096] {
            let size = 8 << 20;
            let info = DiskInfo::new(size)
                .sector_size(sector)
                .discard(true)
                .write_zeroes(true);
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let g = GuardedDisk::new(Box::new(Ranges(seen.clone(), info)), false).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            for _ in 0..20_000 {
                // Offsets near the edges, near u64::MAX and anywhere; lengths of any 512 multiple.
                let offset = match rng.below(4) {
                    0 => size - 512 * rng.below(16),
                    1 => u64::MAX - rng.below(1 << 20),
                    2 => 512 * rng.below((size + 8192) / 512),
                    _ => rng.next(),
                };
                let len = 512 * (1 + rng.below(128)) as usize;
                let _ = with_read_bufs(&mut [&mut buf[..len]], |b| g.read(offset, b));
                let _ = with_write_bufs(&[&buf[..len]], |b| g.write(offset, b, false));
                let _ = g.discard(offset, rng.next() >> rng.below(64));
                let _ = g.write_zeroes(offset, len as u64);
            }
            let seen = seen.lock().unwrap();
            // Some valid requests got through, so the checks below are not vacuous.
            assert!(seen.len() > 100, "{} reached the plugin", seen.len());
            for &(o, l) in seen.iter() {
                assert!(
                    o % u64::from(sector) == 0 && l % u64::from(sector) == 0,
                    "{o}+{l} misaligned"
                );
                assert!(
                    o.checked_add(l).is_some_and(|end| end <= size),
                    "{o}+{l} outside {size}"
                );
            }
        }
    }

    #[test]
    fn bad_info_is_refused() {
        let n = Arc::new(AtomicUsize::new(0));
        for info in [
            DiskInfo::new(0),
            DiskInfo::new(1000),
            DiskInfo::new(4096).sector_size(1024),
        ] {
            assert!(GuardedDisk::new(Box::new(Spy(n.clone(), info)), false).is_err());
        }
    }

    /// An asynchronous disk that parks its submissions until told to complete them.
    struct Parked(Arc<Mutex<Vec<Submission>>>);
    impl Disk for Parked {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20).thread_model(ThreadModel::Async)
        }
        fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> {
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
            Ok(())
        }
        fn submit(&self, s: Submission) {
            self.0.lock().unwrap().push(s);
        }
    }

    #[test]
    fn a_refused_shrink_names_the_flag_that_allows_it() {
        let (g, _) = spy(DiskInfo::new(1 << 20), false);
        let smaller = || Box::new(Spy(Arc::new(AtomicUsize::new(0)), DiskInfo::new(1 << 19)));
        let e = g.swap(smaller(), false).unwrap_err().to_string();
        assert!(e.contains("smaller") && e.contains("--allow-shrink"), "{e}");
        assert_eq!(g.swap(smaller(), true).unwrap().new_size, Some(1 << 19));
    }

    #[test]
    fn a_swap_waits_for_submissions_in_flight_and_refused_ones_answer_at_once() {
        let parked = Arc::new(Mutex::new(Vec::new()));
        let disk = Arc::new(GuardedDisk::new(Box::new(Parked(parked.clone())), false).unwrap());
        assert!(disk.is_async());
        let mut buf = vec![0u8; 4096];
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        // SAFETY: `buf` outlives the submission: the test waits for its completion below.
        unsafe {
            disk.submit(
                SubmitOp::Read,
                0,
                vec![RawBuf::from_mut(&mut buf)],
                move |r| tx2.send(("read", r.is_ok())).unwrap(),
            )
        };
        // Out of range: answered at once, never reaching the plugin.
        // SAFETY: as above.
        unsafe {
            disk.submit(
                SubmitOp::Read,
                1 << 20,
                vec![RawBuf::from_mut(&mut buf)],
                move |r| tx.send(("out of range", r.is_ok())).unwrap(),
            )
        };
        assert_eq!(rx.recv().unwrap(), ("out of range", false));
        assert_eq!(parked.lock().unwrap().len(), 1);
        let swapper = {
            let disk = disk.clone();
            std::thread::spawn(move || {
                disk.swap(
                    Box::new(Spy(Arc::new(AtomicUsize::new(0)), DiskInfo::new(1 << 20))),
                    false,
                )
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !swapper.is_finished(),
            "the swap did not wait for the submission"
        );
        let s = parked.lock().unwrap().pop().unwrap();
        s.complete(Ok(()));
        assert_eq!(rx.recv().unwrap(), ("read", true));
        swapper.join().unwrap().unwrap();
        assert!(!disk.is_async(), "the new plugin serves");
    }

    /// Answers the same extents whatever it is asked.
    struct Mapped(Vec<Extent>);
    impl Disk for Mapped {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> {
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
            Ok(())
        }
        fn extents(&self, _: u64, _: u64) -> Result<Vec<Extent>> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn block_status_keeps_what_is_sound_and_calls_the_rest_data() {
        let g = |runs: Vec<Extent>| GuardedDisk::new(Box::new(Mapped(runs)), false).unwrap();
        // Merged, and asked again from where an answer stops.
        let d = g(vec![Extent::hole(4096), Extent::hole(4096)]);
        assert_eq!(d.extents(0, 16384, 100), vec![Extent::hole(16384)]);
        // Off the sector grid or past the range: data from there on.
        let d = g(vec![Extent::hole(4096), Extent::zero(1000)]);
        assert_eq!(
            d.extents(0, 16384, 100),
            vec![Extent::hole(4096), Extent::data(12288)]
        );
        let d = g(vec![Extent::hole(1 << 21)]);
        assert_eq!(d.extents(0, 4096, 100), vec![Extent::data(4096)]);
        // Outside the disk: the guard never asks the plugin.
        assert_eq!(d.extents(1 << 20, 512, 100), vec![Extent::data(512)]);
        // At most `max` extents.
        let d = g(vec![Extent::hole(512), Extent::data(512)]);
        assert_eq!(d.extents(0, 1 << 20, 3).len(), 3);
        // A plugin that does not report: data.
        let (d, _) = spy(DiskInfo::new(1 << 20), false);
        assert_eq!(d.extents(0, 1 << 20, 100), vec![Extent::data(1 << 20)]);
    }
}
