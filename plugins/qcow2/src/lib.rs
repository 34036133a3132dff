//! `qcow2`: qcow2 disk images (versions 2 and 3), implemented from QEMU's published format
//! specification (docs/interop/qcow2.txt).
//!
//! Supported: cluster sizes 4 KiB..2 MiB; refcounts of any width (read and written); backing
//! chains of qcow2 and raw images (backing format honoured, probed by magic when absent,
//! loops refused); compressed (deflate) clusters read, and rewritten uncompressed when
//! written; v3 zero clusters for `discard` and `write_zeroes`; copy-on-write of partial
//! clusters. Refused with a clear error: encryption, external data files, extended L2
//! entries, zstd compression; images with internal snapshots or marked corrupt open read-only
//! only (snapshots are ignored, never modified). A dirty image (lazy refcounts after a crash)
//! opened writable has its refcounts rebuilt from the L1/L2 tables first ([`repair`]).
//!
//! Config:
//! - `path` (required): the image file.
//! - `readonly` (default false).
//! - `create` (default false): create a v3 image at `path` if no file exists there (an
//!   existing file is opened as is). With it: `size` (required unless `backing` is given,
//!   then the backing image's size), `cluster-size` (default 64K), `backing` (path written
//!   into the header, relative to the image's directory), `backing-format` (`qcow2` or
//!   `raw`, default `qcow2`).
//!
//! Data flow: the host calls [`Qcow2Disk`] through the stable ABI; it maps guest offsets
//! through [`image::Image`] (L1/L2 in `l1l2`, refcounts in `refcount`, backing in `backing`,
//! deflate in `compressed`) onto `pread`/`pwrite` of the image file.
//!
//! Durability: guest data is written at once; metadata (L1/L2 entries, refcounts) is cached
//! and written at `flush`, on close, or when the dirty set passes 32 MiB, in crash-safe
//! order (refcounts and data, `fdatasync`, then the pointers to them; see [`image`]), so a
//! power loss or kill leaves a consistent image (at worst leaked clusters) holding every
//! flushed write. Multi-cluster writes to unallocated space get one contiguous host range
//! (one data `pwrite`). The refcount table grows (moves to the end of the file) when the
//! file outgrows it.
//!
//! Thread model: `Parallel`. Reads, and writes into already-allocated clusters, share a
//! reader lock on the metadata and `pread`/`pwrite` in parallel; allocating writes,
//! discards and flushes take it exclusively.

pub mod backing;
pub mod compressed;
pub mod header;
pub mod image;
pub mod l1l2;
pub mod redo;
pub mod refcount;
pub mod repair;

use image::Image;
use std::path::Path;
use xen_disk_plugin_api::*;

/// An open qcow2 disk.
pub struct Qcow2Disk {
    image: Image,
    info: DiskInfo,
}

impl Qcow2Disk {
    /// The image behind the disk.
    pub fn image(&self) -> &Image {
        &self.image
    }
}

impl Disk for Qcow2Disk {
    fn info(&self) -> DiskInfo {
        self.info
    }

    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        // The whole request first: past the end is an error, and `pos` cannot overflow.
        self.image.check_range(offset, bufs.len() as u64)?;
        let mut pos = offset;
        let mut res = Ok(());
        bufs.for_each_mut(|_, b| {
            if res.is_ok() {
                res = self.image.read_at(pos, b);
                pos += b.len() as u64;
            }
        });
        res
    }

    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.image.check_range(offset, bufs.len() as u64)?;
        if bufs.count() == 1 {
            return self.image.write_at(offset, bufs.get(0));
        }
        // Several segments (a guest request in pages): one write, so clusters are
        // allocated as one run instead of copy-on-write per segment.
        let mut all = vec![0u8; bufs.len()];
        bufs.copy_to(&mut all);
        self.image.write_at(offset, &all)
    }

    fn flush(&self) -> Result<()> {
        self.image.flush()
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.image.extents(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.image.zero_range(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.image.zero_range(offset, len, false)
    }
}

/// The plugin.
pub struct Qcow2Plugin;

impl Plugin for Qcow2Plugin {
    type Disk = Qcow2Disk;
    const NAME: &'static str = "qcow2";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "qcow2 v2/v3 images with backing chains and compressed clusters";
    const CONFIG_KEYS: &'static [ConfigKey] = &[
        ConfigKey::required("path", KeyType::Path, "The qcow2 image file"),
        ConfigKey::optional("readonly", KeyType::Bool, "false", "Open read-only"),
        ConfigKey::optional(
            "create",
            KeyType::Bool,
            "false",
            "Create the image if the file does not exist",
        ),
        ConfigKey::maybe("size", KeyType::Size, "Virtual size for create"),
        ConfigKey::optional(
            "cluster-size",
            KeyType::Size,
            "64K",
            "Cluster size for create (4K..2M)",
        ),
        ConfigKey::maybe("backing", KeyType::Path, "Backing file for create"),
        ConfigKey::optional(
            "backing-format",
            KeyType::String,
            "qcow2",
            "Backing format for create: qcow2 or raw",
        ),
    ];

    fn open(config: &Config) -> Result<Qcow2Disk> {
        let path = config.path("path")?;
        let readonly = config.bool("readonly")?;
        if config.bool("create")? && !path.exists() {
            let backing = config.opt_str("backing")?;
            let format = config.str("backing-format")?;
            if format != "qcow2" && format != "raw" {
                return Err(Error::config(
                    "backing-format",
                    format!("{format:?} is not qcow2 or raw"),
                ));
            }
            let size = match (config.opt_size("size")?, backing) {
                (Some(s), _) => s,
                (None, Some(b)) => {
                    let p = match Path::new(b) {
                        p if p.is_absolute() => p.to_path_buf(),
                        p => path.parent().unwrap_or(Path::new(".")).join(p),
                    };
                    let bk =
                        backing::Backing::open(&path, &p.display().to_string(), Some(format), &[])?;
                    match bk {
                        backing::Backing::Raw { size, .. } => size,
                        backing::Backing::Qcow2(img) => img.size(),
                    }
                }
                (None, None) => {
                    return Err(Error::config("size", "required with create and no backing"))
                }
            };
            image::create(
                &path,
                size,
                config.size("cluster-size")?,
                backing.map(|b| (b, format)),
            )?;
        }
        let image = Image::open(&path, readonly, &[])?;
        let cs = image.header().cluster_size();
        let discard_ok = image.header().version >= 3;
        let info = DiskInfo::new(image.size())
            .read_only(readonly)
            .flush(true)
            .discard(discard_ok)
            .write_zeroes(true)
            .discard_granularity(cs as u32)
            .thread_model(ThreadModel::Parallel);
        Ok(Qcow2Disk { image, info })
    }
}

export_plugin!(Qcow2Plugin);
