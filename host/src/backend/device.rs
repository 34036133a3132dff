//! One virtual disk: the xenbus state machine that connects a frontend's rings to a plugin
//! disk, and takes them down again (`docs/protocol.md#handshake`, `#backend-rules`).
//!
//! ```text
//!  features, InitWait ─▶ frontend Initialised/Connected (and the toolstack's hotplug
//!  script done, when the backend names one) ─▶ read its keys (hostile), map rings, bind event channels, start a queue thread per ring, publish the disk, Connected
//!    ─▶ frontend Closing ─▶ Closing ─▶ frontend Closed ─▶ stop queues, unmap ─▶ Closed
//!    ─▶ frontend Initialising (reboot) and online ─▶ InitWait again
//!    ─▶ online=0, frontend gone, or a stop request ─▶ remove the backend directory
//! ```
//!
//! Every decision re-reads the nodes ([`super::state::next_action`]); watch events only
//! say "look again".

use super::done::DoneHandle;
use super::features::{initwait_keys, Advertisement, HostOffer};
use super::frontend_keys::{read_frontend, FrontendKeyError, FrontendRings};
use super::journal::{Journal, JournalError, RingIdentity};
use super::limits::Limiter;
use super::queue::{spawn as spawn_queue, QueueError, QueueParts, QueueStats};
use super::state::{next_action, Action, XenbusState};
use super::stats::{ATTACHES, DETACHES};
use super::wake::EventFdWake;
use super::workers::Wake;
use crate::blkif::abi::{Protocol, VDISK_READONLY};
use crate::blkif::keys::*;
use crate::blkif::request::Limits;
use crate::blkif::ring::{BackRing, RingError};
use crate::plugin::GuardedDisk;
use crate::xen::evtchn::{EventChannels, EvtchnError};
use crate::xen::grant::{GrantError, GrantMapper};
use crate::xen::xenstore::{read_u32, transaction, WatchEvent, Xenstore, XsError, NO_TX};
use crossbeam_channel::{Receiver, TryRecvError};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How soon a device looks again at what only this process changes (a stop or hand-over
/// asked for, a ring that broke) after something happened; the wait doubles while nothing
/// does, up to [`LOCAL_CHECK_IDLE`]. So a stop is seen within a second, and an idle disk
/// wakes about once a second.
const LOCAL_CHECK_BUSY: Duration = Duration::from_millis(100);
/// The longest wait between two looks of an idle device.
const LOCAL_CHECK_IDLE: Duration = Duration::from_secs(1);
/// How often a connected disk asks its plugin for its size (online resize).
const RESIZE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// xenstore is read again after this long even without a watch event.
const XENSTORE_REREAD_EVERY: Duration = Duration::from_secs(30);

/// Where the device lives and what it offers.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// `/local/domain/<backend>/backend/vbd3/<guest>/<devid>`.
    pub backend_path: String,
    /// `/local/domain/<guest>/device/vbd/<devid>`.
    pub frontend_path: String,
    /// The guest.
    pub frontend_domid: u32,
    /// Limits published before InitWait.
    pub offer: HostOffer,
    /// Worker threads per ring (0: requests are served on the ring thread).
    pub workers: usize,
    /// Remove the frontend and backend directories when the device ends: true when this
    /// process created the device (`connect`, static disks); false for the toolstack's
    /// devices, whose entries the toolstack removes after it sees Closed.
    pub remove_entries: bool,
    /// How long each ring thread polls before sleeping (see [`QueueParts::poll`]).
    pub poll: Duration,
    /// See [`QueueParts::answer_on_completion`].
    pub answer_on_completion: bool,
    /// The device's journal (see [`super::journal`]): with one, each connection is
    /// journaled, and a device found Connected on both sides when it starts (its backend
    /// died) is taken over instead of being set up again. None: neither.
    pub journal: Option<PathBuf>,
    /// How long a ring may sit idle before it gives its thread up (see
    /// [`QueueParts::park_after`]).
    pub park_after: Option<Duration>,
    /// See [`QueueParts::latency_every`].
    pub latency_every: u32,
}

/// The platform the device maps and signals through (real or simulated).
#[derive(Clone)]
pub struct Platform {
    /// Grant mapping.
    pub grants: Arc<dyn GrantMapper>,
    /// Event channels.
    pub evtchns: Arc<dyn EventChannels>,
}

struct Running {
    stop: Arc<AtomicBool>,
    /// Each ring's end (a ring may have no thread while it is idle: see `queue::park`).
    threads: Vec<DoneHandle<Result<(), QueueError>>>,
    /// Each ring thread's doorbell, rung when the stop flag is set.
    bells: Vec<Arc<EventFdWake>>,
}

impl Running {
    /// A ring ended on its own (the guest broke it), not because it was asked to.
    fn broken(&self) -> bool {
        !self.stop.load(Ordering::SeqCst) && self.threads.iter().any(|t| t.is_finished())
    }

    /// Asks the rings to stop once what is in flight is answered, without waiting for them.
    fn ask_to_stop(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            for bell in &self.bells {
                bell.wake();
            }
        }
    }

    /// Every ring has stopped: [`Running::shut`] will not wait.
    fn drained(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    fn shut(self) {
        self.ask_to_stop();
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("queue stopped: {e}"),
                Err(_) => tracing::warn!("queue stopped: its thread panicked"),
            }
        }
    }
}

/// Why a device stopped before it was removed: xenstore failed at one of its steps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Watching the backend directory or the frontend's state.
    #[error("watching {path}: {source}")]
    Watch {
        /// The watched path.
        path: String,
        /// What xenstore said.
        #[source]
        source: XsError,
    },
    /// Publishing the features and InitWait.
    #[error("publishing InitWait: {0}")]
    InitWait(#[source] XsError),
    /// Writing the backend's state.
    #[error("writing state {state:?}: {source}")]
    State {
        /// The state it was moving to.
        state: XenbusState,
        /// What xenstore said.
        #[source]
        source: XsError,
    },
    /// Telling the guest the disk's new size.
    #[error("publishing the new size: {0}")]
    Resize(#[source] XsError),
    /// Reading the frontend's state.
    #[error("reading the frontend's state: {0}")]
    FrontendState(#[source] XsError),
}

/// Why the device could not connect to the frontend: written to the backend's `error` node
/// (as blkback's xenbus_dev_fatal does), and the device closes.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// What the frontend published is wrong (names the key).
    #[error(transparent)]
    Frontend(#[from] FrontendKeyError),
    /// The frontend's `protocol` is not one we speak (names the key).
    #[error("{0}")]
    Protocol(String),
    /// One ring could not be set up.
    #[error("queue {index}: {source}")]
    Queue {
        /// The queue.
        index: usize,
        /// Which step failed.
        #[source]
        source: QueueStartError,
    },
    /// Publishing the disk and Connected.
    #[error("publishing the disk: {0}")]
    Publish(#[source] XsError),
    /// The journal could not be made, or (taking over) is not one to trust.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Taking over: what the dead backend published cannot be served by this disk.
    #[error("taking over: {0}")]
    Takeover(String),
}

/// Why one ring could not be set up, by step.
#[derive(Debug, thiserror::Error)]
pub enum QueueStartError {
    /// Mapping the ring pages the frontend granted.
    #[error("mapping the ring: {0}")]
    MapRing(#[source] GrantError),
    /// The mapped pages are not a ring.
    #[error("attaching the ring: {0}")]
    Attach(#[source] RingError),
    /// Binding the frontend's event channel.
    #[error("binding port {port}: {source}")]
    Bind {
        /// The frontend's port.
        port: u32,
        /// What the platform said.
        #[source]
        source: EvtchnError,
    },
    /// Starting the ring's thread.
    #[error("starting its thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Making the ring thread's doorbell (an eventfd).
    #[error("making its doorbell: {0}")]
    Doorbell(#[source] std::io::Error),
}

/// The device's counters, shared with whoever reports them.
#[derive(Default)]
pub struct DeviceStats {
    /// Per ring, for the current connection.
    pub queues: std::sync::Mutex<Vec<Arc<QueueStats>>>,
    /// The device's xenbus state (as a number), for `ctl list`.
    pub state: std::sync::atomic::AtomicU8,
    /// Its I/O limits, shared with its rings (`ctl limit` changes them live).
    pub limiter: Arc<Limiter>,
    /// Plugin swaps done under the running guest.
    pub swaps: AtomicU64,
    /// Their pauses, added up, in nanoseconds.
    pub swap_pause_ns: AtomicU64,
    /// Set to end the device without a word to the guest (an upgrade's hand-over): its
    /// rings drain, its state and entries stay as they are, its journal stays for the
    /// next serve, which takes the device over.
    pub hand_over: AtomicBool,
}

impl DeviceStats {
    /// Counters for a device limited by `limiter`.
    pub fn with_limiter(limiter: Arc<Limiter>) -> DeviceStats {
        DeviceStats {
            limiter,
            ..DeviceStats::default()
        }
    }

    /// Counts a swap that paused the disk for `pause`.
    pub fn swapped(&self, pause: Duration) {
        self.swaps.fetch_add(1, Ordering::Relaxed);
        self.swap_pause_ns
            .fetch_add(pause.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The device's id as `ctl` and the logs name it, `<domid>/<vbd>` (e.g. `3/xvdb`), from
/// its configuration.
pub fn device_id(cfg: &DeviceConfig) -> String {
    let vbd = cfg
        .frontend_path
        .rsplit('/')
        .next()
        .and_then(|d| d.parse().ok())
        .and_then(super::vbd::Vbd::from_number)
        .map_or_else(|| "?".to_string(), |v| v.linux_name());
    format!("{}/{vbd}", cfg.frontend_domid)
}

/// Runs the device on this thread until it is removed (by the toolstack, the guest or a stop
/// request): `Ok`. Its `stop` asks for a clean detach (Ctrl-C): Closing, wait for the frontend
/// to close, then remove. An error is xenstore failing under the device. A daemon runs many
/// devices on a few threads instead (see [`super::device_loop`]).
pub fn run(mut task: DeviceTask) -> Result<(), DeviceError> {
    loop {
        match task.step() {
            ControlFlow::Continue(wait) => {
                // An event taken here is left for `step` to see; a connection gone is
                // seen by `step` itself.
                if task.events.recv_timeout(wait).is_ok() {
                    task.fired = true;
                }
            }
            ControlFlow::Break(result) => return task.end(result),
        }
    }
}

/// One device's state machine, owned, so that whichever thread has time may take its next
/// step: [`run`] on a thread of its own, or a loop shared by many devices.
pub struct DeviceTask {
    xs: Arc<dyn Xenstore>,
    platform: Platform,
    cfg: DeviceConfig,
    disk: Arc<GuardedDisk>,
    stop: Arc<AtomicBool>,
    stats: Arc<DeviceStats>,
    /// Every line this device's threads log names it.
    span: tracing::Span,
    token: String,
    events: Receiver<WatchEvent>,
    /// A watch event was taken off `events` by whoever waited for it.
    fired: bool,
    begun: bool,
    /// Set once the watches and InitWait (or the takeover) are done: a device that failed
    /// before has nothing of its own to take down, and must not remove what a running
    /// device at that place would keep (its stack record).
    started: bool,
    running: Option<Running>,
    journal: Option<Journal>,
    ours: XenbusState,
    closing_for_stop: bool,
    seen_frontend: bool,
    /// The size the guest was last told (resize and plugin swaps change the disk's).
    published: u64,
    handed_over: bool,
    /// xenstore is read when a watch fired (or a local change asks for it), not on every
    /// tick: an idle dom0 with hundreds of disks must not spend a core asking xenstore what
    /// it already said. The slow re-read is only a safety net.
    xs_due: bool,
    last_read: Instant,
    last_resize_check: Instant,
    wait: Duration,
    /// The last step's verdict once the device is done, held while its rings drain what a
    /// plugin still holds (see [`step`](Self::step)).
    ending: Option<Result<(), DeviceError>>,
}

impl DeviceTask {
    /// A device not yet started: its first [`step`](Self::step) watches its nodes and
    /// publishes InitWait (or takes a connected device over).
    pub fn new(
        xs: Arc<dyn Xenstore>,
        platform: Platform,
        cfg: DeviceConfig,
        disk: Arc<GuardedDisk>,
        stop: Arc<AtomicBool>,
        stats: Arc<DeviceStats>,
    ) -> DeviceTask {
        let span = tracing::info_span!("device", id = %device_id(&cfg));
        let token = format!("device:{}", cfg.backend_path);
        let events = xs.events();
        let published = disk.size();
        DeviceTask {
            xs,
            platform,
            cfg,
            disk,
            stop,
            stats,
            span,
            token,
            events,
            fired: false,
            begun: false,
            started: false,
            running: None,
            journal: None,
            ours: XenbusState::InitWait,
            closing_for_stop: false,
            seen_frontend: false,
            published,
            handed_over: false,
            xs_due: true,
            last_read: Instant::now(),
            last_resize_check: Instant::now(),
            wait: LOCAL_CHECK_BUSY,
            ending: None,
        }
    }

    /// Where its watch events arrive: a waiter that sees one ready steps the device.
    pub fn events(&self) -> &Receiver<WatchEvent> {
        &self.events
    }

    fn write_state(&self, state: XenbusState) -> Result<(), DeviceError> {
        let be = &self.cfg.backend_path;
        self.xs
            .write(NO_TX, &format!("{be}/state"), state.as_str().as_bytes())
            .map_err(|source| DeviceError::State { state, source })
    }

    fn initwait(&self) -> Result<(), DeviceError> {
        let (xs, be) = (&*self.xs, &self.cfg.backend_path);
        transaction(xs, |tx| {
            for (k, v) in initwait_keys(&self.cfg.offer) {
                xs.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
            }
            xs.write(
                tx,
                &format!("{be}/state"),
                XenbusState::InitWait.as_str().as_bytes(),
            )
        })
        .map_err(DeviceError::InitWait)
    }

    /// Watches the nodes, then InitWait, or takes over a device whose backend died connected.
    fn begin(&mut self) -> Result<(), DeviceError> {
        let (be, fe) = (&self.cfg.backend_path, &self.cfg.frontend_path);
        for path in [be.to_string(), format!("{fe}/state")] {
            self.xs
                .watch(&path, &self.token)
                .map_err(|source| DeviceError::Watch { path, source })?;
        }
        let xs = &*self.xs;
        if !(self.cfg.journal.is_some() && both_connected(xs, be, fe)) {
            return self.initwait();
        }
        // Our predecessor died with the guest connected: take its rings over, writing
        // nothing the guest could see.
        let (cfg, disk, stats) = (&self.cfg, &self.disk, &*self.stats);
        match connect(xs, &self.platform, cfg, disk, stats, &self.span, true) {
            Ok((r, j)) => {
                ATTACHES.fetch_add(1, Ordering::Relaxed);
                tracing::info!("taken over: the guest stays connected");
                // The size the dead backend told the guest: a disk whose size changed since
                // (a plugin swapped or committed while nobody served) is announced at the
                // next resize check, as a resize while serving would be.
                if let Some(told) = xs
                    .read(NO_TX, &format!("{be}/{SECTORS}"))
                    .ok()
                    .and_then(|v| String::from_utf8_lossy(&v).trim().parse::<u64>().ok())
                    .and_then(|n| n.checked_mul(512))
                {
                    self.published = told;
                }
                self.running = Some(r);
                self.journal = j;
                self.ours = XenbusState::Connected;
            }
            Err(e) => {
                let why = format!("cannot take the connected device over: {e}");
                tracing::warn!("{be}: {why}");
                let _ = xs.write(NO_TX, &format!("{be}/error"), why.as_bytes());
                self.write_state(XenbusState::Closing)?;
                self.ours = XenbusState::Closing;
            }
        }
        Ok(())
    }

    /// Looks once at everything that may move the device on: `Continue` with how long it may
    /// wait (for a watch event) before it looks again, or `Break` when it is done (then
    /// [`end`](Self::end)).
    pub fn step(&mut self) -> ControlFlow<Result<(), DeviceError>, Duration> {
        let span = self.span.clone();
        let _entered = span.enter();
        if !self.begun {
            self.begun = true;
            return match self.begin() {
                Ok(()) => {
                    self.started = true;
                    ControlFlow::Continue(self.wait)
                }
                Err(e) => ControlFlow::Break(Err(e)),
            };
        }
        if self.ending.is_some() {
            return self.finish_draining();
        }
        let mut fired = std::mem::take(&mut self.fired);
        loop {
            match self.events.try_recv() {
                Ok(_) => fired = true,
                Err(TryRecvError::Empty) => break,
                // The connection is gone: the next read says so, and the device ends.
                Err(TryRecvError::Disconnected) => {
                    fired = true;
                    break;
                }
            }
        }
        if fired {
            self.xs_due = true;
            self.wait = LOCAL_CHECK_BUSY;
        } else {
            self.wait = (self.wait * 2).min(LOCAL_CHECK_IDLE);
        }
        let done = match self.look() {
            Ok(true) => return ControlFlow::Continue(self.wait),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        // [`end`](Self::end) joins the rings on this loop's thread: a request the plugin
        // still holds (a hung cluster, a long delay) would hold up every other device of the
        // loop there. The rings drain first, looked at every 100 ms.
        self.ending = Some(done);
        if let Some(r) = &self.running {
            r.ask_to_stop();
        }
        self.finish_draining()
    }

    /// Done once the rings have drained; until then, look again soon.
    fn finish_draining(&mut self) -> ControlFlow<Result<(), DeviceError>, Duration> {
        // Nothing a watch says changes the verdict now; left unread, its events would keep
        // the loop stepping this device without a pause.
        while self.events.try_recv().is_ok() {}
        if self.running.as_ref().is_some_and(|r| !r.drained()) {
            return ControlFlow::Continue(LOCAL_CHECK_BUSY);
        }
        ControlFlow::Break(self.ending.take().unwrap_or(Ok(())))
    }

    /// [`step`](Self::step)'s look: false when the device is done.
    fn look(&mut self) -> Result<bool, DeviceError> {
        let (be, fe) = (&self.cfg.backend_path, &self.cfg.frontend_path);
        let xs = &*self.xs;
        let stats = &*self.stats;
        stats.state.store(self.ours as u8, Ordering::Relaxed);
        if stats.hand_over.load(Ordering::Relaxed) {
            self.handed_over = true;
            return Ok(false);
        }
        if self.ours == XenbusState::Connected
            && self.last_resize_check.elapsed() >= RESIZE_CHECK_EVERY
        {
            self.last_resize_check = Instant::now();
            resize_if_changed(xs, be, &self.disk, &mut self.published)?;
        }
        if self.stop.load(Ordering::Relaxed) && !self.closing_for_stop {
            self.closing_for_stop = true;
            self.xs_due = true;
            if self.ours == XenbusState::Connected || self.ours == XenbusState::InitWait {
                self.write_state(XenbusState::Closing)?;
                self.ours = XenbusState::Closing;
            }
        }
        // A queue that stopped on its own means the guest broke its ring: close the device.
        if self.running.as_ref().is_some_and(Running::broken) && self.ours == XenbusState::Connected
        {
            tracing::warn!("{be}: a ring broke; closing the device");
            self.write_state(XenbusState::Closing)?;
            self.ours = XenbusState::Closing;
            self.xs_due = true;
        }
        if !self.xs_due && self.last_read.elapsed() < XENSTORE_REREAD_EVERY {
            return Ok(true);
        }
        self.xs_due = false;
        self.last_read = Instant::now();
        let frontend = match xs.read(NO_TX, &format!("{fe}/state")) {
            Ok(v) => XenbusState::parse(&v),
            // A toolstack may write the backend before the frontend: absent at first is
            // "not yet"; absent after it existed is "gone".
            Err(e) if e.is_enoent() && !self.seen_frontend && !self.closing_for_stop => {
                return Ok(true)
            }
            Err(e) if e.is_enoent() => None,
            Err(e) => return Err(DeviceError::FrontendState(e)),
        };
        self.seen_frontend = true;
        let online = match read_u32(xs, NO_TX, &format!("{be}/online")) {
            Ok(v) => v.unwrap_or(1) == 1 && !self.closing_for_stop,
            Err(_) => false,
        };
        if xs.read(NO_TX, &format!("{be}/state")).is_err() {
            return Ok(false);
        }
        match next_action(self.ours, frontend, online) {
            Action::Wait => {}
            // Not before the toolstack's hotplug script has run (see `hotplug_done`).
            Action::Connect if !hotplug_done(xs, be) => {}
            Action::Connect => {
                let (cfg, disk) = (&self.cfg, &self.disk);
                match connect(xs, &self.platform, cfg, disk, stats, &self.span, false) {
                    Ok((r, j)) => {
                        ATTACHES.fetch_add(1, Ordering::Relaxed);
                        self.running = Some(r);
                        self.journal = j;
                        self.ours = XenbusState::Connected;
                        self.published = disk.size();
                    }
                    Err(e) => {
                        let why = e.to_string();
                        tracing::warn!("{be}: cannot connect: {why}");
                        let _ = xs.write(NO_TX, &format!("{be}/error"), why.as_bytes());
                        self.write_state(XenbusState::Closing)?;
                        self.ours = XenbusState::Closing;
                    }
                }
            }
            Action::Close => {
                self.write_state(XenbusState::Closing)?;
                self.ours = XenbusState::Closing;
            }
            Action::Disconnect => {
                // A request the plugin still holds (a hung cluster, a long delay) keeps its
                // ring draining: look again soon rather than wait here, where every other
                // device of this loop would wait too.
                if let Some(r) = &self.running {
                    r.ask_to_stop();
                    if !r.drained() {
                        self.xs_due = true;
                        self.wait = LOCAL_CHECK_BUSY;
                        return Ok(true);
                    }
                }
                if let Some(r) = self.running.take() {
                    r.shut();
                    DETACHES.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("detached: the guest closed its side");
                }
                if let Some(j) = self.journal.take() {
                    j.remove();
                }
                self.write_state(XenbusState::Closed)?;
                self.ours = XenbusState::Closed;
            }
            Action::Reinit => {
                self.initwait()?;
                self.ours = XenbusState::InitWait;
            }
            Action::Remove => return Ok(false),
        }
        Ok(true)
    }

    /// After the last step: stops the rings, and removes what the device leaves behind
    /// (unless it was handed over). Returns the step's result.
    pub fn end(mut self, result: Result<(), DeviceError>) -> Result<(), DeviceError> {
        let span = self.span.clone();
        let _entered = span.enter();
        if !self.started {
            return result;
        }
        let (be, fe) = (&self.cfg.backend_path, &self.cfg.frontend_path);
        let xs = &*self.xs;
        let unwatch = || {
            let _ = xs.unwatch(be, &self.token);
            let _ = xs.unwatch(&format!("{fe}/state"), &self.token);
        };
        if self.handed_over {
            // Drained: every request taken is answered, or stays in the journal to be served
            // again by the next serve (one held behind a barrier or a limit).
            if let Some(r) = self.running.take() {
                r.shut();
            }
            drop(self.journal.take());
            unwatch();
            tracing::info!("handed over: left connected for the next serve");
            return Ok(());
        }
        if let Some(r) = self.running.take() {
            r.shut();
            DETACHES.fetch_add(1, Ordering::Relaxed);
            tracing::info!("detached");
        }
        if let Some(j) = self.journal.take() {
            j.remove();
        }
        if let Some(path) = &self.cfg.journal {
            // The device is gone: a later one at this place starts from its `params`.
            super::stack_record::remove_all(path);
        }
        match &result {
            Ok(()) => tracing::info!("removed"),
            Err(e) => tracing::error!("stopped: {e}"),
        }
        unwatch();
        if self.cfg.remove_entries {
            // As a toolstack removes a device (libxl does both): the guest's xenbus sees its
            // frontend directory go and unplugs the disk, and its vbd name is free again.
            let _ = xs.rm(NO_TX, fe);
            let _ = xs.rm(NO_TX, be);
        }
        result
    }
}

/// Whether a device may connect as far as the toolstack's hotplug script is concerned. A
/// backend directory with a `script` key (libxl writes one for every `backendtype=tap` disk)
/// connects only once that script has written `hotplug-status` = `connected`, as Linux's
/// blkback waits for its script's `physical-device`: libxl runs the script only after it
/// has seen the backend in InitWait, and a backend already Connected by then (a quick
/// frontend) would leave libxl waiting for an InitWait it never sees.
fn hotplug_done(xs: &dyn Xenstore, be: &str) -> bool {
    if xs.read(NO_TX, &format!("{be}/script")).is_err() {
        return true;
    }
    matches!(
        xs.read(NO_TX, &format!("{be}/hotplug-status")).as_deref(),
        Ok(b"connected")
    )
}

/// Online resize: when the disk's size differs from what the guest was told (the plugin's
/// size changed, or a swap brought another), tells the guest, as blkback does, by rewriting
/// `sectors` and `state` in one transaction (blkfront re-reads `sectors` on the state watch).
fn resize_if_changed(
    xs: &dyn Xenstore,
    be: &str,
    disk: &GuardedDisk,
    published: &mut u64,
) -> Result<(), DeviceError> {
    if let Err(e) = disk.refresh_size() {
        tracing::warn!("{be}: size not refreshed: {e}");
    }
    let now = disk.size();
    if now == *published {
        return Ok(());
    }
    tracing::info!("resized: {published} -> {now} bytes; telling the guest");
    transaction(xs, |tx| {
        xs.write(
            tx,
            &format!("{be}/sectors"),
            (now / 512).to_string().as_bytes(),
        )?;
        xs.write(
            tx,
            &format!("{be}/state"),
            XenbusState::Connected.as_str().as_bytes(),
        )
    })
    .map_err(DeviceError::Resize)?;
    *published = now;
    Ok(())
}

/// Whether backend and frontend are both Connected: a device whose backend died connected.
pub(crate) fn both_connected(xs: &dyn Xenstore, be: &str, fe: &str) -> bool {
    let state = |dir: &str| {
        xs.read(NO_TX, &format!("{dir}/state"))
            .ok()
            .and_then(|v| XenbusState::parse(&v))
    };
    state(be) == Some(XenbusState::Connected) && state(fe) == Some(XenbusState::Connected)
}

/// The device id in a frontend path (`.../device/vbd/<devid>`).
fn devid(cfg: &DeviceConfig) -> u32 {
    cfg.frontend_path
        .rsplit('/')
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// What a dead backend offered before InitWait, read back from its directory (a key it
/// did not write keeps this process's value): the frontend's keys are checked against it.
fn published_offer(xs: &dyn Xenstore, be: &str, ours: &HostOffer) -> HostOffer {
    let num = |k: &str| read_u32(xs, NO_TX, &format!("{be}/{k}")).ok().flatten();
    HostOffer {
        max_ring_page_order: num(MAX_RING_PAGE_ORDER_KEY).unwrap_or(ours.max_ring_page_order),
        max_queues: num(MULTI_QUEUE_MAX_QUEUES).unwrap_or(ours.max_queues),
        max_indirect_segments: num(FEATURE_MAX_INDIRECT_SEGMENTS).unwrap_or(0),
        persistent: num(FEATURE_PERSISTENT) == Some(1),
    }
}

/// What a dead backend told the guest about the disk, as the ring must now accept it; this
/// disk must be able to serve it (same sector size, writable if it was, flush and discard
/// if they were offered).
fn published_limits(
    xs: &dyn Xenstore,
    be: &str,
    offer: &HostOffer,
    disk: &GuardedDisk,
) -> Result<Limits, ConnectError> {
    let num = |k: &'static str| -> Result<u64, ConnectError> {
        let v = xs
            .read(NO_TX, &format!("{be}/{k}"))
            .map_err(|e| ConnectError::Takeover(format!("`{k}`: {e}")))?;
        String::from_utf8_lossy(&v)
            .trim()
            .parse()
            .map_err(|_| ConnectError::Takeover(format!("`{k}` is not a number")))
    };
    let info = disk.info();
    let limits = Limits {
        sectors: num(SECTORS)?,
        logical_sector_size: num(SECTOR_SIZE)? as u32,
        read_only: num(INFO)? & u64::from(VDISK_READONLY) != 0,
        flush: num(FEATURE_FLUSH_CACHE)? == 1,
        discard: num(FEATURE_DISCARD)? == 1,
        discard_secure: false,
        max_indirect_segments: u16::try_from(offer.max_indirect_segments).unwrap_or(u16::MAX),
    };
    let refuse = |what: String| Err(ConnectError::Takeover(what));
    if limits.logical_sector_size != info.logical_sector_size {
        return refuse(format!(
            "the guest was told {}-byte sectors, the disk has {}",
            limits.logical_sector_size, info.logical_sector_size
        ));
    }
    if !limits.read_only && info.read_only {
        return refuse("the guest was told the disk is writable; it is read-only now".into());
    }
    if (limits.flush && !info.can_flush) || (limits.discard && !info.can_discard) {
        return refuse("the guest was offered flush or discard; the disk cannot now".into());
    }
    Ok(limits)
}

/// Maps the frontend's rings and starts a queue thread per ring; publishes the disk. With
/// `takeover`, the rings are a dead backend's: its journal says where they stand, and
/// nothing is published (the guest already has it all).
fn connect(
    xs: &dyn Xenstore,
    platform: &Platform,
    cfg: &DeviceConfig,
    disk: &Arc<GuardedDisk>,
    stats: &DeviceStats,
    span: &tracing::Span,
    takeover: bool,
) -> Result<(Running, Option<Journal>), ConnectError> {
    let fe = &cfg.frontend_path;
    let be = &cfg.backend_path;
    let read = |k: &str| match xs.read(NO_TX, &format!("{fe}/{k}")) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_enoent() => Ok(None),
        Err(e) => Err(e),
    };
    let offer = if takeover {
        published_offer(xs, be, &cfg.offer)
    } else {
        cfg.offer
    };
    let rings = read_frontend(&read, &offer)?;
    let protocol =
        Protocol::from_xenstore(rings.protocol.as_deref()).map_err(ConnectError::Protocol)?;
    let advertisement = Advertisement::new(&cfg.offer, &disk.info());
    let limits = if takeover {
        published_limits(xs, be, &offer, disk)?
    } else {
        advertisement.limits()
    };
    let mut parts = Vec::new();
    for (i, q) in rings.queues.iter().enumerate() {
        let part = map_queue(platform, cfg, q, protocol, limits, &rings, stats)
            .map_err(|source| ConnectError::Queue { index: i, source })?;
        parts.push(part);
    }
    let journal = match &cfg.journal {
        Some(path) => Some(journal_rings(path, cfg, &rings, &mut parts, takeover)?),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let bells: Vec<_> = parts.iter().map(|p| p.doorbell.clone()).collect();
    let mut all_stats = Vec::new();
    for (i, parts) in parts.into_iter().enumerate() {
        let (d, s, st) = (disk.clone(), stop.clone(), Arc::new(QueueStats::default()));
        all_stats.push(st.clone());
        let spawned = spawn_queue(parts, d, s, st, span.clone(), format!("xen-disk-ring-{i}"));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                Running {
                    stop,
                    threads,
                    bells,
                }
                .shut();
                return Err(ConnectError::Queue {
                    index: i,
                    source: QueueStartError::Thread(e),
                });
            }
        }
    }
    *stats.queues.lock().unwrap_or_else(|e| e.into_inner()) = all_stats;
    if !takeover {
        let published = transaction(xs, |tx| {
            for (k, v) in advertisement.connect_keys() {
                xs.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
            }
            xs.write(
                tx,
                &format!("{be}/state"),
                XenbusState::Connected.as_str().as_bytes(),
            )
        });
        if let Err(e) = published {
            Running {
                stop,
                threads,
                bells,
            }
            .shut();
            return Err(ConnectError::Publish(e));
        }
    }
    tracing::info!(
        queues = rings.queues.len(),
        protocol = ?protocol,
        persistent_grants = rings.persistent,
        sectors = limits.sectors,
        sector_size = limits.logical_sector_size,
        read_only = limits.read_only,
        flush = limits.flush,
        discard = limits.discard,
        indirect_segments = limits.max_indirect_segments,
        limits = %stats.limiter.limits().describe(),
        takeover,
        "attached: negotiated with the guest"
    );
    Ok((
        Running {
            stop,
            threads,
            bells,
        },
        journal,
    ))
}

/// Maps one ring and binds its event channel.
fn map_queue(
    platform: &Platform,
    cfg: &DeviceConfig,
    q: &super::frontend_keys::QueueRing,
    protocol: Protocol,
    limits: Limits,
    rings: &FrontendRings,
    stats: &DeviceStats,
) -> Result<QueueParts, QueueStartError> {
    let ring_mapping = platform
        .grants
        .map(cfg.frontend_domid, &q.ring_refs, true)
        .map_err(QueueStartError::MapRing)?;
    // SAFETY: the mapping goes into QueueParts with the ring and outlives it.
    let ring = unsafe { BackRing::attach(ring_mapping.as_ptr(), ring_mapping.len(), protocol) }
        .map_err(QueueStartError::Attach)?;
    let evtchn = platform
        .evtchns
        .bind_interdomain(cfg.frontend_domid, q.event_channel)
        .map_err(|source| QueueStartError::Bind {
            port: q.event_channel,
            source,
        })?;
    let doorbell = Arc::new(EventFdWake::new().map_err(QueueStartError::Doorbell)?);
    Ok(QueueParts {
        ring,
        ring_mapping,
        evtchn,
        grants: platform.grants.clone(),
        guest: cfg.frontend_domid,
        limits,
        workers: cfg.workers,
        persistent: rings.persistent,
        poll: cfg.poll,
        answer_on_completion: cfg.answer_on_completion,
        limiter: stats.limiter.clone(),
        doorbell,
        park_after: cfg.park_after,
        latency_every: cfg.latency_every,
    })
}

/// Gives each ring its part of the device's journal at `path`: a fresh journal for a new
/// connection; the dead backend's, checked against the rings the guest describes, when
/// taking over (each ring then resumes where the journal says).
fn journal_rings(
    path: &Path,
    cfg: &DeviceConfig,
    rings: &FrontendRings,
    parts: &mut [QueueParts],
    takeover: bool,
) -> Result<Journal, ConnectError> {
    let identity = |i: usize, p: &QueueParts| RingIdentity {
        entries: p.ring.size(),
        protocol: p.ring.protocol(),
        event_channel: rings.queues[i].event_channel,
        ring_refs: rings.queues[i].ring_refs.clone(),
    };
    let (guest, devid) = (cfg.frontend_domid, devid(cfg));
    if takeover {
        let ids: Vec<RingIdentity> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| identity(i, p))
            .collect();
        let journal = Journal::open(path, guest, devid, &ids)?;
        for (i, p) in parts.iter_mut().enumerate() {
            let (req_prod, rsp_prod) = p.ring.shared_indices();
            let (log, req_cons) = journal.recover_ring(i, req_prod, rsp_prod)?;
            let replayed = req_cons.wrapping_sub(rsp_prod);
            p.ring
                .journal(Box::new(log), Some(req_cons))
                .map_err(|e| ConnectError::Takeover(format!("queue {i}: {e}")))?;
            // The dead backend may have published answers and died before notifying: a
            // spurious notification costs the guest one look at its ring.
            let _ = p.evtchn.notify();
            tracing::info!(
                queue = i,
                req_prod,
                rsp_prod,
                req_cons,
                replayed,
                "ring taken over"
            );
        }
        Ok(journal)
    } else {
        let ids: Vec<(RingIdentity, u32)> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| (identity(i, p), p.ring.shared_indices().1))
            .collect();
        let journal = Journal::create(path, guest, devid, &ids)?;
        for (i, p) in parts.iter_mut().enumerate() {
            p.ring
                .journal(Box::new(journal.fresh_ring(i)), None)
                .map_err(|e| ConnectError::Takeover(format!("queue {i}: {e}")))?;
        }
        Ok(journal)
    }
}
