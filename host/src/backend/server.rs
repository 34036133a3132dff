//! `serve`: a daemon serving many disks at once, until asked to stop.
//!
//! Two kinds of device, each a [`super::device::DeviceTask`] stepped by one of the daemon's
//! device loops ([`super::device_loop`]), with its own view of the daemon's one xenstore
//! connection (its own watch events):
//!
//! - **Static disks** from `disks.toml`: plugins opened at start (a bad file or plugin fails
//!   the start, naming the disk); attached when their domain exists, by creating both xenstore
//!   directories as `connect` does, and attached again when a domain of that name comes back
//!   after being destroyed. Their entries are removed when they end.
//! - **Toolstack devices**: every directory that appears under
//!   `/local/domain/<us>/backend/vbd3/<domid>/<devid>` with a `params` key (`mmap:/a.img`,
//!   see [`super::params`]; or a descriptor it names, see [`super::descriptor`]). Opened
//!   when they appear; a plugin that fails to open gets an `error` node and state Closing,
//!   as blkback's xenbus_dev_fatal does. Their entries belong to the toolstack and are left
//!   for it to remove.
//!
//! Stopping asks every device to close (Closing, wait for the guest to let go); forcing (a
//! second signal) writes Closed into the guests' states so nothing waits. Handing over
//! (SIGTERM or `ctl upgrade` with journals, [`Hooks::handover`]) instead drains every ring
//! and returns with the guests still connected, for the next serve to take over.

use super::attach::{create_device, device_paths, BACKEND_TYPE};
use super::descriptor::{resolve, DescriptorError};
use super::device::{DeviceConfig, DeviceError, DeviceStats, DeviceTask, Platform};
use super::device_loop::{DeviceLoops, DEVICE_LOOPS};
use super::disks_config::{DiskSpec, DisksConfigError};
use super::domains::{find_domain, XsView};
use super::done::DoneHandle;
use super::features::HostOffer;
use super::journal::{is_held, journal_path};
use super::limits::{IoLimits, Limiter};
use super::queue::PARK_AFTER;
use super::registry::{Entry, Registry};
use super::reload::{plan, Change, Running};
use super::stack_record;
use super::vbd::{next_free, Vbd};
use crate::plugin::bounded::BoundedError;
use crate::plugin::{open_bounded, GuardError, GuardedDisk};
use crate::xen::xenbus::{write_state, XenbusState};
use crate::xen::xenstore::{transaction, Xenstore, XsError, NO_TX};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Domains and toolstack devices are looked for again after this long without a watch
/// event (a safety net, and the retry of a disk that failed to attach).
const RESCAN_EVERY: Duration = Duration::from_secs(5);
use xen_disk_plugin_api::Config;

/// Opens a new xenstore connection (each device needs its own).
pub type XsConnect = Arc<dyn Fn() -> Result<Box<dyn Xenstore + Send>, XsError> + Send + Sync>;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A configured disk's plugin stack did not open.
    #[error("disk {number} (plugin {plugin}): {source}")]
    Open {
        /// Its entry's position in `disks.toml` (1-based).
        number: usize,
        /// Its plugin, as configured.
        plugin: String,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// No xenstore connection.
    #[error(transparent)]
    Connect(XsError),
    /// Watching a path the server follows.
    #[error("watch {path}: {source}")]
    Watch {
        /// The path.
        path: String,
        /// What xenstore said.
        #[source]
        source: XsError,
    },
}

/// Why a plugin stack could not be opened and guarded.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Loading or opening a layer (on its own thread, bounded in time).
    #[error(transparent)]
    Stack(#[from] BoundedError),
    /// The guard refused the disk (its size or sectors).
    #[error(transparent)]
    Guard(#[from] GuardError),
}

/// Why one device could not start: logged, and for a toolstack device written to its
/// `error` node.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Every disk slot of the guest is taken.
    #[error("domain {domid} has no free disk slot")]
    NoFreeSlot {
        /// The guest.
        domid: u32,
    },
    /// The configured device is in use.
    #[error("domain {domid} already has a disk at {}", vbd.linux_name())]
    Occupied {
        /// The guest.
        domid: u32,
        /// The device.
        vbd: Vbd,
    },
    /// Writing the device's xenstore directories.
    #[error("creating the device for domain {domid}: {source}")]
    Create {
        /// The guest.
        domid: u32,
        /// What xenstore said.
        #[source]
        source: XsError,
    },
    /// A toolstack directory whose name is not `<domid>/<devid>`.
    #[error("the directory is not <domid>/<devid>")]
    NotADevice,
    /// A toolstack key that disagrees with the directory's place.
    #[error("`{key}` is {found}, expected {expected}")]
    Mismatch {
        /// The key.
        key: &'static str,
        /// Its value.
        found: String,
        /// What the directory's place implies.
        expected: String,
    },
    /// `params`, or the descriptor it names, does not say what serves the disk.
    #[error(transparent)]
    Params(#[from] DescriptorError),
    /// The plugin stack did not open.
    #[error("plugin {plugin}: {source}")]
    Open {
        /// The plugin, from `params`.
        plugin: String,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// What a swap or a snapshot recorded beside the journal of a device being taken over
    /// could not be served (see [`super::stack_record`]).
    #[error("taking the device over: {0}")]
    Recover(String),
    /// The device id is not a disk's.
    #[error("{0} is not a disk number")]
    NotADiskNumber(u32),
    /// No xenstore connection for the device.
    #[error(transparent)]
    Connect(XsError),
    /// Starting the device's thread.
    #[error("device thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What every device of this server offers.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The domain this backend runs in (0: dom0).
    pub backend_domid: u32,
    /// Limits published to guests (`max_queues` is capped per disk by its `queues`).
    pub offer: HostOffer,
    /// Worker threads per ring.
    pub workers: usize,
    /// Ring threads' polling before sleep (see [`crate::backend::queue::QueueParts::poll`]).
    pub poll: Duration,
    /// See [`crate::backend::queue::QueueParts::answer_on_completion`].
    pub answer_on_completion: bool,
    /// Where toolstack targets name descriptors (see [`super::descriptor`]).
    pub descriptors: std::path::PathBuf,
    /// Where devices keep their journals (see [`super::journal`]); None: not journaled,
    /// and a device found connected is set up again rather than taken over.
    pub state_dir: Option<std::path::PathBuf>,
}

/// A static disk, opened.
pub struct StaticDisk {
    /// The server's handle for it: stable across reloads, never reused.
    pub key: u64,
    /// Its entry's position in `disks.toml` (1-based) when last read, for messages.
    pub number: usize,
    /// As configured.
    pub spec: DiskSpec,
    /// Its plugin stack behind the guard.
    pub disk: Arc<GuardedDisk>,
    /// "cow over vhd" style, for messages.
    pub layers: String,
    /// Its I/O limits: the file's, changed live by `ctl limit` and by a reload; kept across
    /// attaches.
    pub limiter: Arc<Limiter>,
    /// The guest device it was last attached as: with the domain, its identity on reload
    /// when the entry names no `vbd`.
    pub attached: Option<Vbd>,
    /// The last reason it could not be attached (as said), said once rather than every
    /// round.
    last_error: Option<String>,
}

/// Opens every configured disk's plugin; the first failure names the disk.
pub fn open_static(specs: Vec<DiskSpec>) -> Result<Vec<StaticDisk>, ServeError> {
    specs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| open_one(i as u64, i + 1, spec))
        .collect()
}

/// Opens one configured disk (`number` its position in the file).
fn open_one(key: u64, number: usize, spec: DiskSpec) -> Result<StaticDisk, ServeError> {
    let (disk, layers) = open_disk(
        &spec.plugin,
        &spec.plugin_config,
        spec.readonly,
        spec.sector_size,
    )
    .map_err(|source| ServeError::Open {
        number,
        plugin: spec.plugin.clone(),
        source,
    })?;
    Ok(StaticDisk {
        key,
        number,
        limiter: Arc::new(Limiter::new(spec.limits)),
        spec,
        disk,
        layers,
        attached: None,
        last_error: None,
    })
}

fn open_disk(
    plugin: &str,
    config: &Config,
    readonly: bool,
    sector_size: Option<u32>,
) -> Result<(Arc<GuardedDisk>, String), OpenError> {
    // A disk served read-only is opened read-only: its image may be one the host cannot
    // write. The open runs on a thread of its own, bounded in time: a hung image path must
    // not stop the daemon's loop (other devices, reloads, signals).
    let stack = open_bounded(plugin, config, readonly)?;
    let layers = stack.describe();
    let mut disk = GuardedDisk::new(Box::new(stack.disk), readonly).map_err(OpenError::Guard)?;
    if let Some(n) = sector_size {
        disk = disk.with_sector_size(n).map_err(OpenError::Guard)?;
    }
    Ok((Arc::new(disk), layers))
}

/// Where devices run: the platform they map and signal through, and the loops that step
/// them.
struct Runtime {
    platform: Platform,
    loops: DeviceLoops,
}

/// What the server reports as it goes (the CLI prints these lines; tests collect them).
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

struct Device {
    stop: Arc<AtomicBool>,
    /// Its counters and hand-over flag.
    stats: Arc<DeviceStats>,
    /// Its end: it runs on one of the daemon's device loops.
    thread: DoneHandle<Result<(), DeviceError>>,
    frontend: String,
    /// The static disk's key, or None for a toolstack device.
    static_key: Option<u64>,
    guest: u32,
    /// The guest's device name, for messages.
    name: String,
    /// Its control-socket id.
    id: String,
}

/// How the server talks to the rest of the process.
pub struct Hooks<'a> {
    /// Where progress lines go.
    pub log: Log,
    /// The devices, for the control socket.
    pub registry: Arc<Registry>,
    /// Polled each round: a new configuration after SIGHUP, or None.
    pub reload: &'a dyn Fn() -> Option<Result<Vec<DiskSpec>, DisksConfigError>>,
    /// Set to hand every device over instead of closing it (an upgrade): serve drains
    /// their rings and returns with the guests still connected, for the next serve to
    /// take over (see [`super::journal`]).
    pub handover: &'a AtomicBool,
}

/// Serves until `stop` is at least 1; at 2, forces guests' sides closed.
pub fn serve(
    connect: XsConnect,
    platform: Platform,
    opts: ServeOptions,
    disks: Vec<StaticDisk>,
    stop: &AtomicUsize,
    hooks: Hooks<'_>,
) -> Result<(), ServeError> {
    let Hooks {
        log,
        registry,
        reload,
        handover,
    } = hooks;
    let reg = &registry;
    let mut disks = disks;
    let xs = connect().map_err(ServeError::Connect)?;
    let rt = Runtime {
        platform,
        loops: DeviceLoops::new(DEVICE_LOOPS)
            .map_err(|e| ServeError::Connect(XsError::Io(format!("device loops: {e}"))))?,
    };
    let base = format!(
        "/local/domain/{}/backend/{BACKEND_TYPE}",
        opts.backend_domid
    );
    for (path, token) in [
        (base.as_str(), "toolstack"),
        ("@introduceDomain", "domains"),
        ("@releaseDomain", "domains"),
    ] {
        xs.watch(path, token).map_err(|source| ServeError::Watch {
            path: path.to_string(),
            source,
        })?;
    }
    let events = xs.events();
    let mut devices: HashMap<String, Device> = HashMap::new();
    // Static disks not attached: waiting for their domain.
    let mut pending: Vec<u64> = disks.iter().map(|d| d.key).collect();
    let mut next_key = disks.iter().map(|d| d.key + 1).max().unwrap_or(0);
    // Toolstack devices that failed to open: not retried until their directory goes away.
    let mut failed: HashSet<String> = HashSet::new();
    let mut forced = false;
    // Domains and toolstack devices are looked for when a watch fired or something here
    // changed, not on every tick: with hundreds of disks a scan is hundreds of requests.
    let mut due = true;
    let mut last_scan = Instant::now();
    while stop.load(Ordering::SeqCst) == 0 && !handover.load(Ordering::SeqCst) {
        if events.recv_timeout(Duration::from_millis(200)).is_ok() {
            while events.try_recv().is_ok() {}
            due = true;
        }
        due |= reap(&*xs, &mut devices, &mut pending, &disks, &log, reg);
        let reloaded = reload();
        due |= reloaded.is_some();
        if !due && last_scan.elapsed() < RESCAN_EVERY {
            continue;
        }
        due = false;
        last_scan = Instant::now();
        match reloaded {
            Some(Ok(specs)) => {
                let mut state = Served {
                    disks: &mut disks,
                    pending: &mut pending,
                    devices: &devices,
                    next_key: &mut next_key,
                };
                apply_reload(&mut state, specs, &log, reg)
            }
            Some(Err(e)) => log(&format!("reload: {e}; keeping the running configuration")),
            None => {}
        }
        pending.retain(|&key| {
            let Some(i) = disks.iter().position(|d| d.key == key) else {
                return false;
            };
            let others = Others {
                reserved: reserved_vbds(&disks, i),
                sole_unnamed: disks[i].spec.vbd.is_none()
                    && disks
                        .iter()
                        .filter(|d| d.spec.domain == disks[i].spec.domain && d.spec.vbd.is_none())
                        .count()
                        == 1,
            };
            let disk = &mut disks[i];
            match attach_static(&*xs, &connect, &rt, &opts, disk, &others, reg) {
                Ok(Some((path, dev))) => {
                    log(&format!(
                        "disk {}: {} attached to domain {} as {} ({path})",
                        disk.number, disk.layers, dev.guest, dev.name
                    ));
                    disk.last_error = None;
                    devices.insert(path, dev);
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    let e = e.to_string();
                    if disk.last_error.as_ref() != Some(&e) {
                        log(&format!("disk {}: {e}", disk.number));
                        disk.last_error = Some(e);
                    }
                    true
                }
            }
        });
        let present = scan_toolstack(&*xs, &base);
        failed.retain(|p| present.contains(p));
        for path in present {
            if devices.contains_key(&path) || failed.contains(&path) {
                continue;
            }
            match start_toolstack(&*xs, &connect, &rt, &opts, &path, reg) {
                Ok(Some(dev)) => {
                    log(&format!("{path}: serving for domain {}", dev.guest));
                    devices.insert(path, dev);
                }
                Ok(None) => {}
                Err(e) => {
                    let e = e.to_string();
                    log(&format!("{path}: {e}"));
                    refuse(&*xs, &path, &e);
                    failed.insert(path);
                }
            }
        }
    }
    if handover.load(Ordering::SeqCst) && stop.load(Ordering::SeqCst) == 0 {
        log(&format!(
            "handing {} device(s) over: draining, leaving the guests connected",
            devices.len()
        ));
        for d in devices.values() {
            d.stats.hand_over.store(true, Ordering::SeqCst);
        }
        for (path, d) in devices.drain() {
            registry.remove(&d.id);
            // One not connected yet is left as it is too: the next serve sets it up.
            match d.thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log(&format!("{path}: {e}")),
                Err(_) => log(&format!("{path}: device thread panicked")),
            }
        }
        log("handed over");
        return Ok(());
    }
    log(&format!("stopping: closing {} device(s)", devices.len()));
    for d in devices.values() {
        d.stop.store(true, Ordering::SeqCst);
    }
    while !devices.is_empty() {
        if stop.load(Ordering::SeqCst) >= 2 && !forced {
            forced = true;
            for d in devices.values() {
                let _ = write_state(&*xs, &d.frontend, XenbusState::Closed);
            }
        }
        devices.retain(|_, d| !d.thread.is_finished());
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Marks a toolstack device refused: its `error` node and state Closing, written only while
/// its directory is there. The toolstack may be removing it at this very moment (a teardown
/// seen half done), and a plain write would make the directory again after the toolstack
/// removed it, leaving entries of a device nobody will ever remove.
fn refuse(xs: &dyn Xenstore, path: &str, why: &str) {
    let _ = transaction(xs, |tx| {
        xs.read(tx, &format!("{path}/state"))?;
        xs.write(tx, &format!("{path}/error"), why.as_bytes())?;
        xs.write(
            tx,
            &format!("{path}/state"),
            XenbusState::Closing.as_str().as_bytes(),
        )
    });
}

/// The static disks and their devices, as a reload changes them.
struct Served<'a> {
    disks: &'a mut Vec<StaticDisk>,
    pending: &'a mut Vec<u64>,
    devices: &'a HashMap<String, Device>,
    next_key: &'a mut u64,
}

impl Served<'_> {
    /// The device ids a static disk is served as (one while attached).
    fn ids(&self, key: u64) -> Vec<&str> {
        self.devices
            .values()
            .filter(|d| d.static_key == Some(key))
            .map(|d| d.id.as_str())
            .collect()
    }

    /// How messages name a disk: its device when attached, else its entry.
    fn label(&self, key: u64) -> String {
        let ids = self.ids(key);
        match (ids.first(), self.disks.iter().find(|d| d.key == key)) {
            (Some(id), _) => id.to_string(),
            (None, Some(d)) => format!("disk {}", d.number),
            (None, None) => format!("disk #{key}"),
        }
    }
}

/// A changed `disks.toml` (SIGHUP), matched to the running disks by identity (see
/// [`super::reload`]): a disk whose plugin or plugin configuration changed gets the new
/// plugin swapped in under the running guest; new disks are attached; disks no longer listed
/// are detached. Changes to `readonly`, `sector-size`, `queues` or `answer-on-completion` of
/// a listed disk need a detach and are reported, not applied.
fn apply_reload(served: &mut Served<'_>, specs: Vec<DiskSpec>, log: &Log, registry: &Registry) {
    let running: Vec<Running<'_>> = served
        .disks
        .iter()
        .map(|d| Running {
            key: d.key,
            spec: &d.spec,
            attached: d.attached,
        })
        .collect();
    let new_limits: Vec<_> = specs.iter().map(|s| s.limits).collect();
    let changes = plan(&running, specs);
    for change in changes {
        // Limits change live, whatever else changes with them.
        if let Change::Keep { key, entry }
        | Change::Swap { key, entry, .. }
        | Change::NeedsDetach { key, entry, .. } = &change
        {
            set_limits(served, *key, new_limits[*entry], log);
        }
        match change {
            Change::Keep { key, entry } => renumber(served, key, entry),
            Change::NeedsDetach { key, entry, .. } => {
                renumber(served, key, entry);
                log(&format!(
                    "reload: {}: only the plugin and its configuration change live; detach it to change the rest",
                    served.label(key)
                ));
            }
            Change::Swap { key, entry, spec } => {
                renumber(served, key, entry);
                swap_static(served, key, spec, log, registry);
            }
            Change::Add { entry, spec } => match open_one(*served.next_key, entry + 1, spec) {
                Ok(d) => {
                    log(&format!("reload: disk {} added", entry + 1));
                    *served.next_key += 1;
                    served.pending.push(d.key);
                    served.disks.push(d);
                }
                Err(e) => log(&format!("reload: {e}")),
            },
            Change::Remove { key } => {
                let label = served.label(key);
                for d in served
                    .devices
                    .values()
                    .filter(|d| d.static_key == Some(key))
                {
                    d.stop.store(true, Ordering::SeqCst);
                }
                served.pending.retain(|&k| k != key);
                served.disks.retain(|d| d.key != key);
                log(&format!("reload: {label} no longer listed; detaching"));
            }
            Change::Ambiguous {
                domain,
                keys,
                entries,
            } => {
                let labels: Vec<String> = keys.iter().map(|&k| served.label(k)).collect();
                log(&format!(
                    "reload: domain {domain}: {} running disk(s) ({}) and {entries} changed entr{} without `vbd` cannot be told apart; \
                     nothing changed for them (give each entry its `vbd`)",
                    keys.len(),
                    labels.join(", "),
                    if entries == 1 { "y" } else { "ies" },
                ));
            }
        }
    }
}

/// Puts a reloaded entry's limits in force on static disk `key`, if they changed.
fn set_limits(served: &mut Served<'_>, key: u64, limits: IoLimits, log: &Log) {
    let label = served.label(key);
    let Some(d) = served.disks.iter_mut().find(|d| d.key == key) else {
        return;
    };
    if d.spec.limits == limits {
        return;
    }
    d.spec.limits = limits;
    d.limiter.set(limits);
    tracing::info!(id = %label, "reload: limits now {}", limits.describe());
    log(&format!(
        "reload: {label}: limits now {}",
        limits.describe()
    ));
}

fn renumber(served: &mut Served<'_>, key: u64, entry: usize) {
    if let Some(d) = served.disks.iter_mut().find(|d| d.key == key) {
        d.number = entry + 1;
    }
}

/// Puts `spec`'s plugin behind static disk `key`, under its running guest.
fn swap_static(served: &mut Served<'_>, key: u64, spec: DiskSpec, log: &Log, registry: &Registry) {
    let label = served.label(key);
    let ids: Vec<String> = served.ids(key).into_iter().map(str::to_string).collect();
    let Some(current) = served.disks.iter_mut().find(|d| d.key == key) else {
        return;
    };
    let swapped = open_bounded(&spec.plugin, &spec.plugin_config, current.spec.readonly)
        .map_err(OpenError::from)
        .and_then(|stack| {
            let layers = stack.describe();
            current
                .disk
                .swap(Box::new(stack.disk), false)
                .map(|s| (s, layers))
                .map_err(OpenError::Guard)
        });
    match swapped {
        Ok((s, layers)) => {
            log(&format!(
                "reload: {label}: now {layers} (paused {} us)",
                s.pause.as_micros()
            ));
            for id in &ids {
                registry.set_stack(id, &layers, s.pause);
                tracing::info!(id = %id, pause_us = s.pause.as_micros() as u64, "swapped (reload): now {layers}");
            }
            current.layers = layers;
            current.spec = spec;
        }
        Err(e) => {
            tracing::error!(id = %label, "reload: not swapped: {e}");
            log(&format!("reload: {label}: not swapped: {e}"))
        }
    }
}

/// What the other static disks of a disk's domain leave it.
struct Others {
    /// The vbds they are configured at: not free for it.
    reserved: Vec<Vbd>,
    /// It names no vbd, and no other disk of its domain leaves its vbd unnamed either: a
    /// device of that domain left connected by a dead serve can only be it.
    sole_unnamed: bool,
}

/// The vbds other static disks of disk `i`'s domain are configured at: not free for it.
fn reserved_vbds(disks: &[StaticDisk], i: usize) -> Vec<Vbd> {
    disks
        .iter()
        .enumerate()
        .filter(|&(j, d)| j != i && d.spec.domain == disks[i].spec.domain)
        .filter_map(|(_, d)| d.spec.vbd)
        .collect()
}

/// Joins devices that ended; a static disk whose domain is gone waits for it again.
/// Joins the devices whose thread ended; true if there were any.
fn reap(
    xs: &dyn Xenstore,
    devices: &mut HashMap<String, Device>,
    pending: &mut Vec<u64>,
    disks: &[StaticDisk],
    log: &Log,
    registry: &Registry,
) -> bool {
    let ended: Vec<String> = devices
        .iter()
        .filter(|(_, d)| d.thread.is_finished())
        .map(|(p, _)| p.clone())
        .collect();
    let any = !ended.is_empty();
    for path in ended {
        let Some(d) = devices.remove(&path) else {
            continue;
        };
        registry.remove(&d.id);
        let how = match d.thread.join() {
            Ok(Ok(())) => "removed".to_string(),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(_) => "device thread panicked".to_string(),
        };
        log(&format!("{path}: {how}"));
        // A disk a reload removed is gone from `disks`: never attached again.
        if let Some(disk) = d.static_key.and_then(|k| disks.iter().find(|s| s.key == k)) {
            let domain_alive = xs
                .read(NO_TX, &format!("/local/domain/{}/domid", d.guest))
                .is_ok();
            if domain_alive {
                log(&format!(
                    "disk {}: detached while domain {} runs; not attaching again",
                    disk.number, d.guest
                ));
            } else {
                log(&format!(
                    "disk {}: domain {} is gone; waiting for it to return",
                    disk.number, d.guest
                ));
                pending.push(disk.key);
            }
        }
    }
    any
}

/// Attaches a static disk if its domain exists: the device path and its thread. Without a
/// configured vbd it takes the guest's first free one that no other disk is configured at.
fn attach_static(
    xs: &dyn Xenstore,
    connect: &XsConnect,
    rt: &Runtime,
    opts: &ServeOptions,
    disk: &mut StaticDisk,
    others: &Others,
    registry: &Registry,
) -> Result<Option<(String, Device)>, StartError> {
    let Ok(domid) = find_domain(&XsView(xs), &disk.spec.domain) else {
        return Ok(None);
    };
    let reserved = &others.reserved;
    let left = match (&opts.state_dir, others.sole_unnamed) {
        (Some(dir), true) => left_connected(xs, opts.backend_domid, dir, domid, reserved),
        _ => Vec::new(),
    };
    let vbd = match disk.spec.vbd {
        Some(v) => v,
        // A dead serve left this disk connected under the vbd it had picked.
        None if left.len() == 1 => left[0],
        None => {
            let mut used = xs
                .directory(NO_TX, &format!("/local/domain/{domid}/device/vbd"))
                .unwrap_or_default();
            used.extend(reserved.iter().map(|v| v.number().to_string()));
            next_free(used.iter().map(String::as_str)).ok_or(StartError::NoFreeSlot { domid })?
        }
    };
    let paths = device_paths(opts.backend_domid, domid, vbd);
    let journal = opts
        .state_dir
        .as_ref()
        .map(|d| journal_path(d, domid, vbd.number()));
    // Our own device, left connected by a backend that died: taken over, not made again.
    let takeover = journal.as_ref().is_some_and(|j| j.exists())
        && xs.read(NO_TX, &format!("{}/state", paths.backend)).is_ok();
    if takeover && journal.as_deref().is_some_and(is_held) {
        return Ok(None);
    }
    if let Some(j) = &journal {
        if takeover {
            // A swap done by the dead serve: the guest has been writing to that stack.
            if let Some(s) = stack_record::read_stack(j).map_err(StartError::Recover)? {
                let config = Config::from_pairs(&s.pairs).map_err(StartError::Recover)?;
                let read_only = disk.disk.info().read_only;
                let stack = open_bounded(&s.plugin, &config, read_only)
                    .map_err(|e| StartError::Recover(format!("{}: {e}", s.plugin)))?;
                let layers = stack.describe();
                disk.disk
                    .swap(Box::new(stack.disk), true)
                    .map_err(|e| StartError::Recover(e.to_string()))?;
                disk.layers = layers;
            }
            recover_snapshot(j, &disk.disk)?;
        } else {
            stack_record::remove_all(j);
        }
    }
    let paths = if takeover {
        paths
    } else {
        if xs.read(NO_TX, &format!("{}/state", paths.frontend)).is_ok() {
            return Err(StartError::Occupied { domid, vbd });
        }
        let read_only = disk.disk.info().read_only;
        create_device(xs, opts.backend_domid, domid, vbd, read_only)
            .map_err(|source| StartError::Create { domid, source })?
    };
    let mut offer = opts.offer;
    if let Some(q) = disk.spec.queues {
        offer.max_queues = offer.max_queues.min(q.max(1));
    }
    let cfg = DeviceConfig {
        backend_path: paths.backend.clone(),
        frontend_path: paths.frontend.clone(),
        frontend_domid: domid,
        offer,
        workers: opts.workers,
        remove_entries: true,
        poll: opts.poll,
        answer_on_completion: disk
            .spec
            .answer_on_completion
            .unwrap_or(opts.answer_on_completion),
        journal,
        park_after: Some(PARK_AFTER),
        latency_every: 0,
    };
    let dev = spawn(
        connect,
        rt,
        cfg,
        (disk.disk.clone(), disk.limiter.clone()),
        Some(disk.key),
        (xs, registry, vbd, &disk.layers),
    )?;
    disk.attached = Some(vbd);
    Ok(Some((paths.backend, dev)))
}

/// The vbds of `domid` that a dead serve left connected for a static disk: its backend
/// directory (without the `params` of a toolstack's device) is there, and so is its
/// journal, in `dir`.
fn left_connected(
    xs: &dyn Xenstore,
    backend_domid: u32,
    dir: &std::path::Path,
    domid: u32,
    reserved: &[Vbd],
) -> Vec<Vbd> {
    let base = format!("/local/domain/{backend_domid}/backend/{BACKEND_TYPE}/{domid}");
    xs.directory(NO_TX, &base)
        .unwrap_or_default()
        .iter()
        .filter_map(|d| d.parse().ok())
        .filter(|&devid| journal_path(dir, domid, devid).exists())
        // Not a toolstack's device (those carry `params`): one serve made for a disk.
        .filter(|devid| xs.read(NO_TX, &format!("{base}/{devid}/params")).is_err())
        .filter_map(Vbd::from_number)
        .filter(|v| !reserved.contains(v))
        .collect()
}

/// Every `<domid>/<devid>` directory under the toolstack's backend directory.
fn scan_toolstack(xs: &dyn Xenstore, base: &str) -> Vec<String> {
    let mut out = Vec::new();
    for domid in xs.directory(NO_TX, base).unwrap_or_default() {
        for devid in xs
            .directory(NO_TX, &format!("{base}/{domid}"))
            .unwrap_or_default()
        {
            out.push(format!("{base}/{domid}/{devid}"));
        }
    }
    out
}

/// Starts serving a toolstack-created device, once its `params` and `state` are there.
fn start_toolstack(
    xs: &dyn Xenstore,
    connect: &XsConnect,
    rt: &Runtime,
    opts: &ServeOptions,
    path: &str,
    registry: &Registry,
) -> Result<Option<Device>, StartError> {
    let read = |k: &str| -> Option<String> {
        xs.read(NO_TX, &format!("{path}/{k}"))
            .ok()
            .map(|v| String::from_utf8_lossy(&v).trim().to_string())
    };
    let (Some(params), Some(_state)) = (read("params"), read("state")) else {
        return Ok(None);
    };
    // Written by dom0's toolstack, but checked as carefully as anything else.
    let mut parts = path.rsplit('/');
    let (devid, domid) = (parts.next(), parts.next());
    let domid: u32 = domid
        .and_then(|d| d.parse().ok())
        .ok_or(StartError::NotADevice)?;
    let devid: u32 = devid
        .and_then(|d| d.parse().ok())
        .ok_or(StartError::NotADevice)?;
    // A device the toolstack is taking away (online=0) is not started again.
    if read("online").as_deref() == Some("0") {
        return Ok(None);
    }
    // libxl writes `frontend` with `params`; a directory with one and not the other is
    // being written or torn down by a toolstack without transactions: look again later.
    let Some(frontend) = read("frontend") else {
        return Ok(None);
    };
    let expected = format!("/local/domain/{domid}/device/vbd/{devid}");
    if frontend != expected {
        return Err(StartError::Mismatch {
            key: "frontend",
            found: frontend,
            expected,
        });
    }
    // Not before the frontend exists: a toolstack writing without a transaction may not
    // have created it yet.
    if xs.read(NO_TX, &format!("{frontend}/state")).is_err() {
        return Ok(None);
    }
    if let Some(id) = read("frontend-id") {
        if id != domid.to_string() {
            return Err(StartError::Mismatch {
                key: "frontend-id",
                found: id,
                expected: domid.to_string(),
            });
        }
    }
    let journal = opts
        .state_dir
        .as_ref()
        .map(|d| journal_path(d, domid, devid));
    // A backend still holds the device (an old process finishing its upgrade hand-over, or
    // a second serve): look again later.
    if journal.as_deref().is_some_and(is_held) {
        return Ok(None);
    }
    // The plugin comes from `params` or an administrator's descriptor, never from the
    // image's contents; or, for a device a dead serve left connected, from what a swap
    // recorded beside its journal.
    let mut spec = resolve(&params, &opts.descriptors)?;
    let readonly = spec.readonly || matches!(read("mode").as_deref(), Some("r" | "ro"));
    let takeover = journal.as_ref().is_some_and(|j| j.exists())
        && super::device::both_connected(xs, path, &frontend);
    if let Some(j) = &journal {
        if !takeover {
            stack_record::remove_all(j);
        } else if let Some(s) = stack_record::read_stack(j).map_err(StartError::Recover)? {
            spec.config = Config::from_pairs(&s.pairs).map_err(StartError::Recover)?;
            spec.plugin = s.plugin;
        }
    }
    let (disk, layers) =
        open_disk(&spec.plugin, &spec.config, readonly, None).map_err(|source| {
            StartError::Open {
                plugin: spec.plugin.clone(),
                source,
            }
        })?;
    if let (Some(j), true) = (&journal, takeover) {
        recover_snapshot(j, &disk)?;
    }
    let vbd = Vbd::from_number(devid).ok_or(StartError::NotADiskNumber(devid))?;
    let cfg = DeviceConfig {
        backend_path: path.to_string(),
        frontend_path: frontend,
        frontend_domid: domid,
        offer: opts.offer,
        workers: opts.workers,
        remove_entries: false,
        poll: opts.poll,
        answer_on_completion: opts.answer_on_completion,
        journal,
        park_after: Some(PARK_AFTER),
        latency_every: 0,
    };
    spawn(
        connect,
        rt,
        cfg,
        (disk, Arc::default()),
        None,
        (xs, registry, vbd, &layers),
    )
    .map(Some)
}

/// Writes a snapshot's overlay the dead serve left open into the disk (see
/// [`stack_record::commit_left_snapshot`]), and says so.
fn recover_snapshot(journal: &std::path::Path, disk: &GuardedDisk) -> Result<(), StartError> {
    if let Some(n) =
        stack_record::commit_left_snapshot(journal, disk).map_err(StartError::Recover)?
    {
        tracing::warn!(
            granules = n,
            "a snapshot was open when the last serve died: its overlay is written into the disk and the snapshot is closed (its export is gone)"
        );
    }
    Ok(())
}

/// What `spawn` registers with the control socket: xenstore (for the guest's name), the
/// registry, the device name, the plugin stack.
type Registration<'a> = (&'a dyn Xenstore, &'a Registry, Vbd, &'a str);

fn spawn(
    connect: &XsConnect,
    rt: &Runtime,
    cfg: DeviceConfig,
    (disk, limiter): (Arc<GuardedDisk>, Arc<Limiter>),
    static_key: Option<u64>,
    (xs, registry, vbd, layers): Registration<'_>,
) -> Result<Device, StartError> {
    let dev_xs: Arc<dyn Xenstore + Send> = Arc::from(connect().map_err(StartError::Connect)?);
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(DeviceStats::with_limiter(limiter));
    let stats_for_server = stats.clone();
    let (s, p, st) = (stop.clone(), rt.platform.clone(), stats.clone());
    let (frontend, guest) = (cfg.frontend_path.clone(), cfg.frontend_domid);
    let mut entry = Entry::for_device(xs, guest, vbd, layers, disk.clone(), stats, stop.clone());
    entry.journal = cfg.journal.clone();
    let id = entry.id.clone();
    let thread = rt.loops.start(DeviceTask::new(dev_xs, p, cfg, disk, s, st));
    registry.add(entry);
    Ok(Device {
        stop,
        stats: stats_for_server,
        thread,
        frontend,
        static_key,
        guest,
        name: vbd.linux_name(),
        id,
    })
}
