//! The two traits a plugin author implements: [`Plugin`] (describe yourself, open a disk)
//! and [`Disk`] (one open virtual disk).
//!
//! ```text
//!   Plugin ──open(&Config)──▶ Disk: info · read · write · [flush · discard · write_zeroes · write_fua]
//!     │                        (dropped = closed)
//!     └ NAME, VERSION, DESCRIPTION, CONFIG_KEYS
//! ```

use crate::buffers::{ReadBufs, WriteBufs};
use crate::config::{Config, ConfigKey};
use crate::error::{Error, Result};

/// How the host may call a disk's methods.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, abi_stable::StableAbi)]
pub enum ThreadModel {
    /// One call at a time per disk; the host holds a lock around each call. Choose this when
    /// the backing store is a single stream (a socket, a device that dislikes concurrency).
    Serialized = 0,
    /// Any number of calls at once from several threads. The default: a `Disk` is `Sync`, so
    /// Rust already makes this safe; take locks inside only where state is shared.
    Parallel = 1,
    /// As `Parallel`, and every call returns within microseconds without sleeping or waiting
    /// on I/O (memory only: a RAM disk, a null disk). The host then runs calls on the ring
    /// thread itself and skips the hand-off to a worker, which costs more than such a call.
    /// A call that blocks anyway stalls every request behind it on that ring.
    NonBlocking = 2,
    /// Reads and writes arrive as [`Submission`](crate::Submission)s through
    /// [`Disk::submit`], which starts the I/O and returns; the disk completes each later,
    /// from any thread. For storage reached over a network, where a blocked thread per
    /// request in flight would cost more than the I/O. Other calls block, on host workers.
    Async = 3,
}

/// What an open disk is and can do. Build it with [`DiskInfo::new`] and the setters.
///
/// The host advertises to the guest only what is set here: `feature-flush-cache` when
/// `can_flush`, `feature-discard` when `can_discard`, and so on. Capabilities a disk lacks are
/// emulated where that is safe: write-zeroes by writing zero buffers, FUA by write + flush.
///
/// Build it with [`DiskInfo::new`] and the setters (or `DiskInfo { size, ..other }`), never
/// with every field spelled out: later versions add fields, with defaults that keep today's
/// behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in bytes; a multiple of `logical_sector_size`.
    pub size: u64,
    /// The smallest unit of I/O: 512 or 4096. Requests are aligned to it by the host.
    pub logical_sector_size: u32,
    /// The unit the backing store writes atomically (≥ logical), e.g. 4096.
    pub physical_sector_size: u32,
    /// The disk refuses writes; the host tells the guest and fails writes before calling.
    pub read_only: bool,
    /// See [`ThreadModel`].
    pub thread_model: ThreadModel,
    /// The disk has a volatile cache and [`Disk::flush`] makes writes durable.
    pub can_flush: bool,
    /// [`Disk::write_fua`] is native (cheaper than write + flush).
    pub can_fua: bool,
    /// [`Disk::discard`] is native.
    pub can_discard: bool,
    /// [`Disk::write_zeroes`] is native.
    pub can_write_zeroes: bool,
    /// Discard granularity in bytes (0 = the physical sector size).
    pub discard_granularity: u32,
    /// Where the discard granules start: the byte offset of the first whole granule from
    /// the start of the disk (0 = at the start; less than the granularity). Since ABI 1.1;
    /// a disk over a base whose granules it does not start on sets it, so the guest sends
    /// discards the base can act on.
    pub discard_alignment: u32,
}

impl DiskInfo {
    /// A writable, parallel disk of `size` bytes with 512-byte sectors and no extra
    /// capabilities.
    pub const fn new(size: u64) -> Self {
        DiskInfo {
            size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            read_only: false,
            thread_model: ThreadModel::Parallel,
            can_flush: false,
            can_fua: false,
            can_discard: false,
            can_write_zeroes: false,
            discard_granularity: 0,
            discard_alignment: 0,
        }
    }

    /// Sets the logical sector size (the physical one is raised to match if smaller).
    pub const fn sector_size(mut self, bytes: u32) -> Self {
        self.logical_sector_size = bytes;
        if self.physical_sector_size < bytes {
            self.physical_sector_size = bytes;
        }
        self
    }

    /// Sets the physical sector size.
    pub const fn physical_sector_size(mut self, bytes: u32) -> Self {
        self.physical_sector_size = bytes;
        self
    }

    /// Marks the disk read-only.
    pub const fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// Sets the thread model.
    pub const fn thread_model(mut self, model: ThreadModel) -> Self {
        self.thread_model = model;
        self
    }

    /// Declares a volatile cache that `flush` empties.
    pub const fn flush(mut self, yes: bool) -> Self {
        self.can_flush = yes;
        self
    }

    /// Declares native FUA writes.
    pub const fn fua(mut self, yes: bool) -> Self {
        self.can_fua = yes;
        self
    }

    /// Declares native discard.
    pub const fn discard(mut self, yes: bool) -> Self {
        self.can_discard = yes;
        self
    }

    /// Declares native write-zeroes.
    pub const fn write_zeroes(mut self, yes: bool) -> Self {
        self.can_write_zeroes = yes;
        self
    }

    /// Sets the discard granularity in bytes.
    pub const fn discard_granularity(mut self, bytes: u32) -> Self {
        self.discard_granularity = bytes;
        self
    }

    /// Sets where the discard granules start (ABI 1.1): the offset in bytes of the first
    /// whole granule from the start of the disk.
    pub const fn discard_alignment(mut self, bytes: u32) -> Self {
        self.discard_alignment = bytes;
        self
    }

    /// Number of 512-byte sectors (the unit of the Xen protocol).
    pub const fn sectors_512(&self) -> u64 {
        self.size / 512
    }
}

/// One run of a disk's block status ([`Disk::extents`], since ABI 1.2): `len` bytes that
/// are all stored data, all a hole, or all known to read as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, > 0.
    pub len: u64,
    /// Not allocated in the backing store (a sparse file's hole, an unallocated cluster).
    pub hole: bool,
    /// Reads as zeroes (a hole usually does; an allocated zero cluster does too).
    pub zero: bool,
}

impl Extent {
    /// Stored data (what a disk that reports nothing is taken to be everywhere).
    pub const fn data(len: u64) -> Extent {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }
    /// Unallocated and reading as zeroes.
    pub const fn hole(len: u64) -> Extent {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }
    /// Allocated but reading as zeroes (a preallocated or zeroed cluster).
    pub const fn zero(len: u64) -> Extent {
        Extent {
            len,
            hole: false,
            zero: true,
        }
    }
}

/// One open virtual disk.
///
/// Offsets and lengths are in bytes. **The host has already checked every request**: it is
/// inside the disk, aligned to `logical_sector_size`, never a write on a read-only disk, and
/// only uses capabilities `info` declared. A disk may still check and return an error.
///
/// Required: [`info`](Disk::info), [`read`](Disk::read), [`write`](Disk::write). Everything
/// else has a default. Dropping the disk closes it (flush first if you keep dirty state).
pub trait Disk: Send + Sync + 'static {
    /// What the disk is. Called at open and again whenever the host wants to notice a resize,
    /// so keep it cheap.
    fn info(&self) -> DiskInfo;

    /// Fills `bufs` with `bufs.len()` bytes from `offset`.
    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()>;

    /// Stores `bufs.len()` bytes at `offset`.
    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()>;

    /// Makes every completed write durable. Called only when `info().can_flush`.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// A write that is durable when it returns. Called only when `info().can_fua`; the host
    /// otherwise emulates it with `write` + `flush`.
    fn write_fua(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.write(offset, bufs)?;
        self.flush()
    }

    /// Tells the disk the range is no longer needed; later reads may return anything the
    /// disk documents (most return zeroes). Called only when `info().can_discard`.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::unsupported("discard"))
    }

    /// Makes the range read as zeroes. Called only when `info().can_write_zeroes`; the host
    /// otherwise writes zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::unsupported("write-zeroes"))
    }

    /// Block status (ABI 1.2): which parts of `[offset, offset + len)` are holes or read as
    /// zeroes, as consecutive [`Extent`]s from `offset`. Answer a prefix if the whole range
    /// costs too much: at least one extent, their lengths summing to at most `len` (the host
    /// asks again for the rest). `offset` and `len` are sector-aligned and inside the disk.
    /// The default answers "unsupported", and the host then reports the range as data:
    /// always a safe answer, never a wrong one. A filter reports what its own layer knows
    /// and asks its base ([`ForeignDisk::extents`](crate::ForeignDisk)) for the rest.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let _ = (offset, len);
        Err(Error::unsupported("block status"))
    }

    /// Starts a read or write and returns; completes it later with
    /// [`Submission::complete`](crate::Submission::complete), from any thread. Called
    /// instead of `read`/`write` when `info().thread_model` is
    /// [`ThreadModel::Async`]; the default serves it with the blocking calls.
    fn submit(&self, submission: crate::Submission) {
        submission.run_blocking(self);
    }

    /// Completions taken by the host (ABI 1.3), for an asynchronous disk whose replies come
    /// in on a descriptor, such as a socket. The host's ring thread, which sends the guest's
    /// requests, offers to read the replies too: one thread per request instead of two,
    /// which is what a busy host with few CPUs pays for. Return the descriptor to watch
    /// (it must be readable whenever [`take_completions`](Self::take_completions) would find
    /// something), or `None` to decline (the default: your own threads keep completing).
    ///
    /// At most one attachment at a time: decline a second until
    /// [`detach_completions`](Self::detach_completions). While attached your own reader may
    /// stop watching the descriptor, but it must not stop completing altogether: the host
    /// calls `take_completions` only while its ring runs, and a ring can wait on the disk
    /// itself (a hot swap drains it), so look now and then (every few milliseconds) whether
    /// replies are waiting and take them. Then nothing depends on the host for progress.
    fn attach_completions(&self) -> Option<i32> {
        None
    }

    /// Takes the completions that are ready, without blocking, completing their
    /// submissions on the calling thread. Called by the attached host thread once per pass
    /// and when the descriptor is readable; another thread may be taking at that moment, so
    /// skip rather than wait for it. The attached thread also calls it after every pass in
    /// which it submitted, before it sleeps (or it detaches): what that thread submits may
    /// be held back until then and sent in one go.
    fn take_completions(&self) {}

    /// Ends the attachment: the host no longer watches the descriptor (its ring went idle,
    /// stopped, or the plugin behind the device was swapped). Watch it yourself again at
    /// once: completions may be waiting.
    fn detach_completions(&self) {}
}

/// A plugin: its description and how to open a disk. Export it with
/// [`export_plugin!`](crate::export_plugin).
pub trait Plugin: 'static {
    /// The disk type `open` returns.
    type Disk: Disk;

    /// The short name users type (`--plugin mmap`); the file is `lib<name>.so` with `-`
    /// spelled `_`.
    const NAME: &'static str;
    /// The plugin's own version, usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;
    /// One line saying what the plugin does.
    const DESCRIPTION: &'static str;
    /// The configuration keys it takes. Anything else is refused before `open` is called.
    const CONFIG_KEYS: &'static [ConfigKey];

    /// Opens a disk. `config` has been checked against `CONFIG_KEYS`, defaults filled in.
    /// Errors should name the file or key at fault.
    fn open(config: &Config) -> Result<Self::Disk>;
}

/// A filter: a plugin that opens its disk over another disk (the *base*), which the host
/// opens first from the `base` table of the filter's configuration. Filters stack: a base may
/// itself be a filter. Export it with [`export_filter!`](crate::export_filter).
///
/// The base arrives as a [`ForeignDisk`](crate::ForeignDisk): call it like any [`Disk`].
/// The host checks requests against the *filter's* `info`; a filter that changes the size
/// or sector size must keep its own calls to the base inside the base's `info`.
pub trait Filter: 'static {
    /// The disk type `open` returns.
    type Disk: Disk;

    /// See [`Plugin::NAME`].
    const NAME: &'static str;
    /// See [`Plugin::VERSION`].
    const VERSION: &'static str;
    /// See [`Plugin::DESCRIPTION`].
    const DESCRIPTION: &'static str;
    /// The filter's own keys (the `base` table is the host's and never reaches `open`).
    const CONFIG_KEYS: &'static [ConfigKey];
    /// True when the filter never writes its base (a copy-on-write overlay): the host then
    /// opens the base read-only — it sets the base plugin's `readonly` key (or `shared=false`
    /// for `mmap`), passes the request down a stack of filters, and refuses writes at the
    /// boundary for bases that have no such key — and refuses a user's `readonly=false`.
    const READ_ONLY_BASE: bool = false;

    /// Opens the filter over `base`.
    fn open(config: &Config, base: crate::ForeignDisk) -> Result<Self::Disk>;
}
