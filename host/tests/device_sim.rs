//! A whole device through the simulator: the backend state machine and the Rust frontend's
//! handshake over the simulated xenstored with real permissions, data through granted pages
//! to a disk, a guest "reboot" (close, reinitialise, reconnect) with the data intact, and a
//! clean stop that removes the device.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod common;
use std::time::{Duration, Instant};
use xen_disk_host::backend::attach::create_device;
use xen_disk_host::backend::device::{
    run, DeviceConfig, DeviceError, DeviceStats, DeviceTask, Platform,
};
use xen_disk_host::backend::features::HostOffer;
use xen_disk_host::backend::vbd::Vbd;
use xen_disk_host::blkif::abi::*;
use xen_disk_host::blkif::request::Segment;
use xen_disk_host::frontend::handshake::{connect, Connected, Device, Wishes};
use xen_disk_host::frontend::pages::{DataPage, DataPages};
use xen_disk_host::xen::sim::hypervisor::SimDomain;
use xen_disk_host::xen::sim::xenstored::SimXenstored;
use xen_disk_host::xen::xenstore::{Xenstore, NO_TX};

const GUEST: u32 = 6;
const FE: &str = "/local/domain/6/device/vbd/51728";
const BE: &str = "/local/domain/0/backend/vbd3/6/51728";
const SIZE: u64 = 16 << 20;

/// The device's entries as `connect` writes them (vbd 1 = xvdb = 51728).
fn create(dom0: &dyn Xenstore) {
    let p = create_device(dom0, 0, GUEST, Vbd::disk(1), false).unwrap();
    assert_eq!((p.backend.as_str(), p.frontend.as_str()), (BE, FE));
}

/// Starts the device for `domain` in its own thread.
fn start_device(
    xs: &SimXenstored,
    domain: &Arc<SimDomain>,
    workers: usize,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<(), DeviceError>> {
    let view = Arc::new(domain.backend(0));
    let platform = Platform {
        grants: view.clone(),
        evtchns: view,
    };
    let cfg = DeviceConfig {
        backend_path: BE.into(),
        frontend_path: FE.into(),
        frontend_domid: GUEST,
        offer: HostOffer {
            max_ring_page_order: 4,
            max_queues: 2,
            max_indirect_segments: 256,
            persistent: true,
        },
        workers,
        remove_entries: true,
        poll: Duration::from_micros(20),
        answer_on_completion: false,
        journal: None,
        // Short: rings park and wake all through the test.
        park_after: Some(Duration::from_millis(50)),
        latency_every: 1,
    };
    let disk = common::ram_disk(SIZE);
    let device_xs = xs.connect(0).unwrap();
    let s = stop.clone();
    std::thread::spawn(move || {
        run(DeviceTask::new(
            Arc::new(device_xs),
            platform,
            cfg,
            disk,
            s,
            Arc::new(DeviceStats::default()),
        ))
    })
}

fn wait_for(xs: &dyn Xenstore, path: &str, want: &[u8]) {
    let started = Instant::now();
    while xs.read(NO_TX, path).ok().as_deref() != Some(want) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{path} never became {:?}",
            String::from_utf8_lossy(want)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn byte(i: usize) -> u8 {
    (i * 17 % 241) as u8
}

/// Writes (or reads and checks) 64 pages at sector 800 through queue 0.
fn io(c: &mut Connected, pages: &mut DataPages, write: bool) {
    let q = &mut c.queues[0];
    let used: Vec<DataPage> = (0..64).map(|_| pages.take(write).unwrap()).collect();
    if write {
        for (i, p) in used.iter().enumerate() {
            assert!(pages.fill(
                *p,
                0,
                &(0..4096).map(|j| byte(i * 4096 + j)).collect::<Vec<_>>()
            ));
        }
    }
    for (n, chunk) in used.chunks(8).enumerate() {
        let segs: Vec<Segment> = chunk
            .iter()
            .map(|p| Segment {
                gref: p.gref,
                first_sect: 0,
                last_sect: 7,
            })
            .collect();
        let op = if write { RwOp::Write } else { RwOp::Read };
        q.submit_rw(op, 800 + (n * 64) as u64, &segs).unwrap();
    }
    q.kick().unwrap();
    assert!(q
        .collect(8, Duration::from_secs(10))
        .unwrap()
        .iter()
        .all(|c| c.status == BLKIF_RSP_OKAY));
    if !write {
        for (i, p) in used.iter().enumerate() {
            let mut got = vec![0u8; 4096];
            pages.read(*p, 0, &mut got);
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(j, &b)| b == byte(i * 4096 + j)),
                "page {i} differs"
            );
        }
    }
    used.into_iter().for_each(|p| pages.release(p));
}

#[test]
fn connect_serve_reboot_reconnect_and_stop() {
    let xs = SimXenstored::new();
    xs.add_domain(GUEST, "guest", "00000000-0000-0000-0000-000000000006");
    let dom0 = xs.connect(0).unwrap();
    create(&dom0);
    let domain = SimDomain::new(GUEST, 1024, 4).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let device = start_device(&xs, &domain, 2, &stop);

    let guest = xs.connect(GUEST).unwrap();
    let dev = Device {
        frontend: FE,
        backend: BE,
        backend_domid: 0,
    };
    let wishes = Wishes {
        ring_page_order: 2,
        queues: 2,
        persistent: true,
        protocol: Protocol::X86_64,
    };
    let mut c = connect(&guest, &domain, dev, 0, wishes, Duration::from_secs(10)).unwrap();
    assert_eq!(
        (c.queues.len(), c.disk.sectors, c.disk.persistent),
        (2, SIZE / 512, true)
    );
    assert_eq!(dom0.read(NO_TX, &format!("{BE}/state")).unwrap(), b"4");
    let mut pages = DataPages::new(domain.clone(), 0, 100, 128, c.disk.persistent).unwrap();
    io(&mut c, &mut pages, true);
    io(&mut c, &mut pages, false);

    // The guest reboots: closes, then starts over with new rings.
    drop(c);
    guest.write(NO_TX, &format!("{FE}/state"), b"5").unwrap();
    wait_for(&dom0, &format!("{BE}/state"), b"5");
    guest.write(NO_TX, &format!("{FE}/state"), b"6").unwrap();
    wait_for(&dom0, &format!("{BE}/state"), b"6");
    guest.write(NO_TX, &format!("{FE}/state"), b"1").unwrap();
    wait_for(&dom0, &format!("{BE}/state"), b"2");
    let wishes = Wishes {
        ring_page_order: 0,
        queues: 1,
        persistent: false,
        protocol: Protocol::X86_32,
    };
    let mut c = connect(&guest, &domain, dev, 40, wishes, Duration::from_secs(10)).unwrap();
    let mut pages = DataPages::new(domain.clone(), 0, 300, 128, c.disk.persistent).unwrap();
    io(&mut c, &mut pages, false);

    // Detach (Ctrl-C): the device closes, the guest closes, the device goes away.
    stop.store(true, Ordering::Relaxed);
    wait_for(&dom0, &format!("{BE}/state"), b"5");
    drop(c);
    guest.write(NO_TX, &format!("{FE}/state"), b"6").unwrap();
    assert_eq!(device.join().unwrap(), Ok(()));
    assert!(
        dom0.read(NO_TX, &format!("{BE}/state"))
            .unwrap_err()
            .is_enoent(),
        "backend directory removed"
    );
}

#[test]
fn garbage_from_the_frontend_closes_the_device_without_harm() {
    let xs = SimXenstored::new();
    xs.add_domain(GUEST, "guest", "00000000-0000-0000-0000-000000000006");
    let dom0 = xs.connect(0).unwrap();
    create(&dom0);
    let domain = SimDomain::new(GUEST, 64, 1).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let device = start_device(&xs, &domain, 1, &stop);
    wait_for(&dom0, &format!("{BE}/state"), b"2");
    let guest = xs.connect(GUEST).unwrap();
    // A ring reference that is not a number, and one that was never granted.
    for (key, value) in [
        ("ring-ref", "12abc"),
        ("event-channel", "3"),
        ("protocol", "x86_64-abi"),
        ("state", "3"),
    ] {
        guest
            .write(NO_TX, &format!("{FE}/{key}"), value.as_bytes())
            .unwrap();
    }
    wait_for(&dom0, &format!("{BE}/state"), b"5");
    let why = String::from_utf8(dom0.read(NO_TX, &format!("{BE}/error")).unwrap()).unwrap();
    assert!(why.contains("ring-ref"), "{why}");
    // The guest closes and the toolstack unplugs: the device goes away, nothing crashed.
    guest.write(NO_TX, &format!("{FE}/state"), b"6").unwrap();
    dom0.write(NO_TX, &format!("{BE}/online"), b"0").unwrap();
    assert_eq!(device.join().unwrap(), Ok(()));
}
