//! Many devices on a few threads. A device spends its life waiting: for a watch event, for
//! its next look at its flags and its disk's size (at most a second apart). A thread each,
//! a dom0 with hundreds of disks held hundreds of threads to do that waiting. Here a fixed
//! number of loops each wait on all their devices' watch events and the earliest of their
//! deadlines at once, then step each device that has an event or is due, as Linux runs
//! every backend's xenbus handlers on its one xenwatch thread.
//!
//! A step may block (connecting maps the rings; disconnecting waits for the rings to drain
//! their requests), and holds up the other devices of its loop meanwhile: so there are
//! several loops, and a device goes to the one with the fewest.

use super::device::{DeviceError, DeviceTask};
use super::done::{done_pair, DoneHandle, DoneSetter};
use crossbeam_channel::{unbounded, Receiver, Select, Sender, TryRecvError};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Loops a daemon runs its devices on.
pub const DEVICE_LOOPS: usize = 4;

/// Deadlines are rounded up to a grid: idle devices' periodic looks (each a second or more
/// apart) fall on whole seconds, so a loop wakes once a second for all of its idle devices,
/// not once per device per second (each wake-up of a loop costs it a wait on every one of
/// its devices' channels); busier devices' looks fall on tenths of a second.
const TICK: Duration = Duration::from_millis(100);
/// The grid of waits of a second or more.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// When a device that may wait `wait` from `now` is next looked at: `now + wait` rounded up
/// to its grid (after `epoch`).
fn next_look(epoch: Instant, now: Instant, wait: Duration) -> Instant {
    on_tick(
        epoch,
        now + wait,
        if wait >= IDLE_TICK { IDLE_TICK } else { TICK },
    )
}

/// `t` rounded up to the next multiple of `tick` after `epoch`.
fn on_tick(epoch: Instant, t: Instant, tick: Duration) -> Instant {
    let since = t.saturating_duration_since(epoch).as_nanos();
    let tick = tick.as_nanos();
    let ticks = since.div_ceil(tick);
    epoch + Duration::from_nanos((ticks * tick).min(u128::from(u64::MAX)) as u64)
}

type Outcome = Result<(), DeviceError>;

struct Job {
    task: DeviceTask,
    done: DoneSetter<Outcome>,
    due: Instant,
    /// The loop's wait found its events ready (an event, or its connection gone).
    ready: bool,
}

struct Loop {
    jobs: Sender<Job>,
    devices: Arc<AtomicUsize>,
}

/// The loops; dropping them lets each thread end once its last device has.
pub struct DeviceLoops {
    loops: Vec<Loop>,
}

impl DeviceLoops {
    /// Starts `n` loops (at least one).
    pub fn new(n: usize) -> std::io::Result<DeviceLoops> {
        let mut loops = Vec::new();
        for i in 0..n.max(1) {
            let (jobs, rx) = unbounded();
            let devices = Arc::new(AtomicUsize::new(0));
            let count = devices.clone();
            std::thread::Builder::new()
                .name(format!("xen-disk-devices-{i}"))
                .spawn(move || run(rx, &count))?;
            loops.push(Loop { jobs, devices });
        }
        Ok(DeviceLoops { loops })
    }

    /// Runs `task` on the loop with the fewest devices; the handle has its result when it
    /// has ended (as a device thread's `JoinHandle` had).
    pub fn start(&self, task: DeviceTask) -> DoneHandle<Outcome> {
        let (done, handle) = done_pair();
        let l = self
            .loops
            .iter()
            .min_by_key(|l| l.devices.load(Ordering::Relaxed))
            .expect("at least one loop");
        l.devices.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            task,
            done,
            due: Instant::now(),
            ready: false,
        };
        if let Err(lost) = l.jobs.send(job) {
            // The loop's thread is gone (it panicked outside any step): the device ends
            // with a panic's result, as if its own thread had.
            drop(lost);
            l.devices.fetch_sub(1, Ordering::Relaxed);
        }
        handle
    }
}

/// One loop: waits for any of its devices' events, a new device, or the earliest deadline.
fn run(jobs: Receiver<Job>, count: &AtomicUsize) {
    let mut jobs = Some(jobs);
    let mut devices: Vec<Job> = Vec::new();
    let epoch = Instant::now();
    loop {
        if let Some(rx) = &jobs {
            loop {
                match rx.try_recv() {
                    Ok(job) => devices.push(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        jobs = None;
                        break;
                    }
                }
            }
        }
        if jobs.is_none() && devices.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut i = 0;
        while i < devices.len() {
            let d = &mut devices[i];
            if d.due > now && !std::mem::take(&mut d.ready) && d.task.events().is_empty() {
                i += 1;
                continue;
            }
            match catch_unwind(AssertUnwindSafe(|| d.task.step())) {
                Ok(ControlFlow::Continue(wait)) => {
                    d.due = next_look(epoch, Instant::now(), wait);
                    i += 1;
                }
                Ok(ControlFlow::Break(result)) => {
                    let Job { task, done, .. } = devices.swap_remove(i);
                    match catch_unwind(AssertUnwindSafe(|| task.end(result))) {
                        Ok(r) => done.set(r),
                        Err(p) => done.panicked(p),
                    }
                    count.fetch_sub(1, Ordering::Relaxed);
                }
                Err(p) => {
                    // As a device thread that panicked: the device is gone, its result says
                    // why; the loop's other devices go on.
                    let Job { done, .. } = devices.swap_remove(i);
                    done.panicked(p);
                    count.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        let mut select = Select::new();
        for d in &devices {
            select.recv(d.task.events());
        }
        if let Some(rx) = &jobs {
            select.recv(rx);
        }
        // Readiness only: the device's step takes the event itself.
        let ready = match devices.iter().map(|d| d.due).min() {
            Some(due) => select.ready_deadline(due).ok(),
            None => Some(select.ready()),
        };
        if let Some(d) = ready.and_then(|i| devices.get_mut(i)) {
            d.ready = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_fall_on_ticks_never_early() {
        let epoch = Instant::now();
        for ms in [0u64, 1, 99, 100, 101, 950, 1000, 1049] {
            let t = epoch + Duration::from_millis(ms);
            let d = on_tick(epoch, t, TICK);
            assert!(d >= t && d - t < TICK, "{ms} ms");
            assert_eq!((d - epoch).as_nanos() % TICK.as_nanos(), 0, "{ms} ms");
        }
        // A second's wait lands on a whole second, at most a second late; shorter ones on
        // the tenths.
        let now = epoch + Duration::from_millis(1234);
        let idle = next_look(epoch, now, Duration::from_secs(1));
        assert_eq!(idle, epoch + Duration::from_secs(3));
        let busy = next_look(epoch, now, Duration::from_millis(200));
        assert_eq!(busy, epoch + Duration::from_millis(1500));
        for ms in [0u64, 1, 499, 999] {
            let now = epoch + Duration::from_secs(7) + Duration::from_millis(ms);
            let d = next_look(epoch, now, IDLE_TICK);
            assert!(d >= now + IDLE_TICK && d - now < 2 * IDLE_TICK, "{ms} ms");
        }
    }
    use crate::backend::device::{DeviceConfig, DeviceStats, Platform};
    use crate::backend::features::HostOffer;
    use crate::plugin::GuardedDisk;
    use crate::xen::sim::xenstored::SimXenstored;
    use crate::xen::xenstore::{Xenstore, NO_TX};
    use std::sync::atomic::AtomicBool;
    use xen_disk_plugin_api::{Disk, DiskInfo, ReadBufs, Result as PResult, WriteBufs};

    struct Zero;
    impl Disk for Zero {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, _: u64, bufs: &mut ReadBufs<'_>) -> PResult<()> {
            bufs.fill(0);
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> PResult<()> {
            Ok(())
        }
    }

    /// Many devices on two loops: each publishes InitWait, each follows its own frontend
    /// (one asked to go offline closes and is removed while the others stay), and a stop
    /// ends them all; the loops' threads end when the last device has.
    #[test]
    fn many_devices_share_two_loops_and_each_follows_its_own_frontend() {
        let xsd = SimXenstored::new();
        let loops = DeviceLoops::new(2).unwrap();
        let dom0 = xsd.connect(0).unwrap();
        let platform = {
            let d = crate::xen::sim::hypervisor::SimDomain::new(1, 1, 1).unwrap();
            let view = Arc::new(d.backend(0));
            Platform {
                grants: view.clone(),
                evtchns: view,
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for n in 0..20 {
            let be = format!("/local/domain/0/backend/vbd3/1/{n}");
            let fe = format!("/local/domain/1/device/vbd/{n}");
            dom0.write(NO_TX, &format!("{fe}/state"), b"1").unwrap();
            dom0.write(NO_TX, &format!("{be}/state"), b"1").unwrap();
            let cfg = DeviceConfig {
                backend_path: be,
                frontend_path: fe,
                frontend_domid: 1,
                offer: HostOffer::standard(1, 1),
                workers: 0,
                remove_entries: false,
                poll: Duration::ZERO,
                answer_on_completion: false,
                journal: None,
                park_after: None,
                latency_every: 1,
            };
            let disk = Arc::new(GuardedDisk::new(Box::new(Zero), false).unwrap());
            let task = DeviceTask::new(
                Arc::new(xsd.connect(0).unwrap()),
                platform.clone(),
                cfg,
                disk,
                stop.clone(),
                Arc::new(DeviceStats::default()),
            );
            handles.push(loops.start(task));
        }
        let state = |n: usize| {
            dom0.read(NO_TX, &format!("/local/domain/0/backend/vbd3/1/{n}/state"))
                .ok()
        };
        let wait_for = |what: &dyn Fn() -> bool, why: &str| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !what() {
                assert!(Instant::now() < deadline, "{why}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_for(
            &|| (0..20).all(|n| state(n).as_deref() == Some(b"2")),
            "every device publishes InitWait",
        );
        // Device 7's frontend lets go and the toolstack takes it offline: it closes and is
        // removed, while the others stay as they are.
        dom0.write(NO_TX, "/local/domain/0/backend/vbd3/1/7/online", b"0")
            .unwrap();
        dom0.write(NO_TX, "/local/domain/1/device/vbd/7/state", b"6")
            .unwrap();
        wait_for(&|| handles[7].is_finished(), "device 7 ends");
        assert!(
            (0..20)
                .filter(|&n| n != 7)
                .all(|n| !handles[n].is_finished()),
            "only device 7 ended"
        );
        assert!((0..20)
            .filter(|&n| n != 7)
            .all(|n| state(n).as_deref() == Some(b"2")));
        // Stopped, each closes, and (its frontend never connected) is removed.
        stop.store(true, Ordering::SeqCst);
        wait_for(
            &|| handles.iter().all(DoneHandle::is_finished),
            "every device ends on stop",
        );
        drop(loops);
        for h in handles {
            assert!(matches!(h.join(), Ok(Ok(()))));
        }
    }
}
