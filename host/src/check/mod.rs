//! `xen-disk-host check`: the conformance suite for plugin authors.
//!
//! It opens the plugin's disk the way the host does (loaded `.so`, guarded by
//! [`GuardedDisk`]) and runs each case in `cases`, printing one
//! line per case and a closing `N passed, N failed` line. Data checks use a sparse model of
//! what was written: each written sector's content is derived from a per-write seed, so the
//! model costs 16 bytes a sector however large the disk.
//!
//! By default the suite only reads, like `qemu-img check` or `badblocks` without `-w`: the disk
//! it is given may be a real image, and the host cannot tell which of an arbitrary plugin's
//! keys names the data, so it can neither copy it aside nor promise to put back what a buggy
//! plugin wrote in the wrong place. Saving and restoring the touched ranges through the plugin
//! would rely on the very code under test, would still change a qcow2 or cow file's layout,
//! and would lose the data if the process died mid-case. So the write cases run only with
//! [`CheckOptions::destructive`] (`--destructive`), meant for a scratch image; without it they
//! are reported as skipped, naming the flag, and the layer that counts the plugin's calls
//! refuses every write, zeroing and discard, so no case can reach the plugin with one.

mod cases;
pub(crate) mod model;

use crate::plugin::{open_stack, GuardedDisk, Stack};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use xen_disk_plugin_api::{Config, Disk, DiskInfo, Error, ErrorKind, ReadBufs, Result, WriteBufs};

/// How to run the suite.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Threads for the concurrency case.
    pub threads: usize,
    /// Random writes in the pattern case.
    pub ops: usize,
    /// Seed for the random offsets and data.
    pub seed: u64,
    /// The disk stores no data (a null disk): run every call, skip content comparisons.
    pub no_data: bool,
    /// Run the cases that write: they overwrite the disk's data.
    pub destructive: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            threads: 4,
            ops: 200,
            seed: 0x5eed,
            no_data: false,
            destructive: false,
        }
    }
}

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Passed, with a detail line.
    Pass(String),
    /// Does not apply to this disk, with the reason.
    Skip(String),
    /// Failed, with what went wrong.
    Fail(String),
}

/// Every case's name and outcome.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// In run order.
    pub results: Vec<(&'static str, Outcome)>,
    /// The disk takes writes, but the cases that write were skipped (no `--destructive`).
    pub writes_skipped: bool,
}

impl CheckReport {
    /// Number of failed cases.
    pub fn failed(&self) -> usize {
        self.results
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Fail(_)))
            .count()
    }

    /// Number of passed cases.
    pub fn passed(&self) -> usize {
        self.results
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Pass(_)))
            .count()
    }

    /// Number of skipped cases.
    pub fn skipped(&self) -> usize {
        self.results
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Skip(_)))
            .count()
    }
}

/// The plugin's disk with a count of the calls that reach it, so cases can prove that
/// refused requests never did. Without `--destructive` it is also the fence that keeps every
/// change away from the plugin, whatever a case or a guard does.
struct Counting {
    inner: Box<dyn Disk>,
    calls: Arc<AtomicUsize>,
    writes_allowed: bool,
}

impl Counting {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }

    fn fence(&self) -> Result<()> {
        if self.writes_allowed {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::ReadOnly,
                "check writes to the disk only with --destructive",
            ))
        }
    }
}

impl Disk for Counting {
    fn info(&self) -> DiskInfo {
        self.inner.info()
    }
    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        self.count();
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.fence()?;
        self.count();
        self.inner.write(offset, bufs)
    }
    fn write_fua(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.fence()?;
        self.count();
        self.inner.write_fua(offset, bufs)
    }
    fn flush(&self) -> Result<()> {
        self.count();
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.fence()?;
        self.count();
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.fence()?;
        self.count();
        self.inner.write_zeroes(offset, len)
    }
}

/// Another handle on the same counted disk (for a second guard, e.g. read-only).
pub struct SharedDisk(Arc<dyn Disk>);

impl Disk for SharedDisk {
    fn info(&self) -> DiskInfo {
        self.0.info()
    }
    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        self.0.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.0.write(offset, bufs)
    }
    fn write_fua(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.0.write_fua(offset, bufs)
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.0.write_zeroes(offset, len)
    }
}

/// What each case gets.
pub struct Subject<'a> {
    /// The layers under test, top first ("cow over file").
    pub layers: String,
    /// The disk, guarded as the host serves it.
    pub disk: GuardedDisk,
    /// The same disk without the guard (counted).
    pub raw: Arc<dyn Disk>,
    /// Calls that reached the plugin so far.
    pub calls: Arc<AtomicUsize>,
    /// Options.
    pub opts: &'a CheckOptions,
    /// The plugin itself declares a read-only disk (the cases' guard may be read-only
    /// because of no `--destructive` alone).
    pub plugin_read_only: bool,
}

impl Subject<'_> {
    /// Another handle on the plugin's disk, for building a second guard.
    pub fn shared(&self) -> SharedDisk {
        SharedDisk(self.raw.clone())
    }
}

/// Runs the suite, calling `report` after each case (for live output).
pub fn run(
    spec: &str,
    config: &Config,
    opts: &CheckOptions,
    mut report: impl FnMut(&'static str, &Outcome),
) -> CheckReport {
    let mut out = CheckReport::default();
    let mut record = |name: &'static str, o: Outcome| {
        report(name, &o);
        out.results.push((name, o));
    };
    let Stack { disk, layers } = match open_stack(spec, config) {
        Ok(s) => s,
        Err(e) => {
            record("open", Outcome::Fail(e.to_string()));
            return out;
        }
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let raw: Arc<dyn Disk> = Arc::new(Counting {
        inner: Box::new(disk),
        calls: calls.clone(),
        writes_allowed: opts.destructive,
    });
    // The plugin's own view for the open line; without --destructive the cases get the
    // host's read-only guard over it, as `serve` gives a read-only disk.
    let guarded = GuardedDisk::new(Box::new(SharedDisk(raw.clone())), false).and_then(|full| {
        let info = full.info();
        let disk = if opts.destructive {
            full
        } else {
            GuardedDisk::new(Box::new(SharedDisk(raw.clone())), true)?
        };
        Ok((info, disk))
    });
    let (i, disk) = match guarded {
        Ok(d) => d,
        Err(e) => {
            record(
                "open",
                Outcome::Fail(format!("the plugin reports an invalid disk: {e}")),
            );
            return out;
        }
    };
    out.writes_skipped = !opts.destructive && !i.read_only;
    let layers = layers
        .iter()
        .map(|p| format!("{} {}", p.name, p.version))
        .collect::<Vec<_>>()
        .join(" over ");
    record(
        "open",
        Outcome::Pass(format!(
            "{layers}: {} bytes, sectors {}/{}, {:?}{}{}{}{}{}",
            i.size,
            i.logical_sector_size,
            i.physical_sector_size,
            i.thread_model,
            if i.read_only { ", read-only" } else { "" },
            if i.can_flush { ", flush" } else { "" },
            if i.can_fua { ", fua" } else { "" },
            if !i.can_discard {
                String::new()
            } else if i.discard_granularity > 0 || i.discard_alignment > 0 {
                // Granularity 0 means the physical sector size; alignment is ABI 1.1's.
                format!(
                    ", discard (granularity {}, alignment {})",
                    i.discard_granularity.max(i.physical_sector_size),
                    i.discard_alignment
                )
            } else {
                ", discard".to_string()
            },
            if i.can_write_zeroes {
                ", write-zeroes"
            } else {
                ""
            },
        )),
    );
    let subject = Subject {
        layers,
        disk,
        raw,
        calls,
        opts,
        plugin_read_only: i.read_only,
    };
    for (name, case) in cases::ALL {
        let started = Instant::now();
        let outcome =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&subject))) {
                Ok(o) => o,
                Err(_) => Outcome::Fail("the check itself panicked (see stderr)".into()),
            };
        let outcome = match outcome {
            Outcome::Pass(d) => {
                Outcome::Pass(format!("{d} ({} ms)", started.elapsed().as_millis()))
            }
            other => other,
        };
        record(name, outcome);
    }
    out
}
