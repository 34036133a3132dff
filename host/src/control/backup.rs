//! Live backup of a device's disk while its guest runs: `snapshot` and `commit`.
//!
//! ```text
//!  snapshot <dev> --nbd unix:PATH|tcp:HOST:PORT [--name NAME] [-c key=value]...
//!    guest ─▶ GuardedDisk ─▶ cow overlay (memory, or -c overlay=FILE) ─▶ frozen base
//!                                                          NBD export (read-only) ─┘
//!  commit <dev>
//!    overlay blocks copied into the base while the guest writes (passes), the last few
//!    during a drain-and-swap pause, then the base is plugged back and the overlay dropped
//! ```
//!
//! A snapshot freezes the disk as `ctl swap` does (drain the requests in flight, flush, switch)
//! and puts the `cow` filter over the plugin stack the device serves: from that instant
//! the guest's writes land in the overlay and the stack below (the *base*) no longer
//! changes, and the base is exported read-only over NBD for a backup tool to copy.
//!
//! From the first snapshot on, the guard marks every block the guest writes in a dirty map
//! (64 KiB blocks). Each snapshot starts a new map at the freeze; the map of the writes
//! between the previous snapshot and this one is published on this snapshot's export as
//! `qemu:dirty-bitmap:<previous snapshot's name>`, so an incremental backup copies only
//! those blocks (`nbdinfo --map=qemu:dirty-bitmap:NAME`, or qemu's backup jobs).
//!
//! `commit` closes the export (its clients are disconnected: the base is about to change),
//! copies the blocks written since the snapshot from the device's disk into the base while
//! the guest goes on writing (a write during the copy marks its block again, so it is
//! copied again), and when few are left, pauses the guest as a swap does, copies the rest
//! and plugs the base back in. A failed commit leaves the overlay serving (retry it).

use crate::backend::registry::Entry;
use crate::backend::stack_record;
use crate::nbd::{self, Export, Listen, Server};
use crate::plugin::loader::load_spec;
use crate::plugin::{DirtyMap, GuardedDisk};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use xen_disk_plugin_api::{
    export_disk, with_read_bufs, with_write_bufs, Config, Disk, DiskInfo, Extent, ForeignDisk,
    ReadBufs, Result, Submission, ThreadModel, WriteBufs,
};

/// Bytes per dirty-map bit (qemu's default dirty bitmap granularity).
pub const DIRTY_GRANULARITY: u64 = 64 * 1024;

/// A commit stops copying live and pauses the guest when at most this many blocks are left.
pub const FINAL_BLOCKS: usize = 16;

/// Live passes before a commit pauses the guest whatever is left.
pub const MAX_PASSES: usize = 16;

/// A device's backups.
struct Backups {
    /// Snapshots taken so far (names the next by default).
    taken: u32,
    /// The open snapshot.
    open: Option<Open>,
    /// The writes since the last snapshot, and its name.
    since: Option<(String, Arc<DirtyMap>)>,
}

/// An open snapshot.
struct Open {
    name: String,
    /// The disk plugged before the snapshot, plugged back by commit.
    below: Arc<dyn Disk>,
    /// The same, shared with the overlay and the export.
    base: Arc<dyn Disk>,
    /// The overlay plugged now.
    top: Arc<dyn Disk>,
    stack: String,
    server: Option<Server>,
}

/// Every device's backups, by the address of the device's disk (unique among live devices,
/// and per process: two registries never share a disk), beside that disk: while it is held
/// its address is not reused, and a device that is gone is noticed (its state is dropped, an
/// open export closed). Each device's state has a lock of its own, held by a snapshot or a
/// commit for as long as it runs (a commit copies the whole overlay): the map's lock is held
/// only to find it, so a long commit on one device holds up no other device's requests.
static BACKUPS: Mutex<Option<HashMap<usize, Device>>> = Mutex::new(None);

/// One device's entry in [`BACKUPS`].
struct Device {
    disk: Weak<GuardedDisk>,
    state: Arc<Mutex<Backups>>,
}

/// A disk shared by several users (the device's overlay, the export, a commit), one at a
/// time when it asked to be serialized.
struct Shared {
    disk: Arc<dyn Disk>,
    serial: Option<Arc<Mutex<()>>>,
}

impl Shared {
    fn lock(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Disk for Shared {
    fn info(&self) -> DiskInfo {
        self.disk.info()
    }
    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        let _s = self.lock();
        self.disk.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        let _s = self.lock();
        self.disk.write(offset, bufs)
    }
    fn write_fua(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        let _s = self.lock();
        self.disk.write_fua(offset, bufs)
    }
    fn flush(&self) -> Result<()> {
        let _s = self.lock();
        self.disk.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _s = self.lock();
        self.disk.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _s = self.lock();
        self.disk.write_zeroes(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let _s = self.lock();
        self.disk.extents(offset, len)
    }
    fn submit(&self, submission: Submission) {
        let _s = self.lock();
        self.disk.submit(submission)
    }
}

/// The words of a `snapshot` request.
struct SnapshotArgs {
    listen: Listen,
    name: Option<String>,
    cow: Vec<String>,
}

fn parse_snapshot(words: &[&str]) -> std::result::Result<SnapshotArgs, String> {
    let (mut listen, mut name, mut cow) = (None, None, Vec::new());
    let mut it = words.iter();
    while let Some(&w) = it.next() {
        let mut value = || {
            it.next()
                .copied()
                .ok_or_else(|| format!("snapshot: {w} needs a value after it"))
        };
        match w {
            "--nbd" => listen = Some(Listen::parse(value()?).map_err(|e| format!("--nbd {e}"))?),
            "--name" => {
                let n = value()?;
                if n.is_empty() || n.len() > 200 || !n.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!("snapshot: --name `{n}`: printable, no spaces, at most 200 bytes"));
                }
                name = Some(n.to_string());
            }
            "-c" | "--config" => cow.push(value()?.to_string()),
            _ => {
                return Err(format!(
                    "snapshot: unknown word {w} (--nbd unix:PATH|tcp:HOST:PORT, --name NAME, -c key=value for the overlay)"
                ))
            }
        }
    }
    let listen = listen.ok_or("snapshot: --nbd unix:PATH or --nbd tcp:HOST:PORT is required")?;
    Ok(SnapshotArgs { listen, name, cow })
}

/// Runs `f` on the device's backup state; refuses at once while another snapshot or commit
/// of the same device runs, rather than leaving the asker waiting for a copy of unknown length.
fn with_state<T>(
    e: &Entry,
    f: impl FnOnce(&mut Backups) -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    let device = {
        let mut all = BACKUPS.lock().unwrap_or_else(|p| p.into_inner());
        let all = all.get_or_insert_with(HashMap::new);
        all.retain(|_, d| d.disk.strong_count() > 0);
        all.entry(Arc::as_ptr(&e.disk) as usize)
            .or_insert_with(|| Device {
                disk: Arc::downgrade(&e.disk),
                state: Arc::new(Mutex::new(Backups {
                    taken: 0,
                    open: None,
                    since: None,
                })),
            })
            .state
            .clone()
    };
    let mut state = match device.try_lock() {
        Ok(s) => s,
        // A request that panicked left the state as consistent as any failed one.
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            return Err(format!(
                "{}: a snapshot or commit of this device is still running; ask again when it \
                 has answered",
                e.id
            ))
        }
    };
    f(&mut state)
}

/// Drops an open snapshot whose overlay a `ctl swap` replaced (its export closes); returns
/// its name.
fn drop_if_swapped_away(e: &Entry, state: &mut Backups) -> Option<String> {
    let open = state.open.as_ref()?;
    if Arc::ptr_eq(&e.disk.current(), &open.top) {
        return None;
    }
    let name = open.name.clone();
    tracing::warn!(id = %e.id, "snapshot {name}: its overlay was swapped out; dropped");
    state.open = None;
    Some(name)
}

/// `snapshot <dev> --nbd unix:PATH|tcp:HOST:PORT [--name NAME] [-c key=value]...`
pub fn snapshot(e: &Entry, words: &[&str]) -> std::result::Result<String, String> {
    let mut args = parse_snapshot(words)?;
    // With a journal, the overlay is a file beside it (on the state dir's tmpfs, as a
    // memory overlay would be in RAM) and is recorded before the freeze: a serve taking the
    // device over after a crash writes it into the disk, so no write the guest made after
    // the snapshot is lost with the process.
    let record = e.journal.as_ref().map(|j| {
        let given = args.cow.iter().find_map(|p| p.strip_prefix("overlay="));
        match given {
            Some(path) => std::path::PathBuf::from(path),
            None => {
                let path = stack_record::default_overlay(j);
                args.cow.push(format!("overlay={}", path.display()));
                // Made fresh here, over a disk the guest writes until the freeze: the
                // base it samples at creation and at opening may differ, and is ours.
                args.cow.push("trust-base=true".into());
                path
            }
        }
    });
    let config = Config::from_pairs(&args.cow).map_err(|why| format!("snapshot: {why}"))?;
    with_state(e, |state| {
        drop_if_swapped_away(e, state);
        if let Some(open) = &state.open {
            return Err(format!(
                "{}: snapshot {} is open; `ctl commit {}` first",
                e.id, open.name, e.id
            ));
        }
        let name = args
            .name
            .clone()
            .unwrap_or_else(|| format!("snap{}", state.taken + 1));
        if let (Some(j), Some(overlay)) = (&e.journal, &record) {
            if *overlay == stack_record::default_overlay(j) {
                // Left by a snapshot that never froze: not the guest's data.
                let _ = std::fs::remove_file(overlay);
            }
            stack_record::write_snapshot(j, overlay)
                .map_err(|why| format!("{}: not frozen: {why}", e.id))?;
        }
        let forget = || {
            if let Some(j) = &e.journal {
                let _ = stack_record::remove_snapshot(j);
            }
        };
        let frozen = freeze(e, state, &args, &config, name);
        if frozen.is_err() {
            forget();
        }
        frozen
    })
}

/// The freeze itself (see [`snapshot`]).
fn freeze(
    e: &Entry,
    state: &mut Backups,
    args: &SnapshotArgs,
    config: &Config,
    name: String,
) -> std::result::Result<String, String> {
    {
        let below = e.disk.current();
        let serial = (below.info().thread_model == ThreadModel::Serialized)
            .then(|| Arc::new(Mutex::new(())));
        let shared = || Shared {
            disk: below.clone(),
            serial: serial.clone(),
        };
        let base: Arc<dyn Disk> = Arc::new(shared());
        // The overlay is opened over the live disk before the freeze: cow only reads its
        // base when asked, and nothing writes the overlay before it is plugged.
        let cow = load_spec("cow").map_err(|why| format!("{}: not frozen: {why}", e.id))?;
        let overlay = cow
            .open_over(config, ForeignDisk::new(export_disk(shared())))
            .map_err(|why| format!("{}: not frozen: {why}", e.id))?;
        let top: Arc<dyn Disk> = Arc::new(overlay);
        let export_disk = GuardedDisk::new(Box::new(shared()), true)
            .map_err(|why| format!("{}: not frozen: {why}", e.id))?;
        let bound =
            nbd::bind(&args.listen).map_err(|why| format!("{}: not frozen: {why}", e.id))?;
        let size = e.disk.size();
        let tracker = Arc::new(DirtyMap::new(size, DIRTY_GRANULARITY));
        let previous = state.since.take();
        let swapped = e.disk.swap_with(
            &below,
            |_| Ok(top.clone()),
            |maps| {
                if let Some((_, p)) = &previous {
                    maps.retain(|m| !Arc::ptr_eq(m, p));
                }
                maps.push(tracker.clone());
            },
        );
        let swapped = match swapped {
            Ok(s) => s,
            Err(why) => {
                state.since = previous;
                return Err(format!("{}: not frozen: {why}", e.id));
            }
        };
        e.stats.swapped(swapped.pause);
        let bitmap_text = match &previous {
            Some((n, m)) => format!(
                "; blocks written since {n}: qemu:dirty-bitmap:{n} ({} of {} KiB)",
                m.count(),
                DIRTY_GRANULARITY / 1024
            ),
            None => String::new(),
        };
        let export = Arc::new(Export {
            name: name.clone(),
            description: format!("snapshot {name} of {}", e.id),
            disk: Arc::new(export_disk),
            bitmaps: previous.into_iter().collect(),
        });
        let server = bound.start(export);
        let uri = server.uri();
        let stack = e.stack();
        *e.stack.lock().unwrap_or_else(|p| p.into_inner()) = format!("cow over {stack}");
        tracing::info!(id = %e.id, pause_us = swapped.pause.as_micros() as u64, "snapshot {name}: frozen, exported at {uri}");
        state.taken += 1;
        state.since = Some((name.clone(), tracker));
        state.open = Some(Open {
            name: name.clone(),
            below,
            base,
            top,
            stack,
            server: Some(server),
        });
        Ok(format!(
            "{}: snapshot {name} frozen (paused {} us); exported read-only at {uri}{bitmap_text}",
            e.id,
            swapped.pause.as_micros()
        ))
    }
}

/// Copies block `index` of `pending`'s geometry from `from` (the device's disk as the
/// guest sees it) into `base`.
fn copy_block(
    index: u64,
    size: u64,
    buf: &mut Vec<u8>,
    from: impl FnOnce(u64, &mut ReadBufs<'_>) -> Result<()>,
    base: &dyn Disk,
) -> Result<()> {
    let offset = index * DIRTY_GRANULARITY;
    let len = DIRTY_GRANULARITY.min(size - offset) as usize;
    buf.resize(len, 0);
    with_read_bufs(&mut [&mut buf[..]], |b| from(offset, b))?;
    with_write_bufs(&[&buf[..]], |b| base.write(offset, b))
}

/// `commit <dev>`
pub fn commit(e: &Entry) -> std::result::Result<String, String> {
    with_state(e, |state| {
        if let Some(name) = drop_if_swapped_away(e, state) {
            return Err(format!(
                "{}: the device's plugin was swapped since snapshot {name}, which is dropped: \
                 nothing to commit",
                e.id
            ));
        }
        let Some(mut open) = state.open.take() else {
            return Err(format!(
                "{}: no snapshot is open (`ctl snapshot` first)",
                e.id
            ));
        };
        // The base is about to change: its export's clients go first.
        drop(open.server.take());
        let since = state.since.as_ref().map(|(_, m)| m.clone());
        let size = e.disk.size();
        let pending = Arc::new(DirtyMap::new(size, DIRTY_GRANULARITY));
        e.disk.add_tracker(pending.clone());
        if let Some(s) = &since {
            pending.add(s);
        }
        let mut live = 0u64;
        let mut buf = Vec::new();
        let copied = (|| -> Result<()> {
            for _ in 0..MAX_PASSES {
                let blocks = pending.marked();
                if blocks.len() <= FINAL_BLOCKS {
                    break;
                }
                for b in blocks {
                    if pending.take(b) {
                        copy_block(b, size, &mut buf, |o, r| e.disk.read(o, r), &*open.base)?;
                        live += 1;
                    }
                }
            }
            Ok(())
        })();
        if let Err(why) = copied {
            e.disk.remove_tracker(&pending);
            let name = open.name.clone();
            state.open = Some(open);
            return Err(format!(
                "{}: commit of {name} stopped: {why}; the overlay keeps serving",
                e.id
            ));
        }
        let mut paused = 0u64;
        let swapped = e.disk.swap_with(
            &open.top,
            |overlay| {
                for b in pending.marked() {
                    pending.take(b);
                    copy_block(b, size, &mut buf, |o, r| overlay.read(o, r), &*open.base)
                        .map_err(|why| why.to_string())?;
                    paused += 1;
                }
                if open.base.info().can_flush {
                    open.base.flush().map_err(|why| why.to_string())?;
                }
                // The base has every write now; before the guest writes to it again, a
                // crash must stop meaning "write the overlay into the disk".
                if let Some(j) = &e.journal {
                    stack_record::remove_snapshot(j)?;
                }
                Ok(open.below.clone())
            },
            |maps| maps.retain(|m| !Arc::ptr_eq(m, &pending)),
        );
        let swapped = match swapped {
            Ok(s) => s,
            Err(why) => {
                e.disk.remove_tracker(&pending);
                let name = open.name.clone();
                state.open = Some(open);
                return Err(format!(
                    "{}: commit of {name} stopped: {why}; the overlay keeps serving",
                    e.id
                ));
            }
        };
        e.stats.swapped(swapped.pause);
        *e.stack.lock().unwrap_or_else(|p| p.into_inner()) = open.stack.clone();
        tracing::info!(id = %e.id, live, paused, pause_us = swapped.pause.as_micros() as u64, "snapshot {}: committed", open.name);
        Ok(format!(
            "{}: snapshot {} committed: {live} blocks copied live, {paused} during a {} us pause; now {}",
            e.id,
            open.name,
            swapped.pause.as_micros(),
            open.stack
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_words_are_checked_before_anything_is_done() {
        for (words, want) in [
            (
                &[][..],
                "--nbd unix:PATH or --nbd tcp:HOST:PORT is required",
            ),
            (&["--nbd"][..], "--nbd needs a value"),
            (
                &["--nbd", "udp:x"][..],
                "expected unix:PATH or tcp:HOST:PORT",
            ),
            (&["--nbd", "unix:/x", "--name", "a b"][..], "printable"),
            (&["--nbd", "unix:/x", "--frob"][..], "unknown word --frob"),
        ] {
            let e = parse_snapshot(words).err().unwrap();
            assert!(e.contains(want), "{words:?}: {e}");
        }
        let a = parse_snapshot(&[
            "--nbd",
            "tcp:127.0.0.1:0",
            "--name",
            "n1",
            "-c",
            "granularity=4K",
        ])
        .unwrap();
        assert_eq!(a.listen, Listen::Tcp("127.0.0.1:0".into()));
        assert_eq!(a.name.as_deref(), Some("n1"));
        assert_eq!(a.cow, vec!["granularity=4K".to_string()]);
    }
}
