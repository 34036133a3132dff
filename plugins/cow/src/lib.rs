//! `cow`: a copy-on-write filter over any base disk.
//!
//! The guest sees the base with its own writes on top; the base is never written. Writes
//! land in an *overlay*, per granule: a write that covers part of a granule first copies
//! the granule up from the base. Reads take each granule from the overlay if it is there,
//! from the base if not (a read of untouched granules goes straight to the base).
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `overlay` | path | none: in memory | the overlay file, created if absent, kept across reopen. Without it the overlay lives in memory (a sparse `memfd`) and is discarded on close, like `mmap shared=false` over any base |
//! | `granularity` | size | `64K`, or an existing file's | the copy-up unit: a power of two from the base's sector size to `1G`. Must match an existing overlay file's |
//! | `trust-base` | bool | `false` | open an overlay file over a base other than the one it records (see below) |
//!
//! ```text
//! xen-disk-host connect guest1 --plugin cow -c overlay=/var/lib/lab/g1.cow \
//!     -c base=vhd -c base.path=/srv/gold.vhd
//! ```
//!
//! The base is always opened read-only: cow declares `READ_ONLY_BASE`, so the host opens
//! the base stack with `readonly=true` (`shared=false` for mmap), refuses a user's
//! `base.readonly=false`, and blocks writes for bases without such a key. Cow itself only
//! ever calls the base's `info` and `read`.
//!
//! The overlay file records the base's size and the granularity; opening it over a base of
//! another size, or with another `granularity`, is refused with a line naming the file.
//! It also records which base it was made over: a fingerprint of the base's content (its
//! first and last MiB and 16 blocks between them, see [`overlay::Fingerprint`]). Opening it
//! over a base whose samples differ is refused with a line naming the file and the parts
//! that differ: the overlay's granules only make sense over the bytes they were written
//! over. `trust-base=true` opens it anyway (a base known to be the same disk, changed
//! where it does not matter). Overlay files made before the fingerprint (header version 1)
//! record no base and open over any base of their size, as they always did; `cow commit`
//! warns about them and records the base it commits into, and deleting an empty one (after
//! `cow reset`) lets the next open make a file that records its base.
//! A truncated or damaged file (magic, checksum, layout) is refused as corrupt. See
//! [`overlay`] for the file layout and why its bitmap is crash-safe.
//!
//! Capabilities: `flush` (file mode: data, then bitmap — see [`overlay`]), `discard` and
//! `write-zeroes` (both make the range read as zeroes, stored in the overlay). Parallel:
//! reads take no lock (one atomic bit per granule); copy-ups lock one of 64 stripes.
//!
//! Offline, for test labs: `xen-disk-host cow reset --overlay PATH` empties an overlay, and
//! `xen-disk-host cow commit --overlay PATH <base-plugin> -c ...` writes it down into the
//! base opened writable, then empties it.

mod disk;
pub mod overlay;

pub use disk::{CowDisk, ReadOnlyBase};
use overlay::{BaseView, Overlay};
use xen_disk_plugin_api::*;

/// The filter.
pub struct CowFilter;

impl Filter for CowFilter {
    type Disk = CowDisk;
    const NAME: &'static str = "cow";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Copy-on-write over a read-only base: overlay in memory or in a sparse file";
    const CONFIG_KEYS: &'static [ConfigKey] = &[
        ConfigKey::maybe(
            "overlay",
            KeyType::Path,
            "Overlay file (created if absent, kept); none = in memory, discarded on close",
        ),
        ConfigKey::maybe(
            "granularity",
            KeyType::Size,
            "Copy-up unit, a power of two ≥ the sector size (default 64K, or the file's)",
        ),
        ConfigKey::maybe(
            "trust-base",
            KeyType::Bool,
            "Open the overlay file over this base even if it is not the base the file records (default false)",
        ),
    ];
    const READ_ONLY_BASE: bool = true;

    fn open(config: &Config, base: ForeignDisk) -> Result<CowDisk> {
        let b = base.info();
        let granularity = config.opt_size("granularity")?;
        if let Some(g) = granularity {
            overlay::check_granularity(g, b.logical_sector_size)?;
        }
        let trust_base = config.opt_bool("trust-base")?.unwrap_or(false);
        let base = ReadOnlyBase::new(base);
        let overlay = match config.opt_path("overlay")? {
            Some(path) => {
                let view = BaseView {
                    size: b.size,
                    sector: b.logical_sector_size,
                    read: &|at, buf| base.read(at, buf),
                };
                Overlay::open_or_create(&path, &view, granularity, trust_base)?
            }
            None => {
                Overlay::in_memory(b.size, granularity.unwrap_or(overlay::DEFAULT_GRANULARITY))?
            }
        };
        // An existing file's granularity was checked against the sector size it was made
        // with; check it against this base's too.
        overlay::check_granularity(overlay.header().granularity, b.logical_sector_size)
            .map_err(|e| e.context(overlay.name()))?;
        Ok(CowDisk::new(base, overlay))
    }
}

export_filter!(CowFilter);
