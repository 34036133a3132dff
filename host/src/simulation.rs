//! A disk served end to end without Xen: the simulated xenstored, a simulated guest with
//! the Rust frontend, and the real device in between, all in this process. What `sim read`
//! and `sim write` run, and what a plugin vendor uses to try a plugin through the whole path.
//!
//! ```text
//!  guest: handshake, FrontQueue, DataPages ─ ring, grants, event channels ─▶ device (queue
//!  threads, workers) ─▶ GuardedDisk ─▶ plugin
//! ```

use crate::backend::attach::{create_device, DevicePaths};
use crate::backend::device::{run, DeviceConfig, DeviceError, DeviceStats, DeviceTask, Platform};
use crate::backend::features::HostOffer;
use crate::backend::vbd::Vbd;
use crate::blkif::abi::*;
use crate::blkif::request::Segment;
use crate::frontend::handshake::{connect, Connected, Device, Wishes};
use crate::frontend::pages::{DataPage, DataPages};
use crate::plugin::GuardedDisk;
use crate::xen::sim::hypervisor::SimDomain;
use crate::xen::sim::xenstored::SimXenstored;
use crate::xen::xenbus::{read_state, write_state, XenbusState};
use crate::xen::xenstore::client::XsClient;
use crate::xen::xenstore::{Xenstore, NO_TX};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The simulated guest's domain id.
pub const GUEST: u32 = 1;
/// Requests kept in flight by [`SimulatedDisk::read`] and [`SimulatedDisk::write`].
const DEPTH: usize = 4;
/// Pages per request: 1 MiB with indirect descriptors.
const PAGES_PER_REQUEST: usize = 256;
const HANDSHAKE: Duration = Duration::from_secs(10);

/// A request in flight: where its bytes start, its data pages, its indirect list page.
struct Lent {
    at: usize,
    data: Vec<DataPage>,
    list: Option<DataPage>,
}

/// How the simulated guest and the device meet: what the guest asks for and how the device
/// serves. The defaults are what a modern Linux guest negotiates.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Ring pages the guest asks for, as an order (0: one page, 4: sixteen).
    pub ring_page_order: u32,
    /// Queues (rings) the guest asks for; requests are spread over them.
    pub queues: u32,
    /// The guest asks for persistent grants.
    pub persistent: bool,
    /// The guest uses indirect descriptors when offered (1 MiB requests); otherwise 44 KiB.
    pub indirect: bool,
    /// Worker threads per ring on the device (0: served on the ring thread).
    pub workers: usize,
    /// An asynchronous plugin's completing threads answer the guest themselves (see
    /// [`crate::backend::queue::QueueParts::answer_on_completion`]).
    pub answer_on_completion: bool,
    /// How long the device's rings stay idle before they give their threads up.
    pub park_after: Option<Duration>,
    /// The device times latency on one request in this many (0: by the clocksource; see
    /// [`crate::backend::queue::clock`]).
    pub latency_every: u32,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            ring_page_order: MAX_RING_PAGE_ORDER,
            queues: 1,
            persistent: true,
            indirect: true,
            workers: 2,
            answer_on_completion: true,
            park_after: Some(crate::backend::queue::PARK_AFTER),
            latency_every: 0,
        }
    }
}

/// A connected guest's side of one disk: its queues and data pages. Reads and writes go
/// through the ring as blkfront's would.
pub struct GuestDisk {
    conn: Connected,
    pages: DataPages,
    indirect: bool,
    next_queue: usize,
}

impl GuestDisk {
    /// Connects the guest `domain` (whose xenstore connection is `xs`) to the device at
    /// `frontend`/`backend`, with rings from guest page `first_page` and data pages after
    /// them.
    pub fn attach(
        xs: &dyn Xenstore,
        domain: &Arc<SimDomain>,
        frontend: &str,
        backend: &str,
        first_page: usize,
        opts: &SimOptions,
    ) -> Result<GuestDisk, String> {
        let dev = Device {
            frontend,
            backend,
            backend_domid: 0,
        };
        let wishes = Wishes {
            ring_page_order: opts.ring_page_order,
            queues: opts.queues,
            persistent: opts.persistent,
            protocol: Protocol::X86_64,
        };
        let conn =
            connect(xs, domain, dev, first_page, wishes, HANDSHAKE).map_err(|e| e.to_string())?;
        let ring_pages = conn.queues.len() << MAX_RING_PAGE_ORDER;
        let data_pages = DEPTH * (PAGES_PER_REQUEST + 1);
        let pages = DataPages::new(
            domain.clone(),
            0,
            first_page + ring_pages,
            data_pages,
            conn.disk.persistent,
        )
        .ok_or("guest pages")?;
        Ok(GuestDisk {
            conn,
            pages,
            indirect: opts.indirect,
            next_queue: 0,
        })
    }

    /// Guest pages one attached disk uses (rings and data), for laying out several.
    pub fn pages_needed(queues: u32) -> usize {
        ((queues as usize) << MAX_RING_PAGE_ORDER) + DEPTH * (PAGES_PER_REQUEST + 1)
    }

    /// What the guest was told about the disk.
    pub fn description(&self) -> &crate::frontend::handshake::DiskDescription {
        &self.conn.disk
    }

    /// Queues negotiated.
    pub fn queues(&self) -> usize {
        self.conn.queues.len()
    }

    /// The disk's size in bytes, as the guest was told.
    pub fn size(&self) -> u64 {
        self.conn.disk.sectors * 512
    }

    /// Reads the disk from `offset` into `out` (multiples of 512).
    pub fn read(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String> {
        let len = out.len();
        let mut drain = |pages: &mut DataPages, p: DataPage, at: usize, l: usize| {
            pages.read(p, 0, &mut out[at..at + l]);
        };
        self.run(offset, len, false, &mut |_, _, _, _| {}, &mut drain)
    }

    /// Writes `data` to the disk at `offset` (multiples of 512).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let mut fill = |pages: &mut DataPages, p: DataPage, at: usize, l: usize| {
            pages.fill(p, 0, &data[at..at + l]);
        };
        self.run(offset, data.len(), true, &mut fill, &mut |_, _, _, _| {})
    }

    /// Moves `len` bytes at `offset` in 1 MiB requests, `DEPTH` in flight.
    fn run(
        &mut self,
        offset: u64,
        len: usize,
        write: bool,
        fill: &mut dyn FnMut(&mut DataPages, DataPage, usize, usize),
        drain: &mut dyn FnMut(&mut DataPages, DataPage, usize, usize),
    ) -> Result<(), String> {
        if !len.is_multiple_of(512)
            || !offset.is_multiple_of(512)
            || offset + len as u64 > self.size()
        {
            return Err(format!(
                "{offset}+{len} is not whole sectors inside the {}-byte disk",
                self.size()
            ));
        }
        let conn = &mut self.conn;
        let indirect = self.indirect && conn.disk.max_indirect_segments >= PAGES_PER_REQUEST as u32;
        let chunk = if indirect {
            PAGES_PER_REQUEST
        } else {
            BLKIF_MAX_SEGMENTS_PER_REQUEST
        } * XEN_PAGE_SIZE;
        let op = if write { RwOp::Write } else { RwOp::Read };
        // Each call uses the next queue, as a guest's CPUs take turns.
        self.next_queue = (self.next_queue + 1) % conn.queues.len();
        let q = &mut conn.queues[self.next_queue];
        let mut lent: Vec<Option<Lent>> = (0..q.free()).map(|_| None).collect();
        let (mut next, mut done) = (0usize, 0usize);
        while done < len {
            while next < len && q.in_flight() < DEPTH {
                let n = chunk.min(len - next);
                let mut data = Vec::new();
                let mut segs = Vec::new();
                for at in (0..n).step_by(XEN_PAGE_SIZE) {
                    // The backend writes into the page only for a read.
                    let p = self.pages.take(write).ok_or("out of guest pages")?;
                    let l = XEN_PAGE_SIZE.min(n - at);
                    if write {
                        fill(&mut self.pages, p, next + at, l);
                    }
                    segs.push(Segment {
                        gref: p.gref,
                        first_sect: 0,
                        last_sect: (l / 512 - 1) as u8,
                    });
                    data.push(p);
                }
                let sector = (offset + next as u64) / 512;
                let (id, list) = if indirect {
                    let list = self.pages.take(true).ok_or("out of guest pages")?;
                    self.pages.write_segments(list, &segs);
                    (
                        q.submit_indirect(op, sector, segs.len() as u16, &[list.gref]),
                        Some(list),
                    )
                } else {
                    (q.submit_rw(op, sector, &segs), None)
                };
                let id = id.ok_or("ring full")?;
                lent[id as usize] = Some(Lent {
                    at: next,
                    data,
                    list,
                });
                next += n;
            }
            q.kick().map_err(|e| e.to_string())?;
            let mut finished = Vec::new();
            q.reap(|c| finished.push(c)).map_err(|e| e.to_string())?;
            for c in &finished {
                let Some(Lent { at, data, list }) = lent[c.id as usize].take() else {
                    continue;
                };
                if !c.is_ok() {
                    return Err(format!(
                        "the device answered {} for bytes {}+",
                        status_name(c.status),
                        offset + at as u64
                    ));
                }
                let mut pos = at;
                let end = (at + chunk).min(len);
                for p in data {
                    let l = XEN_PAGE_SIZE.min(end - pos);
                    if !write {
                        drain(&mut self.pages, p, pos, l);
                    }
                    pos += l;
                    self.pages.release(p);
                }
                if let Some(l) = list {
                    self.pages.release(l);
                }
                done += end - at;
            }
            if finished.is_empty() {
                q.wait(Duration::from_secs(30)).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset`; the device's status (EOPNOTSUPP when not offered).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<i16, String> {
        let q = &mut self.conn.queues[0];
        q.submit_discard(offset / 512, len / 512, false)
            .ok_or("ring full")?;
        q.kick().map_err(|e| e.to_string())?;
        let done = q
            .collect(1, Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        Ok(done[0].status)
    }

    /// Asks the device to make everything written durable (when it offers flush).
    pub fn flush(&mut self) -> Result<(), String> {
        let conn = &mut self.conn;
        if !conn.disk.flush {
            return Ok(());
        }
        let q = &mut conn.queues[0];
        q.submit_rw(RwOp::Flush, 0, &[]).ok_or("ring full")?;
        q.kick().map_err(|e| e.to_string())?;
        loop {
            let mut done = None;
            q.reap(|c| done = Some(c)).map_err(|e| e.to_string())?;
            match done {
                Some(c) if c.is_ok() => return Ok(()),
                Some(c) => return Err(format!("flush answered {}", status_name(c.status))),
                None => {
                    q.wait(Duration::from_secs(30)).map_err(|e| e.to_string())?;
                }
            }
        }
    }
}

/// One disk, its device and a connected guest.
pub struct SimulatedDisk {
    stop: Arc<AtomicBool>,
    device: Option<JoinHandle<Result<(), DeviceError>>>,
    guest_xs: XsClient,
    paths: DevicePaths,
    guest: Option<GuestDisk>,
    domain: Arc<SimDomain>,
    _xenstored: SimXenstored,
}

impl SimulatedDisk {
    /// Starts the device on `disk` and connects a guest to it, as a modern Linux guest would.
    pub fn start(disk: Arc<GuardedDisk>) -> Result<SimulatedDisk, String> {
        SimulatedDisk::start_with(disk, &SimOptions::default())
    }

    /// As [`start`](Self::start), with the guest's wishes and the device's workers chosen.
    pub fn start_with(disk: Arc<GuardedDisk>, opts: &SimOptions) -> Result<SimulatedDisk, String> {
        SimulatedDisk::start_counted(disk, opts, Arc::new(DeviceStats::default()))
    }

    /// As [`start_with`](Self::start_with), the device counting into `stats` and limited by
    /// its limiter (for `connect --sim`'s control socket and metrics).
    pub fn start_counted(
        disk: Arc<GuardedDisk>,
        opts: &SimOptions,
        stats: Arc<DeviceStats>,
    ) -> Result<SimulatedDisk, String> {
        let xenstored = SimXenstored::new();
        xenstored.add_domain(GUEST, "sim-guest", "00000000-0000-0000-0000-000000000001");
        let dom0 = xenstored.connect(0).map_err(|e| e.to_string())?;
        let read_only = disk.info().read_only;
        let paths =
            create_device(&dom0, 0, GUEST, Vbd::disk(1), read_only).map_err(|e| e.to_string())?;
        let domain = SimDomain::new(
            GUEST,
            // Room for up to 4 queues, so a reboot may ask for more than the first connect.
            GuestDisk::pages_needed(opts.queues.max(4)),
            // Room for a few reconnects: grants are not ended when a queue is dropped.
            4 * ((DEPTH * (PAGES_PER_REQUEST + 1)).div_ceil(256) + 1 + opts.queues as usize),
        )
        .map_err(|e| e.to_string())?;
        let view = Arc::new(domain.backend(0));
        let platform = Platform {
            grants: view.clone(),
            evtchns: view,
        };
        let cfg = DeviceConfig {
            backend_path: paths.backend.clone(),
            frontend_path: paths.frontend.clone(),
            frontend_domid: GUEST,
            offer: HostOffer::standard(4, 4),
            workers: opts.workers,
            remove_entries: true,
            poll: Duration::ZERO,
            answer_on_completion: opts.answer_on_completion,
            journal: None,
            park_after: opts.park_after,
            latency_every: opts.latency_every,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let device_xs = xenstored.connect(0).map_err(|e| e.to_string())?;
        let device = std::thread::Builder::new()
            .name("xen-disk-device".into())
            .spawn(move || {
                run(DeviceTask::new(
                    Arc::new(device_xs),
                    platform,
                    cfg,
                    disk,
                    s,
                    stats,
                ))
            })
            .map_err(|e| e.to_string())?;
        let guest_xs = xenstored.connect(GUEST).map_err(|e| e.to_string())?;
        let guest =
            GuestDisk::attach(&guest_xs, &domain, &paths.frontend, &paths.backend, 0, opts)?;
        Ok(SimulatedDisk {
            stop,
            device: Some(device),
            guest_xs,
            paths,
            guest: Some(guest),
            domain,
            _xenstored: xenstored,
        })
    }

    fn guest(&mut self) -> Result<&mut GuestDisk, String> {
        self.guest
            .as_mut()
            .ok_or_else(|| "not connected".to_string())
    }

    /// The disk's size in bytes, as the guest was told.
    pub fn size(&self) -> u64 {
        self.guest.as_ref().map_or(0, GuestDisk::size)
    }

    /// The guest's side, for what [`read`](Self::read) and [`write`](Self::write) don't cover.
    pub fn guest_disk(&mut self) -> Option<&mut GuestDisk> {
        self.guest.as_mut()
    }

    /// Reads the disk from `offset` into `out` (multiples of 512).
    pub fn read(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String> {
        self.guest()?.read(offset, out)
    }

    /// Writes `data` to the disk at `offset` (multiples of 512).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.guest()?.write(offset, data)
    }

    /// Asks the device to make everything written durable (when it offers flush).
    pub fn flush(&mut self) -> Result<(), String> {
        self.guest()?.flush()
    }

    /// The guest reboots: its driver lets go (Closed), the device tears the rings down, the
    /// driver starts over (Initialising) and connects again with `opts`.
    pub fn reboot(&mut self, opts: &SimOptions) -> Result<(), String> {
        self.guest = None;
        let fe = &self.paths.frontend;
        let be = &self.paths.backend;
        write_state(&self.guest_xs, fe, XenbusState::Closed).map_err(|e| e.to_string())?;
        self.wait_backend(XenbusState::Closed)?;
        write_state(&self.guest_xs, fe, XenbusState::Initialising).map_err(|e| e.to_string())?;
        self.wait_backend(XenbusState::InitWait)?;
        self.guest = Some(GuestDisk::attach(
            &self.guest_xs,
            &self.domain,
            fe,
            be,
            0,
            opts,
        )?);
        Ok(())
    }

    /// Takes the backend's current `sectors` as the disk's size, as blkfront does when the
    /// backend rewrites its state after an online resize.
    pub fn refresh_size(&mut self) {
        if let (Some(sectors), Some(g)) = (self.backend_sectors(), self.guest.as_mut()) {
            g.conn.disk.sectors = sectors;
        }
    }

    /// The `sectors` the backend publishes now (it changes on online resize).
    pub fn backend_sectors(&self) -> Option<u64> {
        let v = self
            .guest_xs
            .read(NO_TX, &format!("{}/sectors", self.paths.backend))
            .ok()?;
        std::str::from_utf8(&v).ok()?.trim().parse().ok()
    }

    fn wait_backend(&self, state: XenbusState) -> Result<(), String> {
        let be = &self.paths.backend;
        let deadline = std::time::Instant::now() + HANDSHAKE;
        loop {
            if read_state(&self.guest_xs, be) == Some(state) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("{be}/state never became {state:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Detaches: the device closes, the guest closes, the device removes itself.
    pub fn shutdown(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        self.guest = None;
        let _ = write_state(&self.guest_xs, &self.paths.frontend, XenbusState::Closed);
        match self.device.take().map(|d| d.join()) {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(e.to_string()),
            Some(Err(_)) => Err("the device thread panicked".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xen_disk_plugin_api::{Disk, DiskInfo, Error, ReadBufs, Result, WriteBufs};

    /// A disk whose reads fail with `Error::unsupported` at offset 0 and an I/O error elsewhere.
    struct Failing;
    impl Disk for Failing {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, offset: u64, _: &mut ReadBufs<'_>) -> Result<()> {
            Err(match offset {
                0 => Error::unsupported("reading here"),
                _ => Error::io(libc::EIO, "the medium is gone"),
            })
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
            Ok(())
        }
    }

    /// A disk in memory.
    struct Mem(std::sync::Mutex<Vec<u8>>);
    impl Disk for Mem {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(self.0.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
            let m = self.0.lock().unwrap();
            let at = offset as usize;
            bufs.copy_from(&m[at..at + bufs.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
            let mut m = self.0.lock().unwrap();
            let at = offset as usize;
            bufs.copy_to(&mut m[at..at + bufs.len()]);
            Ok(())
        }
    }

    fn parks(stats: &DeviceStats) -> Vec<u64> {
        stats
            .queues
            .lock()
            .unwrap()
            .iter()
            .map(|q| q.parks.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits until every ring has parked more often than `before` says.
    fn all_parked_since(stats: &DeviceStats, before: &[u64]) -> Vec<u64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let now = parks(stats);
            if now.len() == before.len() && now.iter().zip(before).all(|(n, b)| n > b) {
                return now;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rings never parked: {before:?} -> {now:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rings that give their threads up while idle come back for the next request, with
    /// workers and without, one queue and several; every write reads back, and a device
    /// whose rings are parked stops cleanly.
    #[test]
    fn parked_rings_wake_for_the_next_request_and_stop_cleanly() {
        for (queues, workers) in [(1, 2), (3, 0)] {
            let mem = Mem(std::sync::Mutex::new(vec![0u8; 4 << 20]));
            let disk = Arc::new(GuardedDisk::new(Box::new(mem), false).unwrap());
            let opts = SimOptions {
                queues,
                workers,
                park_after: Some(Duration::from_millis(30)),
                ..SimOptions::default()
            };
            let stats = Arc::new(DeviceStats::default());
            let mut sim = SimulatedDisk::start_counted(disk, &opts, stats.clone()).unwrap();
            let mut seen = vec![0; queues as usize];
            for round in 0..6u8 {
                seen = all_parked_since(&stats, &seen);
                // One request per queue each way (the guest takes queues in turn): each
                // wakes a parked ring.
                for piece in 0..u64::from(queues) {
                    let at = (u64::from(round) * 8 + piece) * 64 * 1024;
                    let data: Vec<u8> = (0..64 * 1024).map(|i| (i as u8) ^ round).collect();
                    sim.write(at, &data).unwrap();
                    let mut back = vec![0u8; data.len()];
                    sim.read(at, &mut back).unwrap();
                    assert!(back == data, "round {round}: the data read back differs");
                }
            }
            all_parked_since(&stats, &seen);
            sim.shutdown().unwrap();
        }
    }

    /// Where the clock is a system call the rings time one request in N: every request is
    /// still counted, exactly one in N lands in the latency histogram, on the ring thread
    /// and on workers alike.
    #[test]
    fn sampled_latency_times_one_request_in_n_and_counts_them_all() {
        for workers in [0, 2] {
            let mem = Mem(std::sync::Mutex::new(vec![0u8; 1 << 20]));
            let disk = Arc::new(GuardedDisk::new(Box::new(mem), false).unwrap());
            let opts = SimOptions {
                workers,
                latency_every: 4,
                ..SimOptions::default()
            };
            let stats = Arc::new(DeviceStats::default());
            let mut sim = SimulatedDisk::start_counted(disk, &opts, stats.clone()).unwrap();
            let data = vec![0x5au8; 8192];
            for i in 0..20u64 {
                sim.write(i * 8192, &data).unwrap();
                let mut back = vec![0u8; data.len()];
                sim.read(i * 8192, &mut back).unwrap();
                assert!(back == data);
            }
            let queues = stats.queues.lock().unwrap();
            let q = &queues[0];
            let served: u64 = [&q.reads, &q.writes, &q.flushes, &q.discards]
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum();
            assert!(served >= 40, "workers {workers}: {served} served");
            let timed = q.latency.snapshot().count();
            assert_eq!(timed, served / 4, "workers {workers}: {served} served");
            drop(queues);
            sim.shutdown().unwrap();
        }
    }

    /// A plugin whose reads wait until the gate opens (a hung cluster, say).
    struct Gate {
        open: std::sync::Mutex<bool>,
        changed: std::sync::Condvar,
        entered: std::sync::atomic::AtomicBool,
    }
    impl Gate {
        fn set(&self) {
            *self.open.lock().unwrap() = true;
            self.changed.notify_all();
        }
    }
    struct Gated(Arc<Gate>);
    impl Disk for Gated {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, _: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
            self.0.entered.store(true, Ordering::SeqCst);
            let mut open = self.0.open.lock().unwrap();
            while !*open {
                open = self.0.changed.wait(open).unwrap();
            }
            bufs.fill(0);
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
            Ok(())
        }
    }

    /// A device whose guest closed while the plugin holds one of its requests drains on its
    /// own: the other devices of its loop go on meanwhile (here, another guest connects).
    #[test]
    fn a_device_draining_a_held_request_does_not_hold_up_its_loop() {
        held_read_does_not_hold_up_the_loop(|_, guest_xs, first| {
            write_state(guest_xs, &first.frontend, XenbusState::Closed).unwrap();
        });
    }

    /// The same when the toolstack removes the device (its backend directory goes) while the
    /// plugin holds a request: the device ends once the request is answered, and its loop's
    /// other devices do not wait for that.
    #[test]
    fn a_device_removed_while_its_plugin_holds_a_request_does_not_hold_up_its_loop() {
        held_read_does_not_hold_up_the_loop(|dom0, _, first| {
            dom0.rm(NO_TX, &first.backend).unwrap();
        });
    }

    /// Two devices on one loop; the first one's plugin holds a read, then `go_away` (given
    /// dom0's and the guest's xenstore and the first device's paths) ends that device; a
    /// guest then connects to the second device, before the held read is let go.
    fn held_read_does_not_hold_up_the_loop(
        go_away: impl FnOnce(&dyn Xenstore, &dyn Xenstore, &DevicePaths),
    ) {
        use crate::backend::device_loop::DeviceLoops;
        use crate::backend::done::DoneHandle;
        let xenstored = SimXenstored::new();
        xenstored.add_domain(GUEST, "sim-guest", "00000000-0000-0000-0000-000000000001");
        let dom0 = xenstored.connect(0).unwrap();
        let per_disk = GuestDisk::pages_needed(1);
        let domain = SimDomain::new(GUEST, 2 * per_disk, 64).unwrap();
        let view = Arc::new(domain.backend(0));
        let platform = Platform {
            grants: view.clone(),
            evtchns: view,
        };
        let loops = DeviceLoops::new(1).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Gate {
            open: std::sync::Mutex::new(false),
            changed: std::sync::Condvar::new(),
            entered: AtomicBool::new(false),
        });
        let opts = SimOptions {
            queues: 1,
            workers: 1,
            park_after: None,
            ..SimOptions::default()
        };
        let mut devices = Vec::new();
        let mut handles = Vec::new();
        for (n, disk) in [
            Box::new(Gated(gate.clone())) as Box<dyn Disk>,
            Box::new(Mem(std::sync::Mutex::new(vec![0u8; 1 << 20]))),
        ]
        .into_iter()
        .enumerate()
        {
            let paths = create_device(&dom0, 0, GUEST, Vbd::disk(n as u32 + 1), false).unwrap();
            let cfg = DeviceConfig {
                backend_path: paths.backend.clone(),
                frontend_path: paths.frontend.clone(),
                frontend_domid: GUEST,
                offer: HostOffer::standard(1, 1),
                workers: opts.workers,
                remove_entries: true,
                poll: Duration::ZERO,
                answer_on_completion: false,
                journal: None,
                park_after: None,
                latency_every: 1,
            };
            let task = DeviceTask::new(
                Arc::new(xenstored.connect(0).unwrap()),
                platform.clone(),
                cfg,
                Arc::new(GuardedDisk::new(disk, false).unwrap()),
                stop.clone(),
                Arc::new(DeviceStats::default()),
            );
            handles.push(loops.start(task));
            devices.push(paths);
        }
        let guest_xs = xenstored.connect(GUEST).unwrap();
        let mut first = GuestDisk::attach(
            &guest_xs,
            &domain,
            &devices[0].frontend,
            &devices[0].backend,
            0,
            &opts,
        )
        .unwrap();
        // The first guest's read is held by the plugin; then the guest closes its side.
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let _ = first.read(0, &mut buf);
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !gate.entered.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the read never reached the plugin"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        go_away(&dom0, &guest_xs, &devices[0]);
        std::thread::sleep(Duration::from_millis(300));
        // The second guest connects while the first device still drains.
        let second = GuestDisk::attach(
            &guest_xs,
            &domain,
            &devices[1].frontend,
            &devices[1].backend,
            per_disk,
            &opts,
        );
        gate.set();
        reader.join().unwrap();
        let mut second =
            second.expect("the second guest could not connect while the first device drained");
        let mut back = vec![1u8; 4096];
        second.read(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        // Stopped, the devices close; the second guest lets go, as blkfront would.
        stop.store(true, Ordering::SeqCst);
        drop(second);
        write_state(&guest_xs, &devices[1].frontend, XenbusState::Closed).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !handles.iter().all(DoneHandle::is_finished) {
            assert!(
                std::time::Instant::now() < deadline,
                "devices did not end on stop"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_failed_read_names_the_status() {
        let disk = GuardedDisk::new(Box::new(Failing), false).unwrap();
        let mut sim = SimulatedDisk::start(Arc::new(disk)).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = sim.read(8192, &mut buf).unwrap_err();
        assert!(
            e.contains("BLKIF_RSP_ERROR (-1: the request failed) for bytes 8192+"),
            "{e}"
        );
        let e = sim.read(0, &mut buf).unwrap_err();
        assert!(
            e.contains("BLKIF_RSP_EOPNOTSUPP (-2: not supported)"),
            "{e}"
        );
    }
}
