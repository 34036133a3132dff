//! `discard`: a null disk. Every read and write succeeds without touching data, like
//! MirageOS xen-disk's DISCARD backend; it measures the ring path itself, nothing else.
//!
//! Config: `size` (default 1 GiB), `sector-size` (512 or 4096, default 512).

use xen_disk_plugin_api::*;

/// The null disk.
pub struct DiscardDisk {
    info: DiskInfo,
}

impl Disk for DiscardDisk {
    fn info(&self) -> DiskInfo {
        self.info
    }

    /// Leaves the buffers as they are: nothing is stored, so nothing is read.
    fn read(&self, _offset: u64, _bufs: &mut ReadBufs<'_>) -> Result<()> {
        Ok(())
    }

    fn write(&self, _offset: u64, _bufs: &WriteBufs<'_>) -> Result<()> {
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
}

/// The plugin.
pub struct DiscardPlugin;

impl Plugin for DiscardPlugin {
    type Disk = DiscardDisk;
    const NAME: &'static str = "discard";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Null disk: reads and writes succeed and touch no data";
    const CONFIG_KEYS: &'static [ConfigKey] = &[
        ConfigKey::optional(
            "size",
            KeyType::Size,
            "1G",
            "Disk size in bytes (suffixes K, M, G, T)",
        ),
        ConfigKey::optional(
            "sector-size",
            KeyType::Integer,
            "512",
            "Logical sector size: 512 or 4096",
        ),
    ];

    fn open(config: &Config) -> Result<DiscardDisk> {
        let size = config.size("size")?;
        let sector = config.u64("sector-size")?;
        if sector != 512 && sector != 4096 {
            return Err(Error::config(
                "sector-size",
                format!("must be 512 or 4096, not {sector}"),
            ));
        }
        if size == 0 || size % sector != 0 {
            return Err(Error::config(
                "size",
                format!("must be a non-zero multiple of {sector} bytes, not {size}"),
            ));
        }
        let info = DiskInfo::new(size)
            .sector_size(sector as u32)
            .flush(true)
            .discard(true)
            .write_zeroes(true)
            .thread_model(ThreadModel::NonBlocking);
        Ok(DiscardDisk { info })
    }
}

export_plugin!(DiscardPlugin);
