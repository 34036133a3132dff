//! `xen-disk-host connect <domain> --plugin <p> [-c k=v]...`: attach a disk to a running
//! guest and serve it until Ctrl-C (which detaches cleanly: Closing, the guest lets go, the
//! entries are removed; a second Ctrl-C forces the guest's side closed).

use crate::backend::attach::create_device;
use crate::backend::device::{run, DeviceConfig, DeviceStats, DeviceTask, Platform};
use crate::backend::disks_config::DomainRef;
use crate::backend::domains::{find_domain, XsView};
use crate::backend::features::HostOffer;
use crate::backend::limits::{IoLimits, Limiter};
use crate::backend::registry::{Entry, Registry};
use crate::backend::vbd::{next_free, Vbd};
use crate::control::socket::{default_connect, listen, Listening};
use crate::plugin::{open_stack, open_stack_read_only, GuardedDisk};
use crate::simulation::{SimOptions, SimulatedDisk};
use crate::xen::linux::evtchn::LinuxEventChannels;
use crate::xen::linux::gntdev::{Gntdev, LinuxGrants};
use crate::xen::xenbus::{write_state, XenbusState};
use crate::xen::xenstore::client::XsClient;
use crate::xen::xenstore::{Xenstore, NO_TX};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use xen_disk_plugin_api::Config;

#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// The guest: domid, name or UUID.
    domain: String,
    /// Plugin name or path (MirageOS xen-disk's spelling `--backend` works too).
    #[arg(long, visible_alias = "backend")]
    plugin: String,
    /// Plugin configuration, `key=value`; repeat for more keys.
    #[arg(short = 'c', long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Shorthand for `-c path=PATH` (MirageOS xen-disk's spelling).
    #[arg(long)]
    path: Option<String>,
    /// Serve the disk read-only (its plugin opens it read-only: `readonly=true`, or
    /// `shared=false` for mmap, unless `-c` sets that key).
    #[arg(long)]
    readonly: bool,
    /// Present 512- or 4096-byte logical sectors (default: the plugin's).
    #[arg(long)]
    sector_size: Option<u32>,
    /// Most rings to offer (capped at the number of CPUs).
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Worker threads per ring; 0 serves requests on the ring thread.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Microseconds a ring thread polls for work before sleeping (0: never). Worth it when
    /// dom0 has CPUs to spare; it takes them from guests when it has not.
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    #[command(flatten)]
    pub(super) completion: super::CompletionArgs,
    /// The guest device (default: the next free one, e.g. xvdb).
    #[arg(long)]
    vbd: Option<String>,
    /// The control socket for `ctl` (default: /run/xen-disk/connect-<pid>.sock).
    #[arg(long)]
    control: Option<std::path::PathBuf>,
    /// Run against the simulated hypervisor (a simulated guest attaches the disk).
    #[arg(long)]
    sim: bool,
    /// An I/O limit on the disk: `read-iops=N`, `write-iops=N`, `read-bps=SIZE`,
    /// `write-bps=SIZE` (per second, e.g. `20M`) and their `-burst` keys; repeat for more.
    /// `ctl limit` changes them while the guest runs.
    #[arg(long = "limit", value_name = "KEY=VALUE")]
    limits: Vec<String>,
    /// Serve Prometheus metrics over HTTP at `PORT` (on 127.0.0.1) or `ADDR:PORT`
    /// (`/metrics`; port 0 picks a free one, printed).
    #[arg(long, value_name = "[ADDR:]PORT")]
    metrics: Option<String>,
}

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// An eventfd the SIGINT/SIGTERM handler rings, so a thread waits for a signal instead of
/// polling the count (a poll every 50 ms cost an emulated dom0 about 3% of a CPU per
/// process, idle or not).
static SIGNAL_BELL: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
    ring_signal_bell();
}

/// Wakes [`wait_for_signals`]; async-signal-safe (an atomic load and write(2)), so other
/// signal handlers may call it too.
pub fn ring_signal_bell() {
    let fd = SIGNAL_BELL.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; 8 bytes from a local to our eventfd.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Waits until SIGINT or SIGTERM arrives or `timeout` passes; returns [`signals`].
pub fn wait_for_signals(timeout: Duration) -> usize {
    let fd = SIGNAL_BELL.load(Ordering::SeqCst);
    if fd < 0 {
        std::thread::sleep(timeout);
        return signals();
    }
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut p, 1, ms) } > 0 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local; the eventfd is non-blocking.
        unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    }
    signals()
}

static HANGUPS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_hangup(_: libc::c_int) {
    HANGUPS.fetch_add(1, Ordering::SeqCst);
}

/// Counts SIGHUP (serve re-reads its configuration) instead of dying.
pub fn catch_hangups() {
    // SAFETY: the handler only touches an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGHUP, on_hangup as *const () as libc::sighandler_t) };
}

/// SIGHUP received so far.
pub fn hangups() -> usize {
    HANGUPS.load(Ordering::SeqCst)
}

/// SIGINT and SIGTERM received so far.
pub fn signals() -> usize {
    SIGNALS.load(Ordering::SeqCst)
}

/// Counts SIGINT and SIGTERM instead of dying: the first detaches, the second forces.
pub fn catch_signals() {
    if SIGNAL_BELL.load(Ordering::SeqCst) < 0 {
        // SAFETY: eventfd takes no pointers; a failure leaves the waiters sleeping instead.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        SIGNAL_BELL.store(fd, Ordering::SeqCst);
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn run_connect(args: ConnectArgs) -> Result<i32> {
    let mut pairs = args.config.clone();
    if let Some(p) = &args.path {
        pairs.push(format!("path={p}"));
    }
    let config = Config::from_pairs(&pairs)
        .map_err(anyhow::Error::msg)
        .context("bad -c option")?;
    if !(1..=64).contains(&args.queues) {
        bail!("--queues {}: must be 1 to 64", args.queues);
    }
    if !args.sim && !std::path::Path::new("/dev/xen").exists() {
        bail!("this is not a Xen domain (no /dev/xen); use --sim to run against the simulated hypervisor");
    }
    let mut limits = IoLimits::default();
    limits
        .set_words(args.limits.iter().map(String::as_str))
        .map_err(|e| anyhow!("--limit {e}"))?;
    let domain = DomainRef::parse(&args.domain)
        .map_err(anyhow::Error::msg)
        .context("domain")?;
    // A disk served read-only is opened read-only, so that an image the host may not write
    // (mode 0444, immutable, a read-only mount) can be served.
    let stack = if args.readonly {
        open_stack_read_only(&args.plugin, &config)?
    } else {
        open_stack(&args.plugin, &config)?
    };
    let layers = stack.describe();
    if args.workers > 64 {
        bail!("--workers {}: at most 64", args.workers);
    }
    let mut disk =
        GuardedDisk::new(Box::new(stack.disk), args.readonly).map_err(anyhow::Error::msg)?;
    if let Some(n) = args.sector_size {
        disk = disk
            .with_sector_size(n)
            .map_err(|e| anyhow!("--sector-size: {e}"))?;
    }
    let disk = Arc::new(disk);
    catch_signals();
    let stats = Arc::new(DeviceStats::with_limiter(Arc::new(Limiter::new(limits))));
    if args.sim {
        return run_sim(&args, disk, &layers, stats);
    }
    let xs = XsClient::open_default()?;
    let domid = find_domain(&XsView(&xs), &domain).map_err(anyhow::Error::msg)?;
    let vbd = match &args.vbd {
        Some(v) => Vbd::parse(v).ok_or_else(|| anyhow!("--vbd {v}: not a device like xvdb"))?,
        None => {
            let used = xs
                .directory(NO_TX, &format!("/local/domain/{domid}/device/vbd"))
                .unwrap_or_default();
            next_free(used.iter().map(String::as_str))
                .ok_or_else(|| anyhow!("domain {domid} has no free disk slot"))?
        }
    };
    let platform = Platform {
        grants: Arc::new(LinuxGrants(Gntdev::open()?)),
        evtchns: Arc::new(LinuxEventChannels),
    };
    let paths = create_device(&xs, 0, domid, vbd, args.readonly)?;
    println!(
        "attached {layers} to domain {domid} as {} ({})",
        vbd.linux_name(),
        paths.backend
    );
    let cfg = DeviceConfig {
        backend_path: paths.backend.clone(),
        frontend_path: paths.frontend.clone(),
        frontend_domid: domid,
        offer: HostOffer::standard(
            args.queues,
            std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        ),
        workers: args.workers,
        remove_entries: true,
        poll: std::time::Duration::from_micros(args.poll_us.min(10_000)),
        answer_on_completion: args.completion.answer_on_completion,
        journal: None,
        park_after: Some(crate::backend::queue::PARK_AFTER),
        latency_every: 0,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let registry = Arc::new(Registry::default());
    registry.add(Entry::for_device(
        &xs,
        domid,
        vbd,
        &layers,
        disk.clone(),
        stats.clone(),
        stop.clone(),
    ));
    let _metrics = super::serve::start_metrics(args.metrics.as_deref(), &registry)?;
    let _control = control_socket(&args, registry)?;
    // A second signal forces the guest's side closed, as MirageOS xen-disk did.
    let (s, fe) = (stop.clone(), paths.frontend.clone());
    std::thread::spawn(move || {
        let Ok(xs) = XsClient::open_default() else {
            return;
        };
        loop {
            let n = wait_for_signals(Duration::from_secs(1));
            if n >= 1 && !s.swap(true, Ordering::SeqCst) {
                eprintln!("detaching (Ctrl-C again to force)");
            }
            if n >= 2 {
                let _ = write_state(&xs, &fe, XenbusState::Closed);
                return;
            }
        }
    });
    // The device watches on a connection of its own: its events are its alone.
    let device_xs = Arc::new(XsClient::open_default()?);
    run(DeviceTask::new(device_xs, platform, cfg, disk, stop, stats))
        .map_err(anyhow::Error::msg)?;
    let _ = xs.rm(NO_TX, &paths.frontend);
    println!("detached");
    Ok(0)
}

/// The control socket: `--control`'s path (failing to listen there is an error), else the
/// default one (failing there is a warning: `ctl` will not reach this process).
fn control_socket(args: &ConnectArgs, registry: Arc<Registry>) -> Result<Option<Listening>> {
    let control_path = args.control.clone().unwrap_or_else(default_connect);
    match listen(&control_path, registry) {
        // Said only when it fails: the default path is documented, and the first line
        // `connect` prints is the attachment.
        Ok(l) => Ok(Some(l)),
        Err(e) if args.control.is_none() => {
            eprintln!("xen-disk-host: warning: no control socket: {e}");
            Ok(None)
        }
        Err(e) => bail!("--control {e}"),
    }
}

fn run_sim(
    args: &ConnectArgs,
    disk: Arc<GuardedDisk>,
    layers: &str,
    stats: Arc<DeviceStats>,
) -> Result<i32> {
    let stop = Arc::new(AtomicBool::new(false));
    let registry = Arc::new(Registry::default());
    // The simulated guest is domain 1, named sim-guest, and sees the disk as xvdb.
    registry.add(Entry {
        id: "1/xvdb".into(),
        domid: 1,
        guest: "sim-guest".into(),
        vbd: "xvdb".into(),
        stack: std::sync::Mutex::new(layers.to_string()),
        disk: disk.clone(),
        stats: stats.clone(),
        stop: stop.clone(),
        journal: None,
    });
    let sim = SimulatedDisk::start_counted(disk, &SimOptions::default(), stats)
        .map_err(anyhow::Error::msg)
        .context("simulated guest")?;
    let _metrics = super::serve::start_metrics(args.metrics.as_deref(), &registry)?;
    let _control = control_socket(args, registry)?;
    println!(
        "attached {layers} to a simulated guest as xvdb ({} bytes); Ctrl-C detaches",
        sim.size()
    );
    // `ctl detach` ends it as Ctrl-C does.
    while SIGNALS.load(Ordering::SeqCst) == 0 && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    sim.shutdown().map_err(anyhow::Error::msg)?;
    println!("detached");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_rings_the_bell_that_waiters_sleep_on() {
        catch_signals();
        let before = signals();
        let fd = SIGNAL_BELL.load(Ordering::SeqCst);
        assert!(fd >= 0, "no eventfd for the signal handler");
        // SAFETY: raise(2) delivers SIGTERM to this thread; the handler installed above only
        // counts it and rings the bell.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout: readable only if the handler wrote.
        let rung = unsafe { libc::poll(&mut p, 1, 0) };
        assert_eq!(rung, 1, "the bell was not rung");
        assert_eq!(wait_for_signals(Duration::ZERO), before + 1);
        // SAFETY: as above; the waiter drained the bell.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0);
    }
}
