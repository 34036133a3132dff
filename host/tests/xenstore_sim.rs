//! The xenstore client against the simulated xenstored: every operation, permissions for a
//! guest's connection, watch and transaction semantics, and hostile peers.

use std::io::Write;
use std::time::Duration;
use xen_disk_host::xen::sim::xenstored::SimXenstored;
use xen_disk_host::xen::xenstore::{transaction, Perm, WatchEvent, Xenstore, NO_TX};

fn next_event(xs: &dyn Xenstore) -> Option<WatchEvent> {
    xs.events().recv_timeout(Duration::from_secs(2)).ok()
}

fn no_event(xs: &dyn Xenstore) -> bool {
    xs.events()
        .recv_timeout(Duration::from_millis(200))
        .is_err()
}

#[test]
fn every_operation_works_for_dom0() {
    let sim = SimXenstored::new();
    let xs = sim.connect(0).unwrap();
    xs.write(NO_TX, "/a/b/c", b"value with\nnewline").unwrap();
    assert_eq!(xs.read(NO_TX, "/a/b/c").unwrap(), b"value with\nnewline");
    assert_eq!(
        xs.read(NO_TX, "/a/b").unwrap(),
        b"",
        "parents are created empty"
    );
    xs.mkdir(NO_TX, "/a/d").unwrap();
    xs.mkdir(NO_TX, "/a/d").unwrap();
    assert_eq!(xs.directory(NO_TX, "/a").unwrap(), vec!["b", "d"]);
    assert!(xs.read(NO_TX, "/nope").unwrap_err().is_enoent());
    xs.set_perms(
        NO_TX,
        "/a/d",
        &[Perm::parse("n3").unwrap(), Perm::parse("r0").unwrap()],
    )
    .unwrap();
    assert_eq!(
        xs.get_perms(NO_TX, "/a/d").unwrap(),
        vec![Perm::parse("n3").unwrap(), Perm::parse("r0").unwrap()]
    );
    xs.rm(NO_TX, "/a").unwrap();
    assert!(xs.read(NO_TX, "/a/b/c").unwrap_err().is_enoent());
    xs.rm(NO_TX, "/a").unwrap();
    assert_eq!(xs.get_domain_path(7).unwrap(), "/local/domain/7");
    assert_eq!(xs.read(NO_TX, "/local/domain/0/name").unwrap(), b"Domain-0");
    assert_eq!(xs.read(NO_TX, "/x/..").unwrap_err().errno(), Some("EINVAL"));
    let big = vec![b'v'; 4000];
    xs.write(NO_TX, "/big", &big).unwrap();
    assert_eq!(xs.read(NO_TX, "/big").unwrap(), big);
}

#[test]
fn a_guest_connection_is_held_to_its_permissions() {
    let sim = SimXenstored::new();
    sim.add_domain(3, "guest", "6f9619ff-8b86-d011-b42d-00c04fc964ff");
    let dom0 = sim.connect(0).unwrap();
    let guest = sim.connect(3).unwrap();
    // Its own directory is its own.
    guest
        .write(NO_TX, "/local/domain/3/device/vbd/51712/state", b"1")
        .unwrap();
    assert_eq!(
        dom0.read(NO_TX, "/local/domain/3/device/vbd/51712/state")
            .unwrap(),
        b"1"
    );
    // Nothing of dom0's or another domain's unless granted.
    assert_eq!(
        guest
            .read(NO_TX, "/local/domain/0/name")
            .unwrap_err()
            .errno(),
        Some("EACCES")
    );
    assert_eq!(
        guest
            .write(NO_TX, "/local/domain/0/x", b"1")
            .unwrap_err()
            .errno(),
        Some("EACCES")
    );
    dom0.write(NO_TX, "/local/domain/0/backend/vbd3/3/51712/state", b"2")
        .unwrap();
    let backend = "/local/domain/0/backend/vbd3/3/51712";
    dom0.set_perms(
        NO_TX,
        backend,
        &[Perm::parse("n0").unwrap(), Perm::parse("r3").unwrap()],
    )
    .unwrap();
    dom0.set_perms(
        NO_TX,
        &format!("{backend}/state"),
        &[Perm::parse("n0").unwrap(), Perm::parse("r3").unwrap()],
    )
    .unwrap();
    assert_eq!(
        guest.read(NO_TX, &format!("{backend}/state")).unwrap(),
        b"2"
    );
    assert_eq!(
        guest
            .write(NO_TX, &format!("{backend}/state"), b"6")
            .unwrap_err()
            .errno(),
        Some("EACCES")
    );
    assert_eq!(
        guest.rm(NO_TX, backend).unwrap_err().errno(),
        Some("EACCES")
    );
    // Domain lookup by name and UUID, as libxl lays them out.
    assert_eq!(
        dom0.read(NO_TX, "/local/domain/3/vm").unwrap(),
        b"/vm/6f9619ff-8b86-d011-b42d-00c04fc964ff"
    );
}

#[test]
fn watches_fire_on_registration_and_on_changes_below() {
    let sim = SimXenstored::new();
    let xs = sim.connect(0).unwrap();
    let other = sim.connect(0).unwrap();
    xs.watch("/w", "tok").unwrap();
    assert_eq!(
        next_event(&xs),
        Some(WatchEvent {
            path: "/w".into(),
            token: "tok".into()
        })
    );
    other.write(NO_TX, "/w/x/y", b"1").unwrap();
    let mut seen: Vec<String> =
        std::iter::from_fn(|| xs.events().recv_timeout(Duration::from_millis(300)).ok())
            .map(|e| e.path)
            .collect();
    seen.sort();
    assert_eq!(seen, vec!["/w", "/w/x", "/w/x/y"], "created nodes fire");
    other.write(NO_TX, "/elsewhere", b"1").unwrap();
    assert!(no_event(&xs));
    other.rm(NO_TX, "/w/x").unwrap();
    let mut seen: Vec<String> =
        std::iter::from_fn(|| xs.events().recv_timeout(Duration::from_millis(300)).ok())
            .map(|e| e.path)
            .collect();
    seen.sort();
    assert_eq!(seen, vec!["/w/x", "/w/x/y"]);
    xs.unwatch("/w", "tok").unwrap();
    other.write(NO_TX, "/w/z", b"1").unwrap();
    assert!(no_event(&xs));
    assert!(xs.unwatch("/w", "tok").is_err());
}

#[test]
fn transaction_changes_fire_only_on_commit_and_conflicts_get_eagain() {
    let sim = SimXenstored::new();
    let xs = sim.connect(0).unwrap();
    let other = sim.connect(0).unwrap();
    other.watch("/t", "t").unwrap();
    next_event(&other).unwrap();
    let tx = xs.transaction_start().unwrap();
    xs.write(tx, "/t/a", b"1").unwrap();
    assert_eq!(xs.read(tx, "/t/a").unwrap(), b"1");
    assert!(
        xs.read(0, "/t/a").unwrap_err().is_enoent(),
        "invisible outside until commit"
    );
    assert!(no_event(&other));
    xs.transaction_end(tx, true).unwrap();
    assert!(next_event(&other).is_some());
    assert_eq!(xs.read(0, "/t/a").unwrap(), b"1");
    // Abort discards.
    let tx = xs.transaction_start().unwrap();
    xs.write(tx, "/t/b", b"1").unwrap();
    xs.transaction_end(tx, false).unwrap();
    assert!(xs.read(0, "/t/b").unwrap_err().is_enoent());
    // A change by someone else during the transaction makes the commit fail with EAGAIN.
    let tx = xs.transaction_start().unwrap();
    xs.write(tx, "/t/c", b"mine").unwrap();
    other.write(0, "/t/d", b"theirs").unwrap();
    assert!(xs.transaction_end(tx, true).unwrap_err().is_eagain());
    assert!(xs.read(0, "/t/c").unwrap_err().is_enoent());
    // The helper retries until it goes through.
    let mut attempts = 0;
    transaction(&xs, |tx| {
        attempts += 1;
        if attempts == 1 {
            other.write(0, "/t/e", b"race").unwrap();
        }
        xs.write(tx, "/t/f", b"done")
    })
    .unwrap();
    assert_eq!(
        (attempts, xs.read(0, "/t/f").unwrap()),
        (2, b"done".to_vec())
    );
    // An unknown transaction id is refused.
    assert!(xs.read(999, "/t/f").unwrap_err().is_enoent());
}

#[test]
fn domains_coming_and_going_fire_the_special_watches() {
    let sim = SimXenstored::new();
    let xs = sim.connect(0).unwrap();
    xs.watch("@introduceDomain", "i").unwrap();
    xs.watch("@releaseDomain", "r").unwrap();
    assert_eq!(next_event(&xs).unwrap().path, "@introduceDomain");
    assert_eq!(next_event(&xs).unwrap().path, "@releaseDomain");
    sim.add_domain(5, "g", "00000000-0000-0000-0000-000000000005");
    assert_eq!(next_event(&xs).unwrap().token, "i");
    sim.destroy_domain(5);
    assert_eq!(next_event(&xs).unwrap().token, "r");
    assert!(xs.read(0, "/local/domain/5/name").unwrap_err().is_enoent());
}

#[test]
fn an_oversized_message_drops_only_that_connection() {
    let dir = std::env::temp_dir().join(format!("xs-oversize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("socket");
    let sim = SimXenstored::new();
    sim.listen(&sock, 0).unwrap();
    let good = xen_disk_host::xen::xenstore::client::XsClient::connect_unix(&sock).unwrap();
    let mut bad = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut header = Vec::new();
    for v in [11u32, 1, 0, 5000] {
        header.extend_from_slice(&v.to_ne_bytes());
    }
    bad.write_all(&header).unwrap();
    bad.write_all(&vec![b'x'; 5000]).unwrap_or(());
    bad.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        std::io::Read::read(&mut bad, &mut buf).unwrap_or(0),
        0,
        "the bad peer is disconnected"
    );
    // Garbage types get an error reply, not a crash.
    good.write(0, "/still", b"serving").unwrap();
    assert_eq!(good.read(0, "/still").unwrap(), b"serving");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_requests_get_errors_and_the_server_carries_on() {
    use std::io::Read;
    use xen_disk_host::xen::xenstore::wire::{Message, MsgType};
    let dir = std::env::temp_dir().join(format!("xs-malformed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("socket");
    let sim = SimXenstored::new();
    sim.listen(&sock, 0).unwrap();
    let mut raw = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A WRITE with no NUL after the path, an unknown type, a READ of a path with a NUL inside.
    for (ty, payload) in [
        (MsgType::Write as u32, b"/a".to_vec()),
        (999, b"x\0".to_vec()),
        (MsgType::Read as u32, b"/a\0b\0".to_vec()),
    ] {
        Message {
            ty,
            req_id: 5,
            tx_id: 0,
            payload,
        }
        .write_to(&mut raw)
        .unwrap();
        let reply = Message::read_from(&mut raw).unwrap();
        assert_eq!(reply.kind(), Some(MsgType::Error), "type {ty}");
        assert_eq!(reply.req_id, 5);
    }
    let mut none = [0u8; 1];
    raw.set_nonblocking(true).unwrap();
    assert!(raw.read(&mut none).is_err(), "nothing else was sent");
    let xs = xen_disk_host::xen::xenstore::client::XsClient::connect_unix(&sock).unwrap();
    xs.write(0, "/fine", b"1").unwrap();
    assert_eq!(xs.read(0, "/fine").unwrap(), b"1");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn twenty_thousand_random_requests_never_bring_the_server_down() {
    use xen_disk_host::xen::xenstore::wire::{Message, MsgType};
    let dir = std::env::temp_dir().join(format!("xs-random-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sim = SimXenstored::new();
    sim.add_domain(5, "g", "00000000-0000-0000-0000-000000000005");
    let (dom0_sock, guest_sock) = (dir.join("dom0"), dir.join("guest"));
    sim.listen(&dom0_sock, 0).unwrap();
    sim.listen(&guest_sock, 5).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words: [&[u8]; 9] = [
        b"/",
        b"/a",
        b"/a/b",
        b"@releaseDomain",
        b"rel",
        b"T",
        b"b3",
        b"//",
        b"/local/domain/5/x",
    ];
    for sock in [&dom0_sock, &guest_sock] {
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..10_000u32 {
            let mut payload = Vec::new();
            for _ in 0..next() % 4 {
                if next() % 5 == 0 {
                    payload.push(next() as u8);
                } else {
                    payload.extend_from_slice(words[(next() % 9) as usize]);
                }
                if next() % 4 != 0 {
                    payload.push(0);
                }
            }
            let req = Message {
                ty: (next() % 28) as u32,
                req_id: i,
                tx_id: (next() % 4) as u32,
                payload,
            };
            req.write_to(&mut s).unwrap();
            // Skip watch events; the reply to this request must come, echoing its id.
            let reply = loop {
                let m = Message::read_from(&mut s)
                    .unwrap_or_else(|e| panic!("request {i} ({req:?}): {e}"));
                if m.kind() != Some(MsgType::WatchEvent) {
                    break m;
                }
            };
            assert_eq!(reply.req_id, i, "{req:?}");
        }
    }
    let xs = xen_disk_host::xen::xenstore::client::XsClient::connect_unix(&dom0_sock).unwrap();
    xs.write(0, "/after", b"ok").unwrap();
    assert_eq!(xs.read(0, "/after").unwrap(), b"ok");
    let _ = std::fs::remove_dir_all(&dir);
}
