//! `vhd`: VHD disk images (Microsoft's Virtual Hard Disk format): fixed, dynamic and
//! differencing, with parent chains of any depth up to 64.
//!
//! Data flow: the host calls [`VhdDisk`] (the `Disk` trait) → [`image::Image`] splits the
//! request per block and reads through the BAT ([`bat`]), sector bitmaps ([`bitmap`]) and the
//! parent chain ([`chain`]); on-disk structures are parsed into validated structs at the edge
//! ([`footer`], [`header`]).
//!
//! # Config
//! - `path` (required): the image file.
//! - `readonly` (default false): open read-only.
//! - `create` (optional): `"fixed"`, `"dynamic"` or `"differencing"`: create `path` first
//!   (refused if it exists). With `size` (required for fixed/dynamic; rounded up to the CHS
//!   geometry like other VHD tools do), `block-size` (default 2M; power of two, 4K..256M),
//!   `parent` (required for differencing; its size is used).
//!
//! # Behaviour
//! - Thread model: parallel. Reads share an `RwLock` read guard and use `pread`, so reads run
//!   concurrently; writes take the write guard.
//! - `flush` is fdatasync of the image file (parents are read-only).
//! - Writes never touch parents: blocks are allocated in the child in the order data, bitmap,
//!   BAT entry, footer. Discard and write-zeroes are not declared: a VHD cannot free a block
//!   (no BAT entry may be cleared safely while a parent would then show through), and the host
//!   emulates write-zeroes by writing zero buffers.
//! - Refused on open with one `corrupt` error naming the file and field: bad cookie or
//!   checksum, unsupported version or type, sizes beyond 2040 GiB, BAT entries outside the
//!   data area or overlapping, missing parent, parent UUID mismatch, parent loops.
//! - A footer at the end of the file that fails its checks is replaced by the copy in
//!   sector 0 (a crash mid-allocation); the next allocation rewrites the end footer.
//!
//! # Benchmark
//! `examples/vhd_bench.rs` repeats `qemu-img bench`'s sequential depth-1 pattern on the same
//! image:
//! ```text
//! qemu-img create -f vpc /tmp/b.vhd 1G
//! cargo build --release -p xen-disk-plugin-vhd --example vhd_bench
//! target/release/examples/vhd_bench /tmp/b.vhd 20000 4K write       # or read; 500 1M ...
//! qemu-img bench -f vpc -t writeback -d 1 -c 20000 -s 4K -w /tmp/b.vhd
//! ```
//!
//! # Fuzzing
//! `cd plugins/vhd/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run open_read -- -max_total_time=600`

pub mod bat;
pub mod bitmap;
pub mod chain;
pub mod create;
pub mod footer;
pub mod header;
pub mod image;

use image::Image;
use std::sync::RwLock;
use xen_disk_plugin_api::*;

/// One open VHD.
pub struct VhdDisk {
    info: DiskInfo,
    image: RwLock<Image>,
}

impl VhdDisk {
    fn check(&self, offset: u64, len: usize) -> Result<()> {
        let end = offset.checked_add(len as u64);
        if !offset.is_multiple_of(512)
            || !len.is_multiple_of(512)
            || end.is_none_or(|e| e > self.info.size)
        {
            return Err(Error::io(
                22,
                format!("request at {offset} of {len} bytes is outside the disk or unaligned"),
            ));
        }
        Ok(())
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::msg("vhd: image lock poisoned by an earlier panic")
}

impl Disk for VhdDisk {
    fn info(&self) -> DiskInfo {
        self.info
    }

    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        self.check(offset, bufs.len())?;
        let mut tmp = vec![0u8; bufs.len()];
        self.image
            .read()
            .map_err(poisoned)?
            .read(offset, &mut tmp)?;
        bufs.copy_from(&tmp);
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.check(offset, bufs.len())?;
        let mut tmp = vec![0u8; bufs.len()];
        bufs.copy_to(&mut tmp);
        self.image.write().map_err(poisoned)?.write(offset, &tmp)
    }

    fn flush(&self) -> Result<()> {
        self.image.read().map_err(poisoned)?.flush()
    }
}

/// The plugin.
pub struct VhdPlugin;

impl Plugin for VhdPlugin {
    type Disk = VhdDisk;
    const NAME: &'static str = "vhd";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "VHD images: fixed, dynamic, differencing";
    const CONFIG_KEYS: &'static [ConfigKey] = &[
        ConfigKey::required("path", KeyType::Path, "The VHD image file"),
        ConfigKey::optional("readonly", KeyType::Bool, "false", "Open read-only"),
        ConfigKey::maybe(
            "create",
            KeyType::String,
            "Create the image first: fixed, dynamic or differencing",
        ),
        ConfigKey::maybe(
            "size",
            KeyType::Size,
            "Size of a created image (rounded up to CHS geometry)",
        ),
        ConfigKey::optional(
            "block-size",
            KeyType::Size,
            "2M",
            "Block size of a created sparse image",
        ),
        ConfigKey::maybe(
            "parent",
            KeyType::Path,
            "Parent of a created differencing image",
        ),
    ];

    fn open(config: &Config) -> Result<VhdDisk> {
        let path = config.path("path")?;
        let readonly = config.bool("readonly")?;
        if let Some(kind) = config.opt_str("create")? {
            let bs = config.size("block-size")?;
            let bs = u32::try_from(bs).map_err(|_| Error::config("block-size", "too large"))?;
            let size = config.opt_size("size")?.unwrap_or(0);
            let parent = config.opt_path("parent")?;
            let kind = match (kind, &parent) {
                ("fixed", _) => create::Kind::Fixed,
                ("dynamic", _) => create::Kind::Dynamic,
                ("differencing", Some(p)) => create::Kind::Differencing { parent: p },
                ("differencing", None) => {
                    return Err(Error::config(
                        "parent",
                        "is required with create = \"differencing\"",
                    ))
                }
                (k, _) => {
                    return Err(Error::config(
                        "create",
                        format!("{k:?} is not fixed, dynamic or differencing"),
                    ))
                }
            };
            if size == 0 && !matches!(kind, create::Kind::Differencing { .. }) {
                return Err(Error::config(
                    "size",
                    "is required when creating a fixed or dynamic image",
                ));
            }
            create::create(&path, kind, size, bs)?;
        }
        let image = Image::open(&path, !readonly)?;
        let info = DiskInfo::new(image.size())
            .read_only(readonly)
            .thread_model(ThreadModel::Parallel)
            .flush(true);
        Ok(VhdDisk {
            info,
            image: RwLock::new(image),
        })
    }
}

export_plugin!(VhdPlugin);
