//! An example xen-disk plugin: a disk held in memory, gone when the guest detaches.
//! Copy this crate to start your own.

use std::sync::RwLock;
use xen_disk_plugin_api::*;

/// The disk: its bytes behind a lock (many readers, one writer at a time).
struct RamDisk {
    data: RwLock<Vec<u8>>,
}

impl RamDisk {
    /// The byte range of a request. The host only sends requests inside the disk, but a
    /// plugin that checks costs one comparison and can never be made to reach outside.
    fn range(&self, len: usize, offset: u64, size: usize) -> Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset)
            .map_err(|_| Error::new(ErrorKind::OutOfRange, "offset too large"))?;
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!("{offset}+{len} is outside the disk"),
            )),
        }
    }
}

impl Disk for RamDisk {
    fn info(&self) -> DiskInfo {
        let size = self.data.read().unwrap_or_else(|p| p.into_inner()).len();
        DiskInfo::new(size as u64)
            .write_zeroes(true)
            .thread_model(ThreadModel::NonBlocking)
    }

    fn read(&self, offset: u64, bufs: &mut ReadBufs) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|p| p.into_inner());
        let range = self.range(bufs.len(), offset, data.len())?;
        bufs.copy_from(&data[range]);
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &WriteBufs) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
        let range = self.range(bufs.len(), offset, data.len())?;
        bufs.copy_to(&mut data[range]);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
        let range = self.range(len as usize, offset, data.len())?;
        data[range].fill(0);
        Ok(())
    }
}

/// The plugin: what it is called, the keys it takes, how it opens a disk.
struct RamDiskPlugin;

impl Plugin for RamDiskPlugin {
    type Disk = RamDisk;
    const NAME: &'static str = "ramdisk";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "A disk in memory, lost on detach (example plugin)";
    const CONFIG_KEYS: &'static [ConfigKey] = &[ConfigKey::optional(
        "size",
        KeyType::Size,
        "64M",
        "Disk size (K, M, G suffixes)",
    )];

    fn open(config: &Config) -> Result<RamDisk> {
        let size = config.size("size")?;
        if size == 0 || size % 512 != 0 || size > 64 << 30 {
            return Err(Error::config(
                "size",
                format!("{size} must be a multiple of 512 up to 64G"),
            ));
        }
        Ok(RamDisk {
            data: RwLock::new(vec![0; size as usize]),
        })
    }
}

export_plugin!(RamDiskPlugin);
