//! The Rust frontend's half of the xenbus handshake against a scripted backend in dom0, over
//! the simulated xenstored with real permissions: what the frontend writes is read back with
//! the backend's own parser of frontend keys, so the two halves check each other.

use std::time::Duration;
use xen_disk_host::backend::attach::create_device;
use xen_disk_host::backend::features::{initwait_keys, Advertisement, HostOffer};
use xen_disk_host::backend::frontend_keys::{read_frontend, FrontendRings, QueueRing};
use xen_disk_host::backend::vbd::Vbd;
use xen_disk_host::blkif::abi::Protocol;
use xen_disk_host::frontend::handshake::{connect, Device, Wishes};
use xen_disk_host::xen::sim::hypervisor::SimDomain;
use xen_disk_host::xen::sim::xenstored::SimXenstored;
use xen_disk_host::xen::xenstore::{Xenstore, NO_TX};
use xen_disk_plugin_api::DiskInfo;

const GUEST: u32 = 4;
const FE: &str = "/local/domain/4/device/vbd/51728";
const BE: &str = "/local/domain/0/backend/vbd3/4/51728";

/// The device's entries as `connect` writes them, then what the backend publishes before
/// InitWait (new nodes inherit the backend directory's permissions: the guest may read them).
fn setup(dom0: &dyn Xenstore, offer: &HostOffer) {
    let p = create_device(dom0, 0, GUEST, Vbd::disk(1), false).unwrap();
    assert_eq!((p.backend.as_str(), p.frontend.as_str()), (BE, FE));
    for (k, v) in initwait_keys(offer) {
        dom0.write(NO_TX, &format!("{BE}/{k}"), v.as_bytes())
            .unwrap();
    }
    dom0.write(NO_TX, &format!("{BE}/state"), b"2").unwrap();
}

fn run(
    offer: HostOffer,
    wishes: Wishes,
) -> (
    FrontendRings,
    Vec<QueueRing>,
    xen_disk_host::frontend::handshake::DiskDescription,
) {
    let xs = SimXenstored::new();
    xs.add_domain(GUEST, "guest", "00000000-0000-0000-0000-000000000004");
    let dom0 = xs.connect(0).unwrap();
    setup(&dom0, &offer);
    let domain = SimDomain::new(GUEST, 128, 1).unwrap();
    let guest_xs = xs.connect(GUEST).unwrap();
    let fe = std::thread::spawn(move || {
        let device = Device {
            frontend: FE,
            backend: BE,
            backend_domid: 0,
        };
        let c = connect(
            &guest_xs,
            &domain,
            device,
            16,
            wishes,
            Duration::from_secs(10),
        )
        .unwrap();
        let queues: Vec<QueueRing> = c
            .queues
            .iter()
            .map(|q| QueueRing {
                ring_refs: q.ring_grefs().to_vec(),
                event_channel: q.port(),
            })
            .collect();
        (queues, c.disk)
    });
    // The scripted backend: wait for Initialised, parse what the frontend wrote, connect.
    let started = std::time::Instant::now();
    while dom0.read(NO_TX, &format!("{FE}/state")).unwrap() != b"3" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "frontend never reached Initialised"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let read = |k: &str| match dom0.read(NO_TX, &format!("{FE}/{k}")) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_enoent() => Ok(None),
        Err(e) => Err(e),
    };
    let rings = read_frontend(&read, &offer).unwrap();
    let info = DiskInfo::new(1 << 30)
        .sector_size(4096)
        .flush(true)
        .discard(true);
    for (k, v) in Advertisement::new(&offer, &info).connect_keys() {
        dom0.write(NO_TX, &format!("{BE}/{k}"), v.as_bytes())
            .unwrap();
    }
    dom0.write(NO_TX, &format!("{BE}/state"), b"4").unwrap();
    let (queues, disk) = fe.join().unwrap();
    assert_eq!(dom0.read(NO_TX, &format!("{FE}/state")).unwrap(), b"4");
    (rings, queues, disk)
}

#[test]
fn multi_page_multi_queue_persistent() {
    let offer = HostOffer {
        max_ring_page_order: 4,
        max_queues: 2,
        max_indirect_segments: 256,
        persistent: true,
    };
    let wishes = Wishes {
        ring_page_order: 4,
        queues: 4,
        persistent: true,
        protocol: Protocol::X86_64,
    };
    let (rings, queues, disk) = run(offer, wishes);
    assert_eq!(rings.ring_page_order, 4);
    assert_eq!(
        rings.queues, queues,
        "the backend reads exactly the rings the frontend made"
    );
    assert_eq!(queues.len(), 2, "capped by the backend's offer");
    assert_eq!(queues[0].ring_refs.len(), 16);
    assert!(rings.persistent && disk.persistent);
    assert_eq!(rings.protocol.as_deref(), Some("x86_64-abi"));
    assert_eq!(
        (disk.sectors, disk.sector_size, disk.flush, disk.discard),
        (1 << 21, 4096, true, true)
    );
    assert_eq!(disk.max_indirect_segments, 256);
}

#[test]
fn single_page_single_queue_without_persistent_grants() {
    let offer = HostOffer {
        max_ring_page_order: 0,
        max_queues: 1,
        max_indirect_segments: 0,
        persistent: false,
    };
    let wishes = Wishes {
        ring_page_order: 4,
        queues: 1,
        persistent: true,
        protocol: Protocol::X86_32,
    };
    let (rings, queues, disk) = run(offer, wishes);
    assert_eq!(rings.ring_page_order, 0);
    assert_eq!(rings.queues, queues);
    assert_eq!(queues[0].ring_refs.len(), 1);
    assert!(!rings.persistent && !disk.persistent);
    assert_eq!(rings.protocol.as_deref(), Some("x86_32-abi"));
    assert_eq!(disk.max_indirect_segments, 0);
}
