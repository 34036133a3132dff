//! The overlay store: granules written by the guest, in a sparse file or in memory.
//!
//! Both modes keep granule `i` at a fixed place (`data offset + i * granularity`) in a file
//! that is sparse until written: a `memfd` (freed on close) or the `overlay=PATH` file, whose
//! header and bitmap make it persistent. There is no allocator and no index to update, so
//! a granule is found with one bit and read with one `pread`.
//!
//! # Crash safety (file mode)
//!
//! Data is written with `pwrite` before its bit is set in memory; the bitmap reaches the
//! file only in [`Overlay::flush`], in this order:
//!
//! 1. take a snapshot of the dirty bitmap pages (every bit in it has its data already
//!    written to the file, though perhaps only in the page cache);
//! 2. `fdatasync` — now that data is durable;
//! 3. write the snapshot pages;
//! 4. `fdatasync` — now the bits are durable.
//!
//! So a durable bit always points at durable data. A power loss loses at most the writes
//! since the last flush (the guest was never told they were durable): their bits were not
//! persisted and those granules read from the base again, as before the writes.
//!
//! A crash of the process alone must lose nothing the guest was told was written. When the
//! host keeps state across crashes (`serve --state-dir`), each new bit is also appended to
//! the host's crash log (`xen_disk_plugin_api::crash_log`) before the write is answered,
//! and the next open sets those bits and persists them as a flush would. A flush sets the
//! log's records aside *before* it takes its snapshot (so every record set aside is in the
//! snapshot) and drops them once the snapshot is durable. Bits only
//! go from 0 to 1 while a disk is open, so a torn bitmap page, whose sectors are each old or
//! new, is still a valid set of durable granules. Flushes hold a lock so an older snapshot
//! never lands after a newer one. New files are built under a temporary name and renamed
//! into place, so a crash never leaves a half-made overlay under the real name.
//!
//! # Which base (file mode)
//!
//! A new file records its base's [`Fingerprint`]; opening it over a base whose fingerprint
//! differs is refused unless the caller trusts the base. `cow commit` changes the base on
//! purpose, so before it writes anything it records the fingerprint of the base with the
//! overlay on top (what the base becomes) and marks the record "committing"; a record so
//! marked is checked against the base seen through the overlay, which is the same whether
//! the commit finished, stopped midway or never began writing. Once the base is flushed,
//! the record becomes a plain one of the new base.

mod bitmap;
mod fingerprint;
mod header;

pub use bitmap::Bitmap;
pub use fingerprint::Fingerprint;
pub use header::{BaseRecord, Header};

use header::BLOCK;
use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use xen_disk_plugin_api::crash_log::{self, CrashLog, Record};
use xen_disk_plugin_api::{Error, Result};

/// The default granularity.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// An open overlay.
pub struct Overlay {
    file: File,
    name: String,
    header: Header,
    persistent: bool,
    bitmap: Bitmap,
    flush_lock: Mutex<()>,
    /// New bits not yet persisted, when the host keeps state across crashes.
    crash_log: Option<CrashLog>,
}

/// The base as an overlay checks it.
pub struct BaseView<'a> {
    pub size: u64,
    pub sector: u32,
    /// Reads base bytes (aligned to `sector`, in range).
    pub read: &'a dyn Fn(u64, &mut [u8]) -> Result<()>,
}

impl BaseView<'_> {
    pub fn fingerprint(&self) -> Result<Fingerprint> {
        Fingerprint::of(self.size, self.sector, |at, buf| (self.read)(at, buf))
    }
}

/// Checks a granularity against the base's sector size.
pub fn check_granularity(g: u64, sector: u32) -> Result<()> {
    if !g.is_power_of_two() || g < u64::from(sector) || g > 1 << 30 {
        return Err(Error::config(
            "granularity",
            format!("{g} must be a power of two from the sector size ({sector}) to 1G"),
        ));
    }
    Ok(())
}

fn io_context<'a>(name: &'a str, what: &'a str) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| Error::from(e).context(format!("{name}: {what}"))
}

impl Overlay {
    /// A fresh overlay in memory, gone when dropped.
    pub fn in_memory(base_size: u64, granularity: u64) -> Result<Overlay> {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"xen-disk-cow".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::from(std::io::Error::last_os_error()).context("memfd_create"));
        }
        // SAFETY: fd was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let header = Header {
            data_offset: 0,
            ..Header::new(base_size, granularity)
        };
        file.set_len(header.granules * granularity)
            .map_err(io_context("memory overlay", "size"))?;
        Ok(Overlay {
            file,
            name: "memory overlay".into(),
            bitmap: Bitmap::zeroed(header.bitmap_len as usize),
            header,
            persistent: false,
            flush_lock: Mutex::new(()),
            crash_log: None,
        })
    }

    /// Opens an existing overlay file, checking its header and length.
    pub fn open_file(path: &Path) -> Result<Overlay> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::from(e).context(&name))?;
        let len = file.metadata().map_err(io_context(&name, "stat"))?.len();
        let mut block = vec![0u8; BLOCK.min(len) as usize];
        file.read_exact_at(&mut block, 0)
            .map_err(io_context(&name, "read header"))?;
        let header = Header::decode(&block, &name)?;
        if len < header.file_len() {
            return Err(Error::corrupt(format!(
                "{name}: truncated overlay: {len} bytes, the header says {}",
                header.file_len()
            )));
        }
        let mut bits = vec![0u8; header.bitmap_len as usize];
        file.read_exact_at(&mut bits, header.bitmap_offset)
            .map_err(io_context(&name, "read bitmap"))?;
        let (crash_log, left) = match crash_log::state_dir() {
            Some(dir) => match CrashLog::open_or_warn(&dir, "cow", &file, &name)? {
                None => (None, Vec::new()),
                Some((log, left)) => {
                    // Checked whole before any is applied: a log that is not this overlay's
                    // is left as it is, for someone to look at.
                    if let Some((i, r)) = left.iter().enumerate().find(|(_, r)| {
                        r.class != 0 || !r.data.is_empty() || r.at >= header.granules
                    }) {
                        return Err(Error::corrupt(format!(
                        "{name}: crash log {}: record {i} (granule {}) is not one of this overlay's; move the log away to open the overlay without it (losing the writes it describes)",
                        log.path().display(),
                        r.at
                    )));
                    }
                    (Some(log), left)
                }
            },
            None => (None, Vec::new()),
        };
        let o = Overlay {
            file,
            name,
            bitmap: Bitmap::from_bytes(&bits),
            header,
            persistent: true,
            flush_lock: Mutex::new(()),
            crash_log,
        };
        if !left.is_empty() {
            // A process died with bits not yet persisted: their data is in the file.
            for r in &left {
                o.bitmap.set(r.at);
            }
            o.flush()?;
        }
        Ok(o)
    }

    /// Opens `path` over `base`, creating it if absent. A given `granularity` must match an
    /// existing file's, and the base must be the one the file records unless `trust_base`.
    pub fn open_or_create(
        path: &Path,
        base: &BaseView<'_>,
        granularity: Option<u64>,
        trust_base: bool,
    ) -> Result<Overlay> {
        let name = path.display().to_string();
        let base_size = base.size;
        if !path.exists() {
            let record = BaseRecord {
                fingerprint: base
                    .fingerprint()
                    .map_err(|e| e.context(format!("{name}: fingerprint of the base")))?,
                committing: false,
            };
            create(
                path,
                base_size,
                granularity.unwrap_or(DEFAULT_GRANULARITY),
                record,
            )?;
        }
        let o = Overlay::open_file(path)?;
        if o.header.base_size != base_size {
            return Err(Error::config(
                "overlay",
                format!(
                    "{name} was made over a {}-byte base, this base is {base_size} bytes",
                    o.header.base_size
                ),
            ));
        }
        if let Some(g) = granularity.filter(|&g| g != o.header.granularity) {
            return Err(Error::config(
                "granularity",
                format!(
                    "{g} differs from {name}'s granularity {} (leave the key out to use the file's)",
                    o.header.granularity
                ),
            ));
        }
        if let Some(diff) = o.base_mismatch(base)? {
            if !trust_base {
                return Err(Error::config(
                    "overlay",
                    format!(
                        "{name} was made over another base: this {base_size}-byte base \
                         differs in {diff} (set trust-base=true to open it anyway)"
                    ),
                ));
            }
        }
        Ok(o)
    }

    /// What differs between `base` and the base this file records ("the first MiB"), or
    /// None when they agree or the file (version 1) records none.
    pub fn base_mismatch(&self, base: &BaseView<'_>) -> Result<Option<String>> {
        let Some(record) = self.header.base else {
            return Ok(None);
        };
        let now = if record.committing {
            Fingerprint::of(base.size, base.sector, |at, buf| {
                self.read_merged(at, buf, base)
            })
        } else {
            base.fingerprint()
        }
        .map_err(|e| e.context(format!("{}: fingerprint of the base", self.name)))?;
        Ok((now != record.fingerprint).then(|| now.differences(&record.fingerprint)))
    }

    /// Reads `buf` at `pos` as the disk shows it: the overlay's granules over `base`.
    pub fn read_merged(&self, pos: u64, buf: &mut [u8], base: &BaseView<'_>) -> Result<()> {
        let g = self.header.granularity;
        let mut done = 0usize;
        while done < buf.len() {
            let at = pos + done as u64;
            let n = ((g - at % g) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            if self.bitmap.get(at / g) {
                self.read_at(at, piece)?;
            } else {
                (base.read)(at, piece)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Replaces the base record in the file's header, durably (`cow commit`).
    pub fn set_base_record(&mut self, record: BaseRecord) -> Result<()> {
        if !self.persistent {
            return Ok(());
        }
        let h = Header {
            base: Some(record),
            ..self.header
        };
        // Everything the header holds is in its first sector, which is written whole.
        self.file
            .write_all_at(&h.encode()[..512], 0)
            .and_then(|()| self.file.sync_data())
            .map_err(io_context(&self.name, "write header"))?;
        self.header = h;
        Ok(())
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn persistent(&self) -> bool {
        self.persistent
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    /// Reads overlay bytes at disk offset `pos`.
    pub fn read_at(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, self.header.data_offset + pos)
            .map_err(io_context(&self.name, "read"))
    }

    /// Marks granule `index` as in the overlay, once its data was written with
    /// [`Overlay::write_at`]; with a crash log, the mark survives the process from here on.
    pub fn mark(&self, index: u64) -> Result<()> {
        self.bitmap.set(index);
        match &self.crash_log {
            Some(log) => match log.append(&[Record {
                class: 0,
                at: index,
                data: Vec::new(),
            }]) {
                Ok(()) => Ok(()),
                // The log cannot take it: persist the bitmap now instead.
                Err(_) => self.flush(),
            },
            None => Ok(()),
        }
    }

    /// Hands every granule in the overlay, in disk order, to `write(offset, bytes)` (the
    /// last one cut at the disk's end): what a commit writes into the base. How many.
    pub fn copy_granules(&self, mut write: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        let h = self.header;
        let mut buf = vec![0u8; h.granularity as usize];
        let mut n = 0u64;
        for g in self.bitmap.iter_set().collect::<Vec<_>>() {
            let start = g * h.granularity;
            let len = (h.base_size - start).min(h.granularity) as usize;
            self.read_at(start, &mut buf[..len])?;
            write(start, &buf[..len])?;
            n += 1;
        }
        Ok(n)
    }

    /// Writes overlay bytes at disk offset `pos` (the granule's bit is the caller's to set).
    pub fn write_at(&self, pos: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, self.header.data_offset + pos)
            .map_err(io_context(&self.name, "write"))
    }

    /// Makes every write so far durable, data before bitmap (see the module docs).
    pub fn flush(&self) -> Result<()> {
        if !self.persistent {
            return Ok(());
        }
        let _one_at_a_time = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Before the snapshot: a record set aside then describes a bit already set.
        let checkpoint = self
            .crash_log
            .as_ref()
            .is_some_and(|l| l.begin_checkpoint().is_ok());
        let pages = self.bitmap.take_dirty();
        let result = (|| {
            self.file
                .sync_data()
                .map_err(io_context(&self.name, "fdatasync data"))?;
            if pages.is_empty() {
                return Ok(());
            }
            for (at, bytes) in &pages {
                self.file
                    .write_all_at(bytes, self.header.bitmap_offset + at)
                    .map_err(io_context(&self.name, "write bitmap"))?;
            }
            self.file
                .sync_data()
                .map_err(io_context(&self.name, "fdatasync bitmap"))
        })();
        if result.is_err() {
            self.bitmap
                .redirty(&pages.iter().map(|p| p.0).collect::<Vec<_>>());
        } else if let (true, Some(log)) = (checkpoint, &self.crash_log) {
            log.end_checkpoint()?;
        }
        result
    }

    /// Empties the overlay: the bitmap is cleared and made durable first, then the data's
    /// space is given back, so a crash in between leaves an empty overlay, never stale bits.
    pub fn reset(mut self) -> Result<()> {
        // Taken out first, so dropping `self` does not persist the old bits again.
        let log = self.crash_log.take();
        let h = self.header;
        self.file
            .write_all_at(&vec![0u8; h.bitmap_len as usize], h.bitmap_offset)
            .map_err(io_context(&self.name, "clear bitmap"))?;
        self.file
            .sync_data()
            .map_err(io_context(&self.name, "fdatasync"))?;
        if let Some(log) = log {
            // Its bits are cleared for good: replaying them would show freed data.
            log.remove()?;
        }
        self.file
            .set_len(h.data_offset)
            .and_then(|()| self.file.set_len(h.file_len()))
            .and_then(|()| self.file.sync_all())
            .map_err(io_context(&self.name, "free data"))
    }
}

impl Drop for Overlay {
    /// A clean close persists the bitmap; only then is the crash log no longer needed.
    fn drop(&mut self) {
        if self.crash_log.is_some() && self.flush().is_ok() {
            if let Some(log) = self.crash_log.take() {
                let _ = log.remove();
            }
        }
    }
}

fn create(path: &Path, base_size: u64, granularity: u64, record: BaseRecord) -> Result<()> {
    let name = path.display().to_string();
    let mut tmp = PathBuf::from(path).into_os_string();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let h = Header {
        base: Some(record),
        ..Header::new(base_size, granularity)
    };
    let made = (|| {
        let f = File::create(&tmp)?;
        f.write_all_at(&h.encode(), 0)?;
        f.set_len(h.file_len())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable once the directory is.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
    })();
    made.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::from(e).context(format!("{name}: create overlay"))
    })
}

/// Empties the overlay at `path` (offline).
pub fn reset_file(path: &Path) -> Result<u64> {
    let o = Overlay::open_file(path)?;
    let n = o.bitmap.iter_set().count() as u64;
    o.reset()?;
    Ok(n)
}
