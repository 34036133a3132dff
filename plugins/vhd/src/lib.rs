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
//! - Thread model: parallel. Reads, and writes into blocks already allocated, share an
//!   `RwLock` read guard, so they run concurrently; only a write that allocates a block
//!   takes the write guard. A one-page request goes straight to or from the guest's page; a
//!   longer one through one buffer, so the BAT and bitmaps are walked once per request.
//! - `flush` is fdatasync of the image file (parents are read-only).
//! - Writes never touch parents: blocks are allocated in the child in the order data, bitmap,
//!   BAT entry, footer.
//! - `write_zeroes` is native: ranges in allocated blocks are punched out of the file
//!   (`fallocate` PUNCH_HOLE; zeroes are written where the file system cannot), unallocated
//!   blocks of a disk without parent are left alone (they already read as zero), and in a
//!   differencing disk a block is allocated with its bitmap bits set and no data written, so
//!   the parent no longer shows through.
//! - `discard` punches the data of allocated blocks in the range and changes no metadata:
//!   the space goes back to the file system and cannot corrupt the image on a crash. The
//!   range then reads as zeroes, except sectors a differencing disk never wrote, which still
//!   read from its parent. No BAT entry is ever cleared (VHD has no way to reuse the space
//!   of a freed block, and a cleared entry would expose the parent).
//! - Refused on open with one `corrupt` error naming the file and field: bad cookie or
//!   checksum, unsupported version or type, sizes beyond 2040 GiB, BAT entries outside the
//!   data area or overlapping, missing parent, parent UUID mismatch, parent loops.
//! - A footer at the end of the file that fails its checks is replaced by the copy in
//!   sector 0 (a crash mid-allocation); the next allocation rewrites the end footer.
//!
//! # Benchmark
//! `xen-disk-host bench --direct` drives the plugin through its `.so` and, with `--qemu-img
//! vpc`, repeats the same requests with `qemu-img bench -f vpc` on the same image (on a copy
//! taken before the plugin's pass, for writes):
//! ```text
//! qemu-img create -f vpc /tmp/b.vhd 512M
//! xen-disk-host bench --direct vhd -c path=/tmp/b.vhd --rw write --bs 4k --qemu-img vpc
//! xen-disk-host bench --direct vhd -c path=/tmp/b.vhd --rw read --bs 1M --qemu-img vpc
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
        self.check_len(offset, len as u64)
    }

    fn check_len(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len);
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
        let image = self.image.read().map_err(poisoned)?;
        if bufs.count() == 1 {
            // Straight into the guest's page.
            return image.read(offset, bufs.get_mut(0));
        }
        // Several pages: one pass over the BAT and bitmaps and one `pread` per run, then a
        // copy, which costs less than a lookup and a system call per page.
        let mut tmp = vec![0u8; bufs.len()];
        image.read(offset, &mut tmp)?;
        bufs.copy_from(&tmp);
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.check(offset, bufs.len())?;
        let len = bufs.len() as u64;
        {
            // Writes into allocated blocks change no metadata but bitmap bits: they share
            // the image with reads and each other.
            let image = self.image.read().map_err(poisoned)?;
            if image.is_allocated(offset, len) {
                if bufs.count() == 1 {
                    return image.write_in_place(offset, len, image::Src::Data(bufs.get(0)));
                }
                // Several pages: one write, so a differencing disk's bitmap is updated
                // once, not once per page.
                let mut tmp = vec![0u8; bufs.len()];
                bufs.copy_to(&mut tmp);
                return image.write_in_place(offset, len, image::Src::Data(&tmp));
            }
        }
        let mut image = self.image.write().map_err(poisoned)?;
        if bufs.count() == 1 {
            return image.write(offset, bufs.get(0));
        }
        // Several segments: one write, so a new block is allocated once for all of them.
        let mut tmp = vec![0u8; bufs.len()];
        bufs.copy_to(&mut tmp);
        image.write(offset, &tmp)
    }

    fn flush(&self) -> Result<()> {
        self.image.read().map_err(poisoned)?.flush()
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_len(offset, len)?;
        self.image.read().map_err(poisoned)?.extents(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_len(offset, len)?;
        self.image.read().map_err(poisoned)?.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_len(offset, len)?;
        {
            let image = self.image.read().map_err(poisoned)?;
            if image.is_allocated(offset, len) {
                return image.write_in_place(offset, len, image::Src::Zeroes);
            }
        }
        self.image
            .write()
            .map_err(poisoned)?
            .store(offset, len, image::Src::Zeroes)
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
            .flush(true)
            .discard(!readonly)
            .write_zeroes(!readonly);
        Ok(VhdDisk {
            info,
            image: RwLock::new(image),
        })
    }
}

export_plugin!(VhdPlugin);
