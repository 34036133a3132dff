//! The simulated hypervisor's grants and event channels, as a backend sees them: in one
//! process, and across two (the child is this test binary re-run on the ignored test
//! `child_backend`, which maps the parent guest's grants over the rendezvous socket).

use std::process::Command;
use std::time::Duration;
use xen_disk_host::xen::evtchn::{EventChannel, EventChannels};
use xen_disk_host::xen::grant::{GrantError, GrantMapper};
use xen_disk_host::xen::sim::hypervisor::{SimBackend, SimDomain};

const GUEST: u32 = 7;
const PING_PONGS: u32 = 10_000;

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn a_backend_maps_granted_pages_and_sees_the_guests_bytes() {
    let dom = SimDomain::new(GUEST, 64, 1).unwrap();
    dom.memory.write(5 * 4096, &pattern(1));
    dom.memory.write(9 * 4096, &pattern(2));
    let a = dom.grants.grant(5, 0, false).unwrap();
    let b = dom.grants.grant(9, 0, true).unwrap();
    let back = dom.backend(0);
    let m = back.map(GUEST, &[a, b], false).unwrap();
    assert_eq!(m.len(), 8192);
    let mut got = vec![0u8; 8192];
    assert!(m.copy_out(0, &mut got));
    assert_eq!(&got[..4096], &pattern(1)[..]);
    assert_eq!(&got[4096..], &pattern(2)[..]);
    assert!(
        !m.copy_out(8000, &mut [0u8; 500]),
        "reads past the mapping are refused"
    );
    drop(m);
    // A writable mapping writes into the guest's page.
    let w = back.map(GUEST, &[a], true).unwrap();
    // SAFETY: inside the 4096-byte mapping just made.
    unsafe { std::ptr::write_bytes(w.as_ptr().add(100), 0xEE, 10) };
    drop(w);
    let mut page = vec![0u8; 4096];
    dom.memory.read(5 * 4096, &mut page);
    assert_eq!(&page[100..110], &[0xEE; 10]);
}

#[test]
fn bad_references_are_refused() {
    let dom = SimDomain::new(GUEST, 16, 1).unwrap();
    let ro = dom.grants.grant(1, 0, true).unwrap();
    let other = dom.grants.grant(2, 3, false).unwrap();
    let beyond = dom.grants.grant(99, 0, false).unwrap();
    let back = dom.backend(0);
    assert!(matches!(
        back.map(GUEST, &[ro], true),
        Err(GrantError::ReadOnly { .. })
    ));
    for (gref, why) in [
        (other, "another domain"),
        (5000, "outside the grant table"),
        (200, "not granted"),
        (beyond, "outside the guest's memory"),
    ] {
        match back.map(GUEST, &[ro, gref], false) {
            Err(GrantError::BadRef { why: w, .. }) => assert!(w.contains(why), "{w}"),
            other => panic!("gref {gref}: {:?}", other.err()),
        }
    }
    dom.grants.revoke(ro);
    assert!(back.map(GUEST, &[ro], false).is_err(), "revoked");
    assert!(back.map(GUEST + 1, &[1], false).is_err(), "unknown domain");
}

fn ping_pong(mine: &dyn EventChannel, first: bool) {
    for i in 0..PING_PONGS {
        if first || i > 0 {
            mine.notify().unwrap();
        }
        assert!(
            mine.wait(Some(Duration::from_secs(5))).unwrap(),
            "event {i} lost"
        );
    }
    if !first {
        mine.notify().unwrap();
    }
}

#[test]
fn events_ping_pong_in_one_process() {
    let dom = SimDomain::new(GUEST, 4, 1).unwrap();
    let guest_end = dom.alloc_unbound().unwrap();
    let back = dom.backend(0);
    let back_end = back
        .bind_interdomain(GUEST, guest_end.local_port())
        .unwrap();
    assert!(back.bind_interdomain(GUEST, 999).is_err());
    assert!(!back_end.ack().unwrap(), "nothing pending yet");
    let t = std::thread::spawn(move || ping_pong(&guest_end, true));
    ping_pong(&*back_end, false);
    t.join().unwrap();
}

#[test]
fn a_backend_in_another_process_shares_pages_and_events() {
    let dir = std::env::temp_dir().join(format!("grant-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("hypervisor");
    let dom = SimDomain::new(GUEST, 32, 1).unwrap();
    dom.serve(&socket).unwrap();
    dom.memory.write(3 * 4096, &pattern(9));
    let gref = dom.grants.grant(3, 0, false).unwrap();
    let port = dom.alloc_unbound().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_backend", "--nocapture"])
        .env("SIM_SOCKET", &socket)
        .env("SIM_GREF", gref.to_string())
        .env("SIM_PORT", port.local_port().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The child maps the page, checks pattern 9, writes pattern 10, then ping-pongs.
    ping_pong(&port, false);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "child backend failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut page = vec![0u8; 4096];
    dom.memory.read(3 * 4096, &mut page);
    assert_eq!(
        page,
        pattern(10),
        "the child's writes reached the guest's page"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The backend process of the test above; run only by it.
#[test]
#[ignore = "run as a child process by a_backend_in_another_process_shares_pages_and_events"]
fn child_backend() {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| panic!("{k} not set: this test is a child process"))
    };
    let back = SimBackend::connect(std::path::Path::new(&var("SIM_SOCKET")), 0).unwrap();
    assert_eq!(back.guest_domid(), GUEST);
    let gref: u32 = var("SIM_GREF").parse().unwrap();
    let m = back.map(GUEST, &[gref], true).unwrap();
    let mut page = vec![0u8; 4096];
    assert!(m.copy_out(0, &mut page));
    assert_eq!(page, pattern(9));
    let next = pattern(10);
    // SAFETY: writing 4096 bytes into the 4096-byte writable mapping.
    unsafe { std::ptr::copy_nonoverlapping(next.as_ptr(), m.as_ptr(), 4096) };
    drop(m);
    let ch = back
        .bind_interdomain(GUEST, var("SIM_PORT").parse().unwrap())
        .unwrap();
    ping_pong(&*ch, true);
}

/// Counts the mappings the platform is asked for.
struct Counting(SimBackend, std::sync::atomic::AtomicUsize);

impl GrantMapper for Counting {
    fn map(
        &self,
        domid: u32,
        refs: &[u32],
        writable: bool,
    ) -> Result<xen_disk_host::xen::grant::GrantMapping, GrantError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.map(domid, refs, writable)
    }
}

#[test]
fn persistent_grants_are_mapped_once_and_bounded() {
    use xen_disk_host::xen::grant::PersistentGrants;
    let dom = SimDomain::new(GUEST, 16, 1).unwrap();
    let grefs: Vec<u32> = (0..6)
        .map(|p| dom.grants.grant(p, 0, false).unwrap())
        .collect();
    let counting = std::sync::Arc::new(Counting(dom.backend(0), Default::default()));
    let mut cache = PersistentGrants::new(counting.clone(), GUEST, 4);
    for round in 0..3u8 {
        for (i, &g) in grefs[..4].iter().enumerate() {
            let p = cache.page(g).unwrap().expect("room in the cache");
            // SAFETY: a cached, writable 4096-byte mapping.
            unsafe { *p.add(7) = round * 10 + i as u8 };
        }
    }
    assert_eq!(
        counting.1.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "each grant mapped once"
    );
    assert_eq!(cache.len(), 4);
    // Full: a fifth grant is not cached (the caller maps it per request).
    assert_eq!(cache.page(grefs[4]).unwrap(), None);
    assert_eq!(counting.1.load(std::sync::atomic::Ordering::SeqCst), 4);
    // Writes through cached pages are the guest's memory.
    let mut b = [0u8; 1];
    dom.memory.read(2 * 4096 + 7, &mut b);
    assert_eq!(b[0], 22);
    // A bad reference is an error, not a cache entry.
    cache.clear();
    assert!(cache.page(4000).is_err());
    assert!(cache.is_empty());
}

#[test]
fn grant_copy_moves_bytes_and_reports_each_failure() {
    use xen_disk_host::xen::grant::{
        GrantCopy, GNTST_BAD_COPY_ARG, GNTST_BAD_GNTREF, GNTST_OKAY, GNTST_PERMISSION_DENIED,
    };
    let dom = SimDomain::new(GUEST, 8, 1).unwrap();
    dom.memory.write(4096 + 100, b"from the guest");
    let rw = dom.grants.grant(1, 0, false).unwrap();
    let ro = dom.grants.grant(2, 0, true).unwrap();
    let back = dom.backend(0);
    let mut into = [0u8; 14];
    let mut out = *b"to the guest!!";
    let op = |gref, offset, len, local: *mut u8, to_guest| GrantCopy {
        gref,
        offset,
        len,
        local,
        to_guest,
        status: 99,
    };
    let mut ops = [
        op(rw, 100, 14, into.as_mut_ptr(), false),
        op(rw, 200, 14, out.as_mut_ptr(), true),
        op(ro, 0, 14, out.as_mut_ptr(), true),
        op(4000, 0, 14, into.as_mut_ptr(), false),
        op(rw, 4090, 14, into.as_mut_ptr(), false),
    ];
    // SAFETY: every local buffer is a live 14-byte array.
    unsafe { back.copy(GUEST, &mut ops) }.unwrap();
    let statuses: Vec<i16> = ops.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        [
            GNTST_OKAY,
            GNTST_OKAY,
            GNTST_PERMISSION_DENIED,
            GNTST_BAD_GNTREF,
            GNTST_BAD_COPY_ARG
        ]
    );
    assert_eq!(&into, b"from the guest");
    let mut page = [0u8; 14];
    dom.memory.read(4096 + 200, &mut page);
    assert_eq!(&page, b"to the guest!!");
}
