//! The Rust frontend and a minimal backend exchange 1,000,000 requests through the simulated
//! hypervisor — granted ring pages, event channels, the backend validating every request —
//! in one process and across two, every response matched to its request by id, operation and
//! the status it must have.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xen_disk_host::blkif::abi::*;
use xen_disk_host::blkif::request::{validate, Limits, Segment};
use xen_disk_host::blkif::ring::{BackRing, Response};
use xen_disk_host::frontend::FrontQueue;
use xen_disk_host::xen::evtchn::EventChannels;
use xen_disk_host::xen::grant::GrantMapper;
use xen_disk_host::xen::sim::hypervisor::{SimBackend, SimDomain};

const GUEST: u32 = 9;
const TOTAL: u64 = 1_000_000;
const ORDER: u32 = 2;
const LIMITS: Limits = Limits {
    sectors: 1 << 21,
    logical_sector_size: 512,
    read_only: false,
    flush: true,
    discard: true,
    discard_secure: false,
    max_indirect_segments: 256,
};

/// The minimal backend: answers every request with the status validation gives it.
fn backend(back: &SimBackend, ring_grefs: &[u32], port: u32) -> u64 {
    let mapping = back.map(GUEST, ring_grefs, true).expect("map the ring");
    // SAFETY: the mapping stays alive for the whole loop.
    let mut ring = unsafe { BackRing::attach(mapping.as_ptr(), mapping.len(), Protocol::X86_64) }
        .expect("attach");
    let ch = back.bind_interdomain(GUEST, port).expect("bind");
    let mut entry = [0u8; MAX_ENTRY_SIZE];
    let mut answered = 0u64;
    while answered < TOTAL {
        ring.poll().expect("well-behaved frontend");
        while let Some(req) = ring.take(&mut entry) {
            let status = match validate(&req, &LIMITS) {
                Ok(_) => BLKIF_RSP_OKAY,
                Err(r) => r.status.code(),
            };
            assert!(ring.put_response(&Response {
                id: req.id(),
                operation: req.echo_op(),
                status
            }));
            answered += 1;
        }
        if ring.push_responses() {
            ch.notify().unwrap();
        }
        if !ring.final_check().unwrap() && answered < TOTAL {
            assert!(
                ch.wait(Some(Duration::from_secs(10))).unwrap(),
                "backend starved after {answered}"
            );
        }
    }
    answered
}

/// The frontend: keeps the ring full with a mix of requests, some deliberately invalid, and
/// checks each completion against the status it must get.
fn frontend(mut q: FrontQueue) {
    let mut expected = vec![0i16; q.free()];
    let (mut sent, mut done) = (0u64, 0u64);
    let started = Instant::now();
    while done < TOTAL {
        while sent < TOTAL && q.free() > 0 {
            let k = sent % 10;
            let (id, want) = match k {
                // Out of range: the backend must refuse it with ERROR.
                7 => (
                    q.submit_rw(
                        RwOp::Read,
                        LIMITS.sectors,
                        &[Segment {
                            gref: 1,
                            first_sect: 0,
                            last_sect: 7,
                        }],
                    ),
                    BLKIF_RSP_ERROR,
                ),
                // Unknown to a backend without secure discard.
                8 => (q.submit_discard(0, 8, true), BLKIF_RSP_EOPNOTSUPP),
                9 => (q.submit_rw(RwOp::Flush, 0, &[]), BLKIF_RSP_OKAY),
                _ => {
                    let op = if k % 2 == 0 { RwOp::Read } else { RwOp::Write };
                    let segs = [Segment {
                        gref: 1,
                        first_sect: 0,
                        last_sect: 7,
                    }; 3];
                    (
                        q.submit_rw(
                            op,
                            (sent * 24) % (LIMITS.sectors - 24),
                            &segs[..1 + k as usize % 3],
                        ),
                        BLKIF_RSP_OKAY,
                    )
                }
            };
            expected[id.expect("free slot") as usize] = want;
            sent += 1;
        }
        q.kick().unwrap();
        let got = q
            .reap(|c| {
                assert_eq!(
                    c.status, expected[c.id as usize],
                    "id {} answered wrongly",
                    c.id
                )
            })
            .unwrap();
        done += got as u64;
        if got == 0 {
            q.wait(Duration::from_secs(10)).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "stalled at {done}"
        );
    }
    assert_eq!(q.in_flight(), 0);
}

fn guest() -> (Arc<SimDomain>, FrontQueue) {
    let dom = SimDomain::new(GUEST, 64, 1).unwrap();
    // Start the ring indices 100 short of u32::MAX, so the exchange crosses the wrap.
    let q = FrontQueue::new(dom.clone(), 0, 8, ORDER, Protocol::X86_64, u32::MAX - 100).unwrap();
    (dom, q)
}

#[test]
fn a_million_requests_in_one_process() {
    let (dom, q) = guest();
    let back = dom.backend(0);
    let (grefs, port) = (q.ring_grefs().to_vec(), q.port());
    let t = std::thread::spawn(move || backend(&back, &grefs, port));
    frontend(q);
    assert_eq!(t.join().unwrap(), TOTAL);
}

#[test]
fn a_million_requests_across_two_processes() {
    let dir = std::env::temp_dir().join(format!("ring-exchange-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("hypervisor");
    let (dom, q) = guest();
    dom.serve(&socket).unwrap();
    let grefs: Vec<String> = q.ring_grefs().iter().map(u32::to_string).collect();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "backend_process", "--nocapture"])
        .env("SIM_SOCKET", &socket)
        .env("SIM_RING", grefs.join(","))
        .env("SIM_PORT", q.port().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    frontend(q);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "backend process failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The backend process of the test above; run only by it.
#[test]
#[ignore = "run as a child process by a_million_requests_across_two_processes"]
fn backend_process() {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| panic!("{k} not set: this test is a child process"))
    };
    let back = SimBackend::connect(std::path::Path::new(&var("SIM_SOCKET")), 0).unwrap();
    let grefs: Vec<u32> = var("SIM_RING")
        .split(',')
        .map(|g| g.parse().unwrap())
        .collect();
    assert_eq!(
        backend(&back, &grefs, var("SIM_PORT").parse().unwrap()),
        TOTAL
    );
}
