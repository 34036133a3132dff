//! `xen-disk-host serve --config disks.toml [--sim]`: the daemon. Serves the disks the file
//! lists and every device the toolstack creates under `backend/vbd3`, until SIGTERM or
//! Ctrl-C (a second one forces guests' sides closed).
//!
//! With `--sim`, everything runs on the simulated hypervisor: a simulated xenstored (on a
//! socket, for `xenstore-ls` with `XENSTORED_PATH`), one simulated guest per domain the file
//! names, each connecting to its disks through the real handshake and ring.

use super::connect::{
    catch_hangups, catch_signals, hangups, ring_signal_bell, signals, wait_for_signals,
};
use crate::backend::device::Platform;
use crate::backend::disks_config::{
    load_disks, parse_disks, DiskSpec, DisksConfigError, DomainRef,
};
use crate::backend::features::HostOffer;
use crate::backend::registry::Registry;
use crate::backend::server::{open_static, serve, Hooks, Log, ServeOptions, StaticDisk, XsConnect};
use crate::control::socket::{listen, DEFAULT_SERVE};
use crate::simulation::{GuestDisk, SimOptions};
use crate::xen::linux::evtchn::LinuxEventChannels;
use crate::xen::linux::gntdev::{Gntdev, LinuxGrants};
use crate::xen::sim::hypervisor::SimDomain;
use crate::xen::sim::machine::SimMachine;
use crate::xen::sim::remote::RemoteGuests;
use crate::xen::sim::xenstored::SimXenstored;
use crate::xen::xenbus::{read_state, write_state, XenbusState};
use crate::xen::xenstore::client::XsClient;
use crate::xen::xenstore::mux::XsMux;
use crate::xen::xenstore::{Xenstore, NO_TX};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The disks to serve (see the README's `disks.toml`); without it, only the toolstack's
    /// devices are served.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Most rings a guest may use per disk (default: the number of CPUs).
    #[arg(long)]
    queues: Option<u32>,
    /// Worker threads per ring; 0 serves requests on the ring thread.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Microseconds a ring thread polls for work before sleeping (0: never). Worth it when
    /// dom0 has CPUs to spare; it takes them from guests when it has not.
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    #[command(flatten)]
    pub(super) completion: super::CompletionArgs,
    /// Run against the simulated hypervisor, with a simulated guest per configured domain.
    #[arg(long)]
    sim: bool,
    /// The control socket for `ctl` (default: /run/xen-disk/serve.sock; with `--sim`, a
    /// temporary path, printed).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Where an xl disk's target may name a descriptor saying which plugin serves it (see
    /// the README's "Disks from xl configs").
    #[arg(long, default_value = crate::backend::descriptor::DEFAULT_DIR)]
    descriptors: PathBuf,
    /// With `--sim`: where the simulated xenstored listens (default: a temporary path).
    #[arg(long, requires = "sim")]
    xenstore_socket: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP at `PORT` (on 127.0.0.1) or `ADDR:PORT`
    /// (`/metrics`; port 0 picks a free one, printed).
    #[arg(long, value_name = "[ADDR:]PORT")]
    metrics: Option<String>,
    /// With `--sim`: each simulated guest keeps its disks busy for this many seconds after
    /// connecting (4 KiB reads, each written back where it was read, one request at a time
    /// per disk), so that `ctl stats`, the metrics and limits have traffic to show.
    #[arg(long, value_name = "SECONDS", requires = "sim")]
    sim_io: Option<f64>,
    /// Where each device keeps its journal, so that a serve started after this one died
    /// (or was upgraded) takes the guests' connected disks over instead of losing them
    /// (default: /run/xen-disk; none with `--sim` unless given).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Serve simulated guests that live in other processes: xenstored at `$XENSTORED_PATH`,
    /// guest N's memory and event channels from the socket `DIR/domN.sock` (what tests that
    /// kill serve under a running guest use).
    #[arg(long, value_name = "DIR", conflicts_with = "sim")]
    sim_guests: Option<PathBuf>,
}

pub fn run_serve(args: ServeArgs) -> Result<i32> {
    let specs = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            parse_disks(path, &text).map_err(anyhow::Error::msg)?
        }
        None => Vec::new(),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let queues = args.queues.unwrap_or(cpus);
    if !(1..=64).contains(&queues) {
        bail!("--queues {queues}: must be 1 to 64");
    }
    if args.workers > 64 {
        bail!("--workers {}: at most 64", args.workers);
    }
    if !args.sim && args.sim_guests.is_none() && !std::path::Path::new("/dev/xen").exists() {
        bail!("this is not a Xen domain (no /dev/xen); use --sim to run against the simulated hypervisor");
    }
    if let Some(secs) = args.sim_io.filter(|s| !(*s > 0.0 && *s <= 1e7)) {
        bail!("--sim-io {secs}: must be a number of seconds above 0");
    }
    let state_dir = state_dir(&args);
    if let (Some(dir), false) = (&state_dir, args.sim) {
        // Plugins that cache metadata log it there, so a takeover after a crash finds every
        // acknowledged write (see the plugin API's crash_log). Set before any plugin opens
        // and before this process starts threads of its own.
        std::env::set_var(xen_disk_plugin_api::crash_log::STATE_DIR_ENV, dir);
    }
    let disks = open_static(specs).map_err(anyhow::Error::msg)?;
    let opts = ServeOptions {
        backend_domid: 0,
        offer: HostOffer::standard(queues, cpus),
        workers: args.workers,
        poll: Duration::from_micros(args.poll_us.min(10_000)),
        answer_on_completion: args.completion.answer_on_completion,
        descriptors: args.descriptors.clone(),
        state_dir,
    };
    // A daemon's progress lines must not kill it when stdout fails (a full disk, a closed
    // pipe): println! would panic.
    let log: Log = Arc::new(|line: &str| {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{line}");
    });
    let registry = Arc::new(Registry::default());
    let control_path = args.control.clone().unwrap_or_else(|| {
        if args.sim {
            std::env::temp_dir().join(format!("xen-disk-sim-{}-control.sock", std::process::id()))
        } else {
            PathBuf::from(DEFAULT_SERVE)
        }
    });
    let _metrics = start_metrics(args.metrics.as_deref(), &registry)?;
    let _control = match listen(&control_path, registry.clone()) {
        Ok(l) => {
            println!("control socket at {}", control_path.display());
            Some(l)
        }
        // The default place may be unwritable (not root): serve without `ctl`, and say so.
        Err(e) if args.control.is_none() => {
            eprintln!("xen-disk-host: warning: no control socket: {e}");
            None
        }
        Err(e) => bail!("--control {e}"),
    };
    catch_signals();
    catch_hangups();
    // With journals, SIGTERM (systemctl stop and restart) hands the disks over rather than
    // closing them; SIGINT still closes them.
    // (Not with --sim: its guests live in this process and end with it.)
    let journaled = opts.state_dir.is_some() && !args.sim;
    if journaled {
        catch_handover();
        registry.upgrade.allowed.store(true, Ordering::SeqCst);
    }
    let stop = Arc::new(AtomicUsize::new(0));
    let handover = Arc::new(AtomicBool::new(false));
    let (s, h, r) = (stop.clone(), handover.clone(), registry.clone());
    std::thread::spawn(move || loop {
        s.store(signals(), Ordering::SeqCst);
        if HANDOVER.load(Ordering::SeqCst) || r.upgrade.requested.load(Ordering::SeqCst) {
            h.store(true, Ordering::SeqCst);
        }
        // Rung by SIGINT, SIGTERM (also as a hand-over); `ctl upgrade` is seen within 1 s.
        wait_for_signals(Duration::from_secs(1));
    });
    if args.sim {
        return run_sim(args, disks, opts, log, &stop, registry);
    }
    // One xenstore connection for the daemon and all its devices (see XsMux).
    let client = XsClient::open_default().map_err(|e| anyhow::anyhow!("xenstore: {e}"))?;
    let mux = XsMux::new(Box::new(client)).map_err(|e| anyhow::anyhow!("xenstore: {e}"))?;
    let connect: XsConnect = Arc::new(move || Ok(Box::new(mux.view()) as Box<dyn Xenstore + Send>));
    let platform = match &args.sim_guests {
        Some(dir) => {
            let guests = Arc::new(RemoteGuests::new(dir, 0));
            Platform {
                grants: guests.clone(),
                evtchns: guests,
            }
        }
        None => Platform {
            grants: Arc::new(LinuxGrants(Gntdev::open()?)),
            evtchns: Arc::new(LinuxEventChannels),
        },
    };
    println!(
        "serving {} configured disk(s) and the toolstack's vbd3 devices; SIGTERM stops",
        disks.len()
    );
    let reload = reloader(args.config.clone());
    let hooks = Hooks {
        log,
        registry: registry.clone(),
        reload: &reload,
        handover: &handover,
    };
    serve(connect, platform, opts, disks, &stop, hooks).map_err(anyhow::Error::msg)?;
    if registry.upgrade.requested.load(Ordering::SeqCst) {
        drop(_control);
        return Err(exec_self());
    }
    if !handover.load(Ordering::SeqCst) {
        println!("stopped");
    }
    Ok(0)
}

static HANDOVER: AtomicBool = AtomicBool::new(false);

extern "C" fn on_handover(_: libc::c_int) {
    HANDOVER.store(true, Ordering::SeqCst);
    ring_signal_bell();
}

/// SIGTERM asks for a hand-over (see [`Hooks::handover`]).
fn catch_handover() {
    // SAFETY: the handler only touches an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_handover as *const () as libc::sighandler_t,
        )
    };
}

/// `ctl upgrade`'s second half: the binary at this process's path (a new build, if one was
/// installed there) replaces this one, with the same arguments and process id (systemd
/// sees the same service), and takes the disks over. Returns only on failure.
fn exec_self() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::fs::read_link("/proc/self/exe") {
        Ok(p) => p,
        Err(e) => return anyhow::anyhow!("upgrade: /proc/self/exe: {e}"),
    };
    // A binary replaced on disk shows as "<path> (deleted)": the new one is at <path>.
    let path = exe.to_string_lossy();
    let path = PathBuf::from(path.strip_suffix(" (deleted)").unwrap_or(&path));
    println!("upgrade: starting {}", path.display());
    let err = std::process::Command::new(&path)
        .args(std::env::args_os().skip(1))
        .exec();
    anyhow::anyhow!("upgrade: starting {}: {err}", path.display())
}

/// Where journals go: `--state-dir`, else /run/xen-disk (not with `--sim`, whose guests
/// live and die with this process). A directory that cannot be made costs recovery, not
/// the disks: said once, and devices are served unjournaled.
fn state_dir(args: &ServeArgs) -> Option<PathBuf> {
    let dir = match (&args.state_dir, args.sim) {
        (Some(d), _) => d.clone(),
        (None, true) => return None,
        (None, false) => PathBuf::from(crate::backend::journal::DEFAULT_STATE_DIR),
    };
    match std::fs::create_dir_all(&dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            eprintln!(
                "xen-disk-host: warning: --state-dir {}: {e}; a crash of this serve will cost the guests their disks",
                dir.display()
            );
            None
        }
    }
}

/// Starts the metrics endpoint if asked (`--metrics`), and says where it listens.
pub(super) fn start_metrics(
    asked: Option<&str>,
    registry: &Arc<Registry>,
) -> Result<Option<crate::metrics::http::Endpoint>> {
    let Some(text) = asked else { return Ok(None) };
    let addr =
        crate::metrics::http::parse_addr(text).map_err(|e| anyhow::anyhow!("--metrics {e}"))?;
    let e = crate::metrics::http::listen(addr, registry.clone())
        .map_err(|e| anyhow::anyhow!("--metrics {e}"))?;
    println!("metrics at http://{}/metrics", e.addr);
    Ok(Some(e))
}

/// On SIGHUP, the configuration file read and parsed again (None when no new SIGHUP).
fn reloader(
    config: Option<PathBuf>,
) -> impl Fn() -> Option<Result<Vec<DiskSpec>, DisksConfigError>> {
    let seen = AtomicUsize::new(hangups());
    move || {
        let now = hangups();
        if seen.swap(now, Ordering::SeqCst) == now {
            return None;
        }
        Some(load_disks(config.as_ref()?))
    }
}

/// A simulated guest's domain id for each configured domain, in order of first mention.
fn sim_domains(disks: &[StaticDisk]) -> Vec<(u32, String, String)> {
    let mut out: Vec<(u32, String, String)> = Vec::new();
    let mut next = 1u32;
    for d in disks {
        let (id, name, uuid) = match &d.spec.domain {
            DomainRef::Id(id) => (*id, format!("sim-guest-{id}"), None),
            DomainRef::Name(n) => (0, n.clone(), None),
            DomainRef::Uuid(u) => (0, format!("sim-{}", &u[..8]), Some(u.clone())),
        };
        let seen = out.iter().any(|(i, n, u)| {
            (id != 0 && *i == id) || *n == name || uuid.as_ref().is_some_and(|x| x == u)
        });
        if seen {
            continue;
        }
        let id = if id != 0 {
            id
        } else {
            while out.iter().any(|(i, _, _)| *i == next) || disks_use_id(disks, next) {
                next += 1;
            }
            next
        };
        let uuid = uuid.unwrap_or_else(|| format!("00000000-0000-0000-0000-{id:012x}"));
        out.push((id, name, uuid));
    }
    out
}

fn disks_use_id(disks: &[StaticDisk], id: u32) -> bool {
    disks
        .iter()
        .any(|d| matches!(d.spec.domain, DomainRef::Id(i) if i == id))
}

/// The simulated guests' watch token.
const SIM_GUEST: &str = "sim-guest";

struct SimGuest {
    domid: u32,
    xs: XsClient,
    disks: Vec<(String, SimConn)>,
    failed: Vec<String>,
    /// Its watches fire here: its device directory and each connected backend's state.
    events: crossbeam_channel::Receiver<crate::xen::xenstore::WatchEvent>,
    /// A device of its own is on its way (not yet waiting for it): look again soon.
    unsettled: bool,
    last_look: std::time::Instant,
}

/// A simulated guest's connected disk: idle, or kept busy by a thread of its own
/// (`--sim-io`) that gives the disk back when told to stop.
enum SimConn {
    /// Held: dropping it lets the disk go.
    Idle(#[allow(dead_code)] GuestDisk),
    Busy {
        stop: Arc<std::sync::atomic::AtomicBool>,
        thread: std::thread::JoinHandle<GuestDisk>,
    },
}

impl SimConn {
    /// Keeps `disk` busy for `seconds` (reads, each written back), until told to stop.
    fn busy(mut disk: GuestDisk, seconds: f64, name: String) -> SimConn {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let until = std::time::Instant::now() + Duration::from_secs_f64(seconds);
            let region = disk.size().min(64 << 20) / 4096;
            let mut buf = vec![0u8; 4096];
            let mut block = 0u64;
            while !s.load(Ordering::Relaxed) && std::time::Instant::now() < until && region > 0 {
                let at = block % region * 4096;
                // A read-only disk refuses the write: reads alone then.
                let ok = disk.read(at, &mut buf).is_ok();
                let _ = ok && disk.write(at, &buf).is_ok();
                if !ok {
                    println!("{name}: simulated I/O stopped: a read failed");
                    break;
                }
                block += 1;
            }
            disk
        });
        SimConn::Busy { stop, thread }
    }

    /// Stops the I/O, if any, and lets the disk go.
    fn close(self) {
        if let SimConn::Busy { stop, thread } = self {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

fn run_sim(
    args: ServeArgs,
    disks: Vec<StaticDisk>,
    opts: ServeOptions,
    log: Log,
    stop: &AtomicUsize,
    registry: Arc<Registry>,
) -> Result<i32> {
    let xenstored = Arc::new(SimXenstored::new());
    let socket = args.xenstore_socket.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("xen-disk-sim-{}.sock", std::process::id()))
    });
    let _ = std::fs::remove_file(&socket);
    xenstored
        .listen(&socket, 0)
        .with_context(|| format!("{}: cannot listen", socket.display()))?;
    let machine = Arc::new(SimMachine::new(0));
    let mut domains = Vec::new();
    for (id, name, uuid) in sim_domains(&disks) {
        let dom = SimDomain::new(id, 8 * GuestDisk::pages_needed(1), 64)
            .context("simulated guest memory")?;
        machine.add(&dom);
        xenstored.add_domain(id, &name, &uuid);
        domains.push(dom);
    }
    println!(
        "simulated xenstored at {} (XENSTORED_PATH={0}); {} simulated guest(s)",
        socket.display(),
        domains.len()
    );
    let client = xenstored
        .connect(0)
        .map_err(|e| anyhow::anyhow!("simulated xenstored: {e}"))?;
    let mux = XsMux::new(Box::new(client)).map_err(|e| anyhow::anyhow!("xenstore: {e}"))?;
    let connect: XsConnect = Arc::new(move || Ok(Box::new(mux.view()) as Box<dyn Xenstore + Send>));
    let platform = Platform {
        grants: machine.clone(),
        evtchns: machine,
    };
    let expected = disks.len();
    let server_stop = Arc::new(AtomicUsize::new(0));
    let ss = server_stop.clone();
    let config = args.config.clone();
    let server = std::thread::spawn(move || {
        let reload = reloader(config);
        let never = AtomicBool::new(false);
        let hooks = Hooks {
            log,
            registry,
            reload: &reload,
            handover: &never,
        };
        serve(connect, platform, opts, disks, &ss, hooks)
    });
    // Each simulated guest connects to every disk attached to it, as blkfront would.
    let mut guests = Vec::new();
    for dom in &domains {
        let xs = xenstored.connect(dom.domid)?.uncounted();
        // Like blkfront, a guest learns of its disks from watches rather than by asking: an
        // idle simulation must not cost the daemon it measures (or the machine) a core.
        xs.watch(
            &format!("/local/domain/{}/device/vbd", dom.domid),
            SIM_GUEST,
        )
        .map_err(|e| anyhow::anyhow!("simulated guest {}: watch: {e}", dom.domid))?;
        guests.push(SimGuest {
            domid: dom.domid,
            events: xs.events(),
            xs,
            disks: Vec::new(),
            failed: Vec::new(),
            unsettled: true,
            last_look: std::time::Instant::now(),
        });
    }
    // The guests keep looking for new disks (the toolstack may add some), as blkfront would
    // on its watch; the configured ones must all connect within 60 s, and a second more for
    // every disk (the guests attach them one by one, and hundreds share the machine's CPUs
    // while they connect). An idle machine connects 24 disks in under a second; with both
    // cores busy and the daemon at a small share of them, 24 took 36 s.
    let mut connected = 0;
    let allowed = 60 + expected as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(allowed);
    while stop.load(Ordering::SeqCst) == 0 {
        if connected < expected && std::time::Instant::now() > deadline {
            bail!(
                "simulated guests: only {connected} of {expected} disks connected in {allowed} s"
            );
        }
        for (g, dom) in guests.iter_mut().zip(&domains) {
            let fired = g.events.try_iter().count() > 0;
            if !fired && !g.unsettled && g.last_look.elapsed() < Duration::from_secs(10) {
                continue;
            }
            g.last_look = std::time::Instant::now();
            g.unsettled = false;
            // A backend that closes a connected disk (a detach): the guest lets go, as
            // blkfront does, so the backend can finish removing it.
            let mut i = 0;
            while i < g.disks.len() {
                let fe = &g.disks[i].0;
                let be_state =
                    g.xs.read(NO_TX, &format!("{fe}/backend"))
                        .ok()
                        .and_then(|be| read_state(&g.xs, &String::from_utf8_lossy(&be)));
                use XenbusState::*;
                if matches!(
                    be_state,
                    Some(Initialising | InitWait | Initialised | Connected)
                ) {
                    i += 1;
                    continue;
                }
                let (fe, conn) = g.disks.remove(i);
                conn.close();
                let _ = write_state(&g.xs, &fe, XenbusState::Closed);
                println!("simulated guest {}: {fe}: detached by the backend", g.domid);
            }
            let base = format!("/local/domain/{}/device/vbd", g.domid);
            for devid in g.xs.directory(NO_TX, &base).unwrap_or_default() {
                let fe = format!("{base}/{devid}");
                if g.disks.iter().any(|(p, _)| *p == fe) {
                    continue;
                }
                let Ok(be) = g.xs.read(NO_TX, &format!("{fe}/backend")) else {
                    g.unsettled = true;
                    continue;
                };
                let be = String::from_utf8_lossy(&be).to_string();
                let state = read_state(&g.xs, &be);
                if g.failed.contains(&fe) {
                    // A device the toolstack removed and made again at the same place (a
                    // detach then an attach) waits for us anew, as xenbus probes it anew.
                    if state != Some(XenbusState::InitWait) {
                        continue;
                    }
                    g.failed.retain(|f| *f != fe);
                }
                // Only once the backend is waiting for us (a failed one says Closing).
                match state {
                    Some(XenbusState::InitWait) => {}
                    Some(XenbusState::Closing | XenbusState::Closed) => {
                        println!("simulated guest {}: {fe}: the backend closed it", g.domid);
                        g.failed.push(fe);
                        continue;
                    }
                    _ => {
                        g.unsettled = true;
                        continue;
                    }
                }
                let first_page = g.disks.len() * GuestDisk::pages_needed(1);
                // A disk that fails its handshake (the backend closed it meanwhile) is that
                // disk's failure, not the daemon's.
                let mut disk = match GuestDisk::attach(
                    &g.xs,
                    dom,
                    &fe,
                    &be,
                    first_page,
                    &SimOptions::default(),
                ) {
                    Ok(d) => d,
                    Err(e) => {
                        println!("simulated guest {}: {fe}: {e}", g.domid);
                        g.failed.push(fe);
                        continue;
                    }
                };
                let d = disk.description().clone();
                // A first read, as a guest's partition scan does (and `ctl stats` shows).
                let probe = (d.sectors * 512).min(1 << 20) as usize;
                let mut first = vec![0u8; probe];
                disk.read(0, &mut first)
                    .map_err(|e| anyhow::anyhow!("simulated guest {}: {fe}: {e}", g.domid))?;
                println!(
                    "simulated guest {} connected {fe}: {} bytes, {}-byte sectors{}; read {probe} bytes",
                    g.domid,
                    d.sectors * 512,
                    d.sector_size,
                    if d.info & crate::blkif::abi::VDISK_READONLY != 0 {
                        ", read-only"
                    } else {
                        ""
                    }
                );
                let conn = match args.sim_io {
                    Some(secs) if secs > 0.0 => {
                        SimConn::busy(disk, secs, format!("simulated guest {}: {fe}", g.domid))
                    }
                    _ => SimConn::Idle(disk),
                };
                // Its backend's state changes (a detach) fire the guest's watch.
                let _ = g.xs.watch(&format!("{be}/state"), SIM_GUEST);
                g.disks.push((fe, conn));
                connected += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The guests let go first, as at a clean guest shutdown; then the devices are removed.
    for g in &mut guests {
        for (fe, conn) in g.disks.drain(..) {
            conn.close();
            let _ = write_state(&g.xs, &fe, XenbusState::Closed);
        }
    }
    // Every signal from here on reaches the server too: a second SIGTERM forces devices
    // stuck in Closing (a guest that never lets go) closed.
    while !server.is_finished() {
        server_stop.store(stop.load(Ordering::SeqCst).max(1), Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
    }
    let result = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
    let _ = std::fs::remove_file(&socket);
    result.map_err(anyhow::Error::msg)?;
    println!("stopped");
    Ok(0)
}
