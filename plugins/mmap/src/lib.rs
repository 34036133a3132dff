//! `mmap`: a disk served from a memory-mapped image file.
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `path` | path | required | the image file (size a multiple of 512) |
//! | `shared` | bool | `true` | `true`: writes go to the file (`MAP_SHARED`, flush = `msync`). `false`: copy-on-write — the file is opened read-only and mapped `MAP_PRIVATE`; the guest sees its own writes for the session and the file never changes |
//!
//! Reads and writes are copies between the guest's pages and the mapping, from any number
//! of threads at once: the guest, not the plugin, orders overlapping requests.

use memmap2::{MmapMut, MmapOptions};
use std::fs::{File, OpenOptions};
use std::path::Path;
use xen_disk_plugin_api::*;

/// An open mapping.
pub struct MmapDisk {
    map: MmapMut,
    base: *mut u8,
    shared: bool,
}

// SAFETY: `base` points into `map`, which lives as long as the disk; concurrent copies in and
// out of distinct or overlapping ranges are plain byte copies whose ordering the guest owns,
// as with any disk.
unsafe impl Send for MmapDisk {}
// SAFETY: as above.
unsafe impl Sync for MmapDisk {}

impl MmapDisk {
    /// The start of `[offset, offset + len)` in the mapping. The host checks ranges first;
    /// this check keeps a direct caller (a filter above us, a test) from reaching outside.
    fn at(&self, offset: u64, len: usize) -> Result<usize> {
        match (offset as usize).checked_add(len) {
            Some(end) if offset <= usize::MAX as u64 && end <= self.map.len() => {
                Ok(offset as usize)
            }
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{offset}+{len} is outside the {}-byte image",
                    self.map.len()
                ),
            )),
        }
    }
}

impl Disk for MmapDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo::new(self.map.len() as u64).flush(self.shared)
    }

    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        let mut at = self.at(offset, bufs.len())?;
        for i in 0..bufs.count() {
            let dst = bufs.get_mut(i);
            // SAFETY: `at` checked offset + len ≤ size, so [at, at + dst.len()) is inside the
            // mapping; dst is a distinct guest buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(self.base.add(at), dst.as_mut_ptr(), dst.len())
            };
            at += dst.len();
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        let mut at = self.at(offset, bufs.len())?;
        for (_, src) in bufs.iter() {
            // SAFETY: inside the mapping as in read; the mapping is writable (MAP_SHARED on a
            // read-write file, or MAP_PRIVATE copy-on-write).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(at), src.len()) };
            at += src.len();
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.shared {
            self.map.flush()?;
        }
        Ok(())
    }
}

/// Opens `path` for the plugin, with errors naming the file.
fn open_image(path: &Path, writable: bool) -> Result<File> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| Error::from(e).context(&shown))?;
    if meta.is_dir() {
        return Err(Error::config("path", format!("{shown} is a directory")));
    }
    let len = meta.len();
    if len == 0 {
        return Err(Error::config("path", format!("{shown} is empty (0 bytes)")));
    }
    if len % 512 != 0 {
        return Err(Error::config(
            "path",
            format!("{shown} is {len} bytes, not a multiple of 512"),
        ));
    }
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| {
            let e = Error::from(e).context(&shown);
            if writable {
                e.read_only_hint("shared=false; the guest's writes then stay in memory")
            } else {
                e
            }
        })
}

/// The plugin.
pub struct MmapPlugin;

impl Plugin for MmapPlugin {
    type Disk = MmapDisk;
    const NAME: &'static str = "mmap";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Memory-mapped image file, shared (writes persist) or copy-on-write";
    const CONFIG_KEYS: &'static [ConfigKey] = &[
        ConfigKey::required("path", KeyType::Path, "Image file (size a multiple of 512)"),
        ConfigKey::optional(
            "shared",
            KeyType::Bool,
            "true",
            "Write through to the file; false = copy-on-write, file untouched",
        ),
    ];

    fn open(config: &Config) -> Result<MmapDisk> {
        let path = config.path("path")?;
        let shared = config.bool("shared")?;
        let file = open_image(&path, shared)?;
        let shown = path.display();
        // SAFETY: mapping a file is sound as long as nobody truncates it under us; an image
        // file given to a disk backend is the backend's for the session.
        let mut map = unsafe {
            if shared {
                MmapOptions::new().map_mut(&file)
            } else {
                MmapOptions::new().map_copy(&file)
            }
        }
        .map_err(|e| Error::from(e).context(format!("{shown}: mmap")))?;
        let base = map.as_mut_ptr();
        Ok(MmapDisk { map, base, shared })
    }
}

export_plugin!(MmapPlugin);
