//! A malicious frontend against one disk while an honest guest uses another on the same host.
//!
//! Every hostile request is answered ERROR or EOPNOTSUPP (the backend never acts on it), a
//! broken ring or garbage xenstore keys close only the attacker's device, and after every
//! attack the honest guest's disk still round-trips data.

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
use xen_disk_host::blkif::request::{Request, Segment};
use xen_disk_host::frontend::handshake::{connect, Connected, Device, Wishes};
use xen_disk_host::simulation::{GuestDisk, SimOptions};
use xen_disk_host::xen::sim::hypervisor::SimDomain;
use xen_disk_host::xen::sim::machine::SimMachine;
use xen_disk_host::xen::sim::xenstored::SimXenstored;
use xen_disk_host::xen::xenstore::client::XsClient;
use xen_disk_host::xen::xenstore::{Xenstore, NO_TX};

const EVIL: u32 = 5;
const HONEST: u32 = 6;
const SIZE: u64 = 16 << 20;

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

struct Host {
    xs: SimXenstored,
    dom0: XsClient,
    machine: Arc<SimMachine>,
    stop: Arc<AtomicBool>,
    devices: Vec<std::thread::JoinHandle<Result<(), DeviceError>>>,
}

impl Host {
    fn new() -> Host {
        let xs = SimXenstored::new();
        let dom0 = xs.connect(0).unwrap();
        Host {
            xs,
            dom0,
            machine: Arc::new(SimMachine::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            devices: Vec::new(),
        }
    }

    /// A guest with one disk served to it; returns its domain and (frontend, backend).
    fn guest(&mut self, domid: u32, pages: usize) -> (Arc<SimDomain>, String, String) {
        self.xs.add_domain(
            domid,
            &format!("guest{domid}"),
            &format!("00000000-0000-0000-0000-{domid:012}"),
        );
        let domain = SimDomain::new(domid, pages, 64).unwrap();
        self.machine.add(&domain);
        let p = create_device(&self.dom0, 0, domid, Vbd::disk(1), false).unwrap();
        let cfg = DeviceConfig {
            backend_path: p.backend.clone(),
            frontend_path: p.frontend.clone(),
            frontend_domid: domid,
            offer: HostOffer {
                max_ring_page_order: 2,
                max_queues: 2,
                max_indirect_segments: 256,
                persistent: true,
            },
            workers: 2,
            remove_entries: true,
            poll: Duration::ZERO,
            answer_on_completion: false,
            journal: None,
            // Short: rings park and wake between the attacks.
            park_after: Some(Duration::from_millis(50)),
            // Timing a sample, as where the clock is a system call, under hostile rings too.
            latency_every: 3,
        };
        let platform = Platform {
            grants: self.machine.clone(),
            evtchns: self.machine.clone(),
        };
        let device_xs = self.xs.connect(0).unwrap();
        let s = self.stop.clone();
        self.devices.push(std::thread::spawn(move || {
            run(DeviceTask::new(
                Arc::new(device_xs),
                platform,
                cfg,
                common::ram_disk(SIZE),
                s,
                Arc::new(DeviceStats::default()),
            ))
        }));
        (domain, p.frontend, p.backend)
    }
}

/// The honest guest's check, run after every attack.
fn honest_round_trip(g: &mut GuestDisk, round: u8) {
    let data: Vec<u8> = (0..(1 << 20) + 4096)
        .map(|i: usize| (i as u8) ^ round)
        .collect();
    g.write(round as u64 * 4096, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    g.read(round as u64 * 4096, &mut back).unwrap();
    assert!(
        back == data,
        "the honest disk lost data after attack {round}"
    );
}

/// The key the error must name, what is wrong, and the keys the attacker writes.
type GarbageCase = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

fn seg(gref: u32, first_sect: u8, last_sect: u8) -> Segment {
    Segment {
        gref,
        first_sect,
        last_sect,
    }
}

fn rw(op: RwOp, sector_number: u64, nr_segments: u8, segs: &[Segment]) -> Request {
    let mut segments = [Segment::default(); 11];
    segments[..segs.len()].copy_from_slice(segs);
    Request::ReadWrite {
        op,
        nr_segments,
        id: 0,
        sector_number,
        segments,
    }
}

fn evil_connect(xs: &XsClient, domain: &Arc<SimDomain>, fe: &str, be: &str) -> Connected {
    let wishes = Wishes {
        ring_page_order: 0,
        queues: 1,
        persistent: false,
        protocol: Protocol::X86_64,
    };
    let dev = Device {
        frontend: fe,
        backend: be,
        backend_domid: 0,
    };
    connect(xs, domain, dev, 0, wishes, Duration::from_secs(10)).unwrap()
}

#[test]
fn an_attacker_gets_errors_and_disconnects_while_a_second_disk_keeps_serving() {
    let mut host = Host::new();
    let (evil_dom, efe, ebe) = host.guest(EVIL, 64);
    let (honest_dom, hfe, hbe) = host.guest(HONEST, GuestDisk::pages_needed(2) + 16);
    let honest_xs = host.xs.connect(HONEST).unwrap();
    let mut honest = GuestDisk::attach(
        &honest_xs,
        &honest_dom,
        &hfe,
        &hbe,
        0,
        &SimOptions {
            queues: 2,
            ..SimOptions::default()
        },
    )
    .unwrap();
    honest_round_trip(&mut honest, 0);

    let evil_xs = host.xs.connect(EVIL).unwrap();
    let mut evil = evil_connect(&evil_xs, &evil_dom, &efe, &ebe);
    // Pages the attacker owns: 8 granted read-write, one granted read-only, one indirect list.
    let page = |n: usize, ro: bool| evil_dom.grants.grant(n as u64, 0, ro).unwrap();
    let rw_page = page(10, false);
    let ro_page = page(11, true);
    let list_page = page(12, false);
    // An indirect list of 9 valid-looking segments, written into page 12.
    let mut list = vec![0u8; 4096];
    for i in 0..9 {
        seg(rw_page, 0, 7).encode(&mut list[i * 8..]);
    }
    assert!(evil_dom.memory.write(12 * 4096, &list));
    let sectors = SIZE / 512;
    let cases: Vec<(&str, Request, i16)> = vec![
        (
            "unknown op",
            Request::Unknown { op: 200, id: 0 },
            BLKIF_RSP_EOPNOTSUPP,
        ),
        (
            "sector past the end",
            rw(RwOp::Read, sectors, 1, &[seg(rw_page, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "last sector past the end",
            rw(RwOp::Write, sectors - 4, 1, &[seg(rw_page, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "sector overflowing u64",
            rw(RwOp::Read, u64::MAX - 2, 1, &[seg(rw_page, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "first_sect > last_sect",
            rw(RwOp::Read, 0, 1, &[seg(rw_page, 5, 2)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "last_sect > 7",
            rw(RwOp::Read, 0, 1, &[seg(rw_page, 0, 8)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "first_sect > 7",
            rw(RwOp::Read, 0, 1, &[seg(rw_page, 200, 255)]),
            BLKIF_RSP_ERROR,
        ),
        ("zero segments", rw(RwOp::Read, 0, 0, &[]), BLKIF_RSP_ERROR),
        (
            "12 segments in a direct request",
            rw(RwOp::Read, 0, 12, &[seg(rw_page, 0, 7); 11]),
            BLKIF_RSP_ERROR,
        ),
        (
            "a grant never made",
            rw(RwOp::Read, 0, 1, &[seg(4000, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "a read into a read-only grant",
            rw(RwOp::Read, 0, 1, &[seg(ro_page, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        (
            "indirect: more segments than advertised",
            Request::Indirect {
                indirect_op: BLKIF_OP_READ,
                nr_segments: 257,
                id: 0,
                sector_number: 0,
                indirect_grefs: [list_page; 8],
            },
            BLKIF_RSP_ERROR,
        ),
        (
            "indirect: more segments than the list pages hold",
            Request::Indirect {
                indirect_op: BLKIF_OP_READ,
                nr_segments: 9,
                id: 0,
                sector_number: 0,
                indirect_grefs: [4001, 0, 0, 0, 0, 0, 0, 0],
            },
            BLKIF_RSP_ERROR,
        ),
        (
            "indirect: an unknown inner op",
            Request::Indirect {
                indirect_op: 99,
                nr_segments: 9,
                id: 0,
                sector_number: 0,
                indirect_grefs: [list_page, 0, 0, 0, 0, 0, 0, 0],
            },
            BLKIF_RSP_ERROR,
        ),
        (
            "discard past the end",
            Request::Discard {
                id: 0,
                sector_number: sectors - 1,
                nr_sectors: 8,
                secure: false,
            },
            BLKIF_RSP_EOPNOTSUPP,
        ),
        (
            // The one honest request: the attacker's ring still works for good requests.
            "a valid indirect read",
            Request::Indirect {
                indirect_op: BLKIF_OP_READ,
                nr_segments: 9,
                id: 0,
                sector_number: 0,
                indirect_grefs: [list_page, 0, 0, 0, 0, 0, 0, 0],
            },
            BLKIF_RSP_OKAY,
        ),
    ];
    let q = &mut evil.queues[0];
    for (round, (what, req, want)) in cases.into_iter().enumerate() {
        let id = q.submit_raw(req).unwrap();
        q.kick().unwrap();
        let done = q.collect(1, Duration::from_secs(10)).unwrap();
        assert_eq!((done[0].id, done[0].status), (id, want), "{what}");
        honest_round_trip(&mut honest, round as u8 + 1);
    }
    // The attacker's pages were written only where a read was allowed: the read-only page
    // is untouched.
    let mut ro_bytes = vec![0xEEu8; 4096];
    assert!(evil_dom.memory.write(11 * 4096, &ro_bytes));
    ro_bytes.fill(0);
    assert!(evil_dom.memory.read(11 * 4096, &mut ro_bytes));
    assert!(ro_bytes.iter().all(|&b| b == 0xEE));

    // Ring overflow: a producer index far ahead. Only the attacker's device closes.
    let ring = evil_dom.memory.page_ptr(0).unwrap();
    // SAFETY: req_prod is the first, 4-byte aligned u32 of the attacker's own ring page.
    unsafe { (*(ring as *const std::sync::atomic::AtomicU32)).store(1_000_000, Ordering::Release) };
    evil.queues[0].notify().unwrap();
    wait_for(&host.dom0, &format!("{ebe}/state"), b"5");
    honest_round_trip(&mut honest, 100);
    drop(evil);

    // Garbage in xenstore, one key at a time, each after a "reboot" of the attacker's driver.
    let garbage: &[GarbageCase] = &[
        (
            "ring-ref",
            "not a number",
            &[("ring-ref", "12abc"), ("event-channel", "3")],
        ),
        (
            "event-channel",
            "out of range",
            &[("ring-ref", "1"), ("event-channel", "99999999999")],
        ),
        (
            "protocol",
            "unknown ABI",
            &[
                ("ring-ref", "1"),
                ("event-channel", "1"),
                ("protocol", "x86_128-abi"),
            ],
        ),
        (
            "ring-page-order",
            "beyond the offer",
            &[
                ("ring-page-order", "9"),
                ("ring-ref0", "1"),
                ("event-channel", "1"),
            ],
        ),
        (
            "multi-queue-num-queues",
            "more queues than offered",
            &[("multi-queue-num-queues", "1000"), ("event-channel", "1")],
        ),
        (
            "multi-queue-num-queues",
            "zero queues",
            &[("multi-queue-num-queues", "0"), ("event-channel", "1")],
        ),
    ];
    for (n, (key, what, keys)) in garbage.iter().enumerate() {
        // Driver restart: Closed, then Initialising; the backend goes back to InitWait.
        evil_xs.write(NO_TX, &format!("{efe}/state"), b"6").unwrap();
        wait_for(&host.dom0, &format!("{ebe}/state"), b"6");
        for k in [
            "ring-ref",
            "ring-ref0",
            "event-channel",
            "protocol",
            "ring-page-order",
            "multi-queue-num-queues",
        ] {
            let _ = evil_xs.rm(NO_TX, &format!("{efe}/{k}"));
        }
        let _ = host.dom0.rm(NO_TX, &format!("{ebe}/error"));
        evil_xs.write(NO_TX, &format!("{efe}/state"), b"1").unwrap();
        wait_for(&host.dom0, &format!("{ebe}/state"), b"2");
        for (k, v) in keys.iter() {
            evil_xs
                .write(NO_TX, &format!("{efe}/{k}"), v.as_bytes())
                .unwrap();
        }
        evil_xs.write(NO_TX, &format!("{efe}/state"), b"3").unwrap();
        wait_for(&host.dom0, &format!("{ebe}/state"), b"5");
        let why =
            String::from_utf8(host.dom0.read(NO_TX, &format!("{ebe}/error")).unwrap()).unwrap();
        assert!(why.contains(key), "{key} ({what}): error node says {why:?}");
        honest_round_trip(&mut honest, 101 + n as u8);
    }

    // The attacker's domain dies: its directory goes, its device ends; the honest one serves.
    host.xs.destroy_domain(EVIL);
    host.machine.remove(EVIL);
    let evil_device = host.devices.remove(0);
    let started = Instant::now();
    while !evil_device.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the attacker's device lingers"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(evil_device.join().unwrap(), Ok(()));
    assert!(host.dom0.read(NO_TX, &format!("{ebe}/state")).is_err());
    honest_round_trip(&mut honest, 200);

    // A clean stop of the honest device.
    drop(honest);
    honest_xs
        .write(NO_TX, &format!("{hfe}/state"), b"6")
        .unwrap();
    host.stop.store(true, Ordering::SeqCst);
    for d in host.devices.drain(..) {
        assert_eq!(d.join().unwrap(), Ok(()));
    }
}
