//! Data through granted pages: the Rust frontend writes a pattern with direct multi-segment
//! requests and reads it back with an indirect request, against a minimal RAM-disk backend
//! that maps each request's grants (persistent grants on and off).

use std::time::Duration;
use xen_disk_host::blkif::abi::*;
use xen_disk_host::blkif::request::{validate, validate_indirect_segments, Limits, Segment, Valid};
use xen_disk_host::blkif::ring::{BackRing, Response};
use xen_disk_host::frontend::pages::{DataPage, DataPages};
use xen_disk_host::frontend::FrontQueue;
use xen_disk_host::xen::evtchn::EventChannels;
use xen_disk_host::xen::grant::GrantMapper;
use xen_disk_host::xen::sim::hypervisor::{SimBackend, SimDomain};

const GUEST: u32 = 11;
const DISK: u64 = 4 << 20;
const LIMITS: Limits = Limits {
    sectors: DISK / 512,
    logical_sector_size: 512,
    read_only: false,
    flush: true,
    discard: false,
    discard_secure: false,
    max_indirect_segments: 256,
};

/// Serves `count` requests from a RAM disk, moving data through the grant mappings.
fn ramdisk_backend(back: &SimBackend, ring_grefs: &[u32], port: u32, count: usize) -> Vec<u8> {
    let mut disk = vec![0u8; DISK as usize];
    let mapping = back.map(GUEST, ring_grefs, true).unwrap();
    // SAFETY: the mapping lives through the loop.
    let mut ring =
        unsafe { BackRing::attach(mapping.as_ptr(), mapping.len(), Protocol::X86_64) }.unwrap();
    let ch = back.bind_interdomain(GUEST, port).unwrap();
    let mut entry = [0u8; MAX_ENTRY_SIZE];
    let mut segs = Vec::new();
    let mut served = 0;
    while served < count {
        ring.poll().unwrap();
        while let Some(req) = ring.take(&mut entry) {
            let (op, offset, segments): (RwOp, u64, Vec<Segment>) =
                match validate(&req, &LIMITS).unwrap() {
                    Valid::Data {
                        op,
                        offset,
                        segments,
                        ..
                    } => (op, offset, segments.as_slice().to_vec()),
                    Valid::Indirect {
                        op,
                        sector_number,
                        nr_segments,
                        grefs,
                        pages,
                    } => {
                        let m = back.map(GUEST, &grefs[..pages], false).unwrap();
                        let mut bytes = vec![0u8; pages * XEN_PAGE_SIZE];
                        assert!(m.copy_out(0, &mut bytes), "indirect pages copied once");
                        validate_indirect_segments(
                            &bytes,
                            nr_segments,
                            sector_number,
                            &LIMITS,
                            &mut segs,
                        )
                        .unwrap();
                        (op, sector_number * 512, segs.clone())
                    }
                    other => panic!("unexpected {other:?}"),
                };
            let grefs: Vec<u32> = segments.iter().map(|s| s.gref).collect();
            let m = back.map(GUEST, &grefs, op == RwOp::Read).unwrap();
            let mut at = offset as usize;
            for (i, s) in segments.iter().enumerate() {
                let start = i * XEN_PAGE_SIZE + usize::from(s.first_sect) * 512;
                let len = usize::from(s.last_sect - s.first_sect + 1) * 512;
                // SAFETY: inside the mapping of segment i's page; inside the RAM disk (validated).
                unsafe {
                    if op == RwOp::Read {
                        std::ptr::copy_nonoverlapping(
                            disk.as_ptr().add(at),
                            m.as_ptr().add(start),
                            len,
                        );
                    } else {
                        std::ptr::copy_nonoverlapping(
                            m.as_ptr().add(start),
                            disk.as_mut_ptr().add(at),
                            len,
                        );
                    }
                }
                at += len;
            }
            drop(m);
            ring.put_response(&Response {
                id: req.id(),
                operation: req.echo_op(),
                status: BLKIF_RSP_OKAY,
            });
            served += 1;
        }
        if ring.push_responses() {
            ch.notify().unwrap();
        }
        if served < count && !ring.final_check().unwrap() {
            ch.wait(Some(Duration::from_secs(10))).unwrap();
        }
    }
    disk
}

fn byte(i: usize) -> u8 {
    (i * 7 % 251) as u8
}

fn exchange(persistent: bool) {
    let dom = SimDomain::new(GUEST, 256, 2).unwrap();
    let mut q = FrontQueue::new(dom.clone(), 0, 0, 1, Protocol::X86_64, 0).unwrap();
    let mut pages = DataPages::new(dom.clone(), 0, 16, 128, persistent).unwrap();
    let back = dom.backend(0);
    let (grefs, port) = (q.ring_grefs().to_vec(), q.port());
    // 4 direct writes of 10 full pages + 1 indirect read of 40 pages.
    let t = std::thread::spawn(move || ramdisk_backend(&back, &grefs, port, 5));
    let wait_one = |q: &mut FrontQueue| {
        let done = q.collect(1, Duration::from_secs(10)).unwrap();
        assert_eq!(done[0].status, BLKIF_RSP_OKAY);
    };
    for w in 0..4usize {
        let used: Vec<DataPage> = (0..10).map(|_| pages.take(true).unwrap()).collect();
        for (i, p) in used.iter().enumerate() {
            let base = (w * 10 + i) * 4096;
            let data: Vec<u8> = (0..4096).map(|j| byte(base + j)).collect();
            assert!(pages.fill(*p, 0, &data));
        }
        let segs: Vec<Segment> = used
            .iter()
            .map(|p| Segment {
                gref: p.gref,
                first_sect: 0,
                last_sect: 7,
            })
            .collect();
        q.submit_rw(RwOp::Write, (w * 10 * 8) as u64, &segs)
            .unwrap();
        q.kick().unwrap();
        wait_one(&mut q);
        used.into_iter().for_each(|p| pages.release(p));
    }
    let used: Vec<DataPage> = (0..40).map(|_| pages.take(false).unwrap()).collect();
    let list = pages.take(true).unwrap();
    let segs: Vec<Segment> = used
        .iter()
        .map(|p| Segment {
            gref: p.gref,
            first_sect: 0,
            last_sect: 7,
        })
        .collect();
    assert!(pages.write_segments(list, &segs));
    q.submit_indirect(RwOp::Read, 0, 40, &[list.gref]).unwrap();
    q.kick().unwrap();
    wait_one(&mut q);
    for (i, p) in used.iter().enumerate() {
        let mut got = vec![0u8; 4096];
        assert!(pages.read(*p, 0, &mut got));
        let want: Vec<u8> = (0..4096).map(|j| byte(i * 4096 + j)).collect();
        assert!(
            got == want,
            "page {i} read back wrong (persistent={persistent})"
        );
    }
    let disk = t.join().unwrap();
    assert!((0..40 * 4096).all(|i| disk[i] == byte(i)));
}

#[test]
fn data_round_trips_with_per_request_grants() {
    exchange(false);
}

#[test]
fn data_round_trips_with_persistent_grants() {
    exchange(true);
}
