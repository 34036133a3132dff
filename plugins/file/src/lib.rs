//! `file`: a disk served from a raw image file or a block device.
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `path` | path | required | image file (size a multiple of 512) or block device |
//! | `direct` | bool | `false` | open with `O_DIRECT`: bypass dom0's page cache |
//! | `readonly` | bool | `false` | open read-only; the guest sees a read-only disk |
//!
//! Reads and writes are `preadv`/`pwritev` at the request's offset straight from and into
//! the guest's pages, from any number of threads at once (no seek, no lock). `flush` is
//! `fdatasync`. On files whose filesystem can punch holes, discard punches them (the file's
//! allocated size shrinks) and write-zeroes uses `FALLOC_FL_ZERO_RANGE`, falling back to a
//! punched hole, then to writing zeroes.
//!
//! Block status (ABI 1.2) comes from `SEEK_DATA`/`SEEK_HOLE`: a hole in a sparse file is
//! reported as a hole that reads as zeroes, everything else as data. Block devices and
//! filesystems without those seeks report nothing (all data).
//!
//! An image on tmpfs or ramfs (buffered) is served on the host's ring thread itself
//! ([`ThreadModel::NonBlocking`]): each call only copies memory, and handing it to a worker
//! thread would cost more than the copy (two thread wake-ups per request). Anywhere else
//! calls may wait on a device, and run on the host's workers.
//!
//! With `direct`, offsets and lengths must meet the filesystem's O_DIRECT alignment: the
//! plugin reports it as the disk's logical sector size (usually 512), so the host keeps every
//! request aligned. Guest buffers that do not meet the memory alignment go through an
//! aligned bounce buffer.

mod sys;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use xen_disk_plugin_api::*;

/// An open image.
pub struct FileDisk {
    file: File,
    name: String,
    info: DiskInfo,
    /// O_DIRECT memory alignment; `None` when buffered.
    direct_mem_align: Option<usize>,
}

/// A heap buffer aligned for O_DIRECT, freed on drop.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn zeroed(len: usize, align: usize) -> Result<Aligned> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align.max(1))
            .map_err(|e| Error::msg(format!("bounce buffer: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::io(libc::ENOMEM, "bounce buffer: out of memory"));
        }
        Ok(Aligned { ptr, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is an allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn iovecs<'a>(slices: &'a [std::io::IoSlice<'_>]) -> &'a [libc::iovec] {
    // SAFETY: IoSlice is guaranteed ABI-compatible with struct iovec on Unix.
    unsafe { std::slice::from_raw_parts(slices.as_ptr() as *const libc::iovec, slices.len()) }
}

fn iovecs_mut<'a>(slices: &'a [std::io::IoSliceMut<'_>]) -> &'a [libc::iovec] {
    // SAFETY: IoSliceMut is guaranteed ABI-compatible with struct iovec on Unix.
    unsafe { std::slice::from_raw_parts(slices.as_ptr() as *const libc::iovec, slices.len()) }
}

impl FileDisk {
    fn err(&self, what: &str, e: std::io::Error) -> Error {
        Error::from(e).context(format!("{}: {what}", self.name))
    }

    /// True when every buffer meets O_DIRECT's memory alignment (or I/O is buffered).
    fn aligned<'b>(&self, mut bufs: impl Iterator<Item = (usize, usize)> + 'b) -> bool {
        match self.direct_mem_align {
            None => true,
            Some(a) => bufs.all(|(addr, len)| addr % a == 0 && len % a == 0),
        }
    }

    /// Holes and data in `[offset, end)` from `SEEK_DATA`/`SEEK_HOLE`, rounded to whole
    /// sectors (a hole boundary inside a sector counts that sector as data).
    fn seek_extents(&self, offset: u64, end: u64) -> Result<Vec<Extent>> {
        let fd = self.file.as_raw_fd();
        let sector = u64::from(self.info.logical_sector_size);
        let seek =
            |pos, whence| sys::seek(fd, pos, whence).map_err(|e| self.err("block status", e));
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < 1024 {
            let data = seek(pos, libc::SEEK_DATA)?.unwrap_or(end);
            // Holes shrink to whole sectors: data wins a shared sector.
            let hole_end = (data.min(end) / sector * sector).max(pos);
            if hole_end > pos {
                out.push(Extent::hole(hole_end - pos));
                pos = hole_end;
                continue;
            }
            let hole = seek(pos, libc::SEEK_HOLE)?.unwrap_or(end);
            let data_end = (hole.min(end).div_ceil(sector) * sector).clamp(pos + sector, end);
            out.push(Extent::data(data_end - pos));
            pos = data_end;
        }
        Ok(out)
    }

    fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = len.min(1 << 20) as usize;
        let mut zero = Aligned::zeroed(chunk, self.direct_mem_align.unwrap_or(1))?;
        let fd = self.file.as_raw_fd();
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(chunk as u64) as usize;
            let buf = &mut zero.as_mut()[..n];
            let iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: n,
            }];
            sys::pwritev_all(fd, &iov, offset + at).map_err(|e| self.err("write-zeroes", e))?;
            at += n as u64;
        }
        Ok(())
    }
}

impl Disk for FileDisk {
    /// The size is read again each time: the host polls it, so growing the image (`truncate
    /// -s`, `lvextend`) resizes the guest's disk online. A size that is not whole sectors is
    /// rounded down; one that cannot be read leaves the last known size.
    fn info(&self) -> DiskInfo {
        let mut info = self.info;
        let fd = self.file.as_raw_fd();
        let now = match self.file.metadata() {
            Ok(m) if m.file_type().is_block_device() => {
                sys::block_device_geometry(fd).ok().map(|(size, _, _)| size)
            }
            Ok(m) => Some(m.len()),
            Err(_) => None,
        };
        let sector = u64::from(info.logical_sector_size);
        if let Some(size) = now.map(|n| n / sector * sector).filter(|&n| n > 0) {
            info.size = size;
        }
        info
    }

    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        let fd = self.file.as_raw_fd();
        let raw: Vec<(usize, usize)>;
        let direct_ok = {
            raw = bufs
                .raw()
                .iter()
                .map(|b| (b.base as usize, b.len))
                .collect();
            self.aligned(raw.iter().copied())
        };
        if direct_ok {
            return sys::preadv_all(fd, iovecs_mut(bufs.as_io_slices_mut()), offset)
                .map_err(|e| self.err("read", e));
        }
        let mut bounce = Aligned::zeroed(bufs.len(), self.direct_mem_align.unwrap_or(1))?;
        let b = bounce.as_mut();
        let iov = [libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }];
        sys::preadv_all(fd, &iov, offset).map_err(|e| self.err("read", e))?;
        bufs.copy_from(b);
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        let fd = self.file.as_raw_fd();
        if self.aligned(bufs.raw().iter().map(|b| (b.base as usize, b.len))) {
            return sys::pwritev_all(fd, iovecs(bufs.as_io_slices()), offset)
                .map_err(|e| self.err("write", e));
        }
        let mut bounce = Aligned::zeroed(bufs.len(), self.direct_mem_align.unwrap_or(1))?;
        let b = bounce.as_mut();
        bufs.copy_to(b);
        let iov = [libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }];
        sys::pwritev_all(fd, &iov, offset).map_err(|e| self.err("write", e))
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.err("fdatasync", e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        sys::fallocate(self.file.as_raw_fd(), mode, offset, len).map_err(|e| self.err("discard", e))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if self.file.metadata().map(|m| !m.is_file()).unwrap_or(true) {
            return Err(Error::unsupported("block status of a block device"));
        }
        self.seek_extents(offset, offset + len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let fd = self.file.as_raw_fd();
        let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if sys::fallocate(fd, zero_range, offset, len).is_ok()
            || sys::fallocate(fd, punch, offset, len).is_ok()
        {
            return Ok(());
        }
        self.write_zeroes_by_writing(offset, len)
    }
}

/// The plugin.
pub struct FilePlugin;

impl Plugin for FilePlugin {
    type Disk = FileDisk;
    const NAME: &'static str = "file";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Raw image file or block device (preadv/pwritev, optional O_DIRECT)";
    const CONFIG_KEYS: &'static [ConfigKey] = &[
        ConfigKey::required("path", KeyType::Path, "Image file or block device"),
        ConfigKey::optional(
            "direct",
            KeyType::Bool,
            "false",
            "Use O_DIRECT (bypass dom0's page cache)",
        ),
        ConfigKey::optional("readonly", KeyType::Bool, "false", "Open read-only"),
    ];

    fn open(config: &Config) -> Result<FileDisk> {
        let path = config.path("path")?;
        let direct = config.bool("direct")?;
        let readonly = config.bool("readonly")?;
        let name = path.display().to_string();
        let meta = std::fs::metadata(&path).map_err(|e| Error::from(e).context(&name))?;
        if meta.is_dir() {
            return Err(Error::config("path", format!("{name} is a directory")));
        }
        let mut options = OpenOptions::new();
        options.read(true).write(!readonly);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(&path).map_err(|e| {
            let e = Error::from(e).context(&name);
            if readonly {
                e
            } else {
                e.read_only_hint("readonly=true")
            }
        })?;
        let fd = file.as_raw_fd();
        let is_block = meta.file_type().is_block_device();
        let (size, mut logical, physical) = if is_block {
            sys::block_device_geometry(fd)
                .map_err(|e| Error::from(e).context(format!("{name}: block device size")))?
        } else {
            (meta.len(), 512, 4096)
        };
        if size == 0 {
            return Err(Error::config("path", format!("{name} is empty (0 bytes)")));
        }
        let mut direct_mem_align = None;
        if direct {
            // The filesystem's O_DIRECT alignment; without statx's answer, a page is safe.
            let (mem, off) = sys::dio_alignment(fd).unwrap_or((4096, 4096));
            logical = logical.max(off);
            direct_mem_align = Some(mem as usize);
        }
        if logical != 512 && logical != 4096 {
            return Err(Error::config(
                "direct",
                format!("{name} needs {logical}-byte aligned I/O, which a Xen disk cannot offer"),
            ));
        }
        if size % u64::from(logical) != 0 {
            return Err(Error::config(
                "path",
                format!("{name} is {size} bytes, not a multiple of {logical}"),
            ));
        }
        // Discard where a hole can be punched: probe past the end of the file, which changes
        // nothing that is stored.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let discard = !readonly && !is_block && sys::fallocate(fd, punch, size, 4096).is_ok();
        let memory = !direct && !is_block && sys::on_memory_fs(fd);
        let info = DiskInfo::new(size)
            .thread_model(if memory {
                ThreadModel::NonBlocking
            } else {
                ThreadModel::Parallel
            })
            .sector_size(logical)
            .physical_sector_size(physical.max(logical))
            .read_only(readonly)
            .flush(true)
            .discard(discard)
            .discard_granularity(if discard { meta_blksize(&meta) } else { 0 })
            .write_zeroes(!readonly);
        Ok(FileDisk {
            file,
            name,
            info,
            direct_mem_align,
        })
    }
}

fn meta_blksize(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    (meta.blksize() as u32).clamp(512, 1 << 20)
}

export_plugin!(FilePlugin);
