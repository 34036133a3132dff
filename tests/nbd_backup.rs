//! Live backup under a simulated guest that keeps writing: `ctl snapshot` freezes the disk
//! under a cow overlay and exports the base over NBD, `ctl commit` writes the overlay back
//! live; the second snapshot's export publishes the blocks written since the first as
//! `qemu:dirty-bitmap:snap1`.
//!
//! The guest writes whole 4 KiB blocks, each stamped with the write's sequence number, one
//! write after another. So a copy of the disk "at an instant" must hold, for some k, exactly
//! the writes 1..=k: every block shows its last write up to k (or its original bytes).

mod common;
mod nbd_common;
use common::*;
use nbd_common::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use xen_disk_host::backend::device::DeviceStats;
use xen_disk_host::backend::registry::{Entry, Registry};
use xen_disk_host::plugin::{open_stack, GuardedDisk};
use xen_disk_host::simulation::SimulatedDisk;
use xen_disk_plugin_api::Config;

const SIZE: u64 = 16 << 20;
const BLOCK: usize = 4096;
const BLOCKS: u64 = SIZE / BLOCK as u64;
const STAMP: &[u8; 8] = b"XDWRITE!";

/// The bytes write `seq` puts in block `b`.
fn stamped(seq: u64, b: u64) -> Vec<u8> {
    let mut v = vec![(seq as u8) ^ (b as u8); BLOCK];
    v[..8].copy_from_slice(&seq.to_le_bytes());
    v[8..16].copy_from_slice(STAMP);
    v[16..24].copy_from_slice(&b.to_le_bytes());
    v
}

/// What the guest did: for each block, the sequence numbers of the writes to it, in order.
#[derive(Default)]
struct Log {
    writes: HashMap<u64, Vec<u64>>,
    last_seq: u64,
}

impl Log {
    /// Checks that `image` is the disk after writes 1..=k for some k, and returns k.
    fn cut_of(&self, image: &[u8], original: &[u8]) -> u64 {
        let mut seen = vec![0u64; BLOCKS as usize];
        for b in 0..BLOCKS as usize {
            let blk = &image[b * BLOCK..][..BLOCK];
            if &blk[8..16] == STAMP {
                let seq = u64::from_le_bytes(blk[..8].try_into().unwrap());
                assert_eq!(blk, &stamped(seq, b as u64)[..], "block {b} is torn");
                seen[b] = seq;
            } else {
                assert_eq!(
                    blk,
                    &original[b * BLOCK..][..BLOCK],
                    "block {b} is neither written nor original"
                );
            }
        }
        let k = *seen.iter().max().unwrap();
        for (b, &s) in seen.iter().enumerate() {
            let writes = self
                .writes
                .get(&(b as u64))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            // The block's write s was made (or s is 0), and no later write to it is <= k.
            assert!(
                s == 0 || writes.contains(&s),
                "block {b}: seq {s} never written there"
            );
            let next = writes.iter().find(|&&w| w > s);
            assert!(
                next.is_none_or(|&w| w > k),
                "block {b} holds write {s} but write {} (<= cut {k}) is missing",
                next.unwrap()
            );
        }
        k
    }

    /// The disk after every write.
    fn model(&self, original: &[u8]) -> Vec<u8> {
        let mut m = original.to_vec();
        for (&b, seqs) in &self.writes {
            let last = *seqs.last().unwrap();
            m[b as usize * BLOCK..][..BLOCK].copy_from_slice(&stamped(last, b));
        }
        m
    }
}

/// A guest writing 1 to 4 blocks at a time, one write after another, into blocks below
/// `limit` (the rest of the disk stays as it was), until `stop`.
fn guest(
    mut sim: SimulatedDisk,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    limit: Arc<AtomicU64>,
) -> SimulatedDisk {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    while !stop.load(Ordering::SeqCst) {
        let n = 1 + next() % 4;
        let first = next() % (limit.load(Ordering::SeqCst) - n);
        let seq = log.lock().unwrap().last_seq + 1;
        let mut data = Vec::with_capacity(n as usize * BLOCK);
        for b in first..first + n {
            data.extend_from_slice(&stamped(seq, b));
        }
        sim.write(first * BLOCK as u64, &data).unwrap();
        let mut l = log.lock().unwrap();
        l.last_seq = seq;
        for b in first..first + n {
            l.writes.entry(b).or_default().push(seq);
        }
    }
    sim
}

fn handle(registry: &Registry, line: &str) -> String {
    let out = registry.handle(line);
    assert!(!out.starts_with("error: "), "{line}: {out}");
    out
}

/// Waits until the guest made `n` more writes.
fn let_guest_write(log: &Mutex<Log>, n: u64) {
    let from = log.lock().unwrap().last_seq;
    while log.lock().unwrap().last_seq < from + n {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn snapshot_export_incremental_and_commit_while_the_guest_writes() {
    let t = TempDir::new("backup");
    let img = t.join("disk.img");
    random_file(&img, SIZE as usize, 21);
    let original = std::fs::read(&img).unwrap();
    let so = plugin_path("file");
    let stack = open_stack(
        so.to_str().unwrap(),
        &Config::from_pairs(&[format!("path={}", img.display())]).unwrap(),
    )
    .unwrap();
    let disk = Arc::new(GuardedDisk::new(Box::new(stack.disk), false).unwrap());
    let registry = Registry::default();
    registry.add(Entry {
        id: "1/xvdb".into(),
        domid: 1,
        guest: "sim-guest".into(),
        vbd: "xvdb".into(),
        stack: Mutex::new("file".into()),
        disk: disk.clone(),
        stats: Arc::new(DeviceStats::default()),
        stop: Arc::new(AtomicBool::new(false)),
        journal: None,
    });
    // The plugin search path, for the cow overlay the snapshot loads.
    std::env::set_var("XEN_DISK_PLUGIN_PATH", target_dir());
    let sim = SimulatedDisk::start(disk.clone()).unwrap();
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(AtomicBool::new(false));
    // The guest writes the first half of the disk, and after the first snapshot only its
    // first eighth: the bitmap of the second snapshot must show that eighth and no more.
    let limit = Arc::new(AtomicU64::new(BLOCKS / 2));
    let writer = {
        let (log, stop, limit) = (log.clone(), stop.clone(), limit.clone());
        std::thread::spawn(move || guest(sim, log, stop, limit))
    };
    let_guest_write(&log, 200);

    // A first, full backup while the guest writes on.
    let sock1 = t.join("snap1.sock");
    limit.store(BLOCKS / 8, Ordering::SeqCst);
    let out = handle(
        &registry,
        &format!("snapshot 1/xvdb --nbd unix:{}", sock1.display()),
    );
    assert!(
        out.contains("snapshot snap1 frozen") && !out.contains("dirty-bitmap"),
        "{out}"
    );
    assert!(registry.handle("list").contains("stack=cow over file"));
    let_guest_write(&log, 200);
    let uri1 = format!("nbd+unix:///?socket={}", sock1.display());
    let info = tool_ok("nbdinfo", &["--json", &uri1]);
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    let backup1 = t.join("backup1.img");
    tool_ok("nbdcopy", &[&uri1, s(&backup1)]);
    let b1 = std::fs::read(&backup1).unwrap();
    let k1 = log.lock().unwrap().cut_of(&b1, &original);
    assert!(
        k1 >= 200,
        "the backup holds the writes before the snapshot: {k1}"
    );
    // A snapshot is open: a second one is refused, naming what to do.
    let again = registry.handle(&format!(
        "snapshot 1/xvdb --nbd unix:{}",
        t.join("x.sock").display()
    ));
    assert!(again.contains("ctl commit 1/xvdb"), "{again}");
    let_guest_write(&log, 200);
    assert!(
        log.lock().unwrap().last_seq > k1 + 200,
        "the guest wrote on during the backup"
    );

    // Commit, live.
    let out = handle(&registry, "commit 1/xvdb");
    assert!(
        out.contains("snapshot snap1 committed") && out.contains("now file"),
        "{out}"
    );
    // Most blocks went down while the guest ran; the pause copied only what was left.
    let live: u64 = out
        .split(": ")
        .nth(2)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(live > 0, "{out}");
    // The export is gone with it.
    assert!(std::os::unix::net::UnixStream::connect(&sock1).is_err());
    let_guest_write(&log, 200);

    // The second snapshot publishes what changed since the first.
    let sock2 = t.join("snap2.sock");
    let out = handle(
        &registry,
        &format!(
            "snapshot 1/xvdb --nbd unix:{} --name second",
            sock2.display()
        ),
    );
    assert!(out.contains("qemu:dirty-bitmap:snap1"), "{out}");
    let uri2 = format!("nbd+unix:///?socket={}", sock2.display());
    let map = nbdinfo_map(&uri2, Some("qemu:dirty-bitmap:snap1"));
    let dirty: Vec<(u64, u64)> = map
        .iter()
        .filter(|r| r.2 & 1 != 0)
        .map(|r| (r.0, r.1))
        .collect();
    let dirty_bytes: u64 = dirty.iter().map(|r| r.1).sum();
    assert!(dirty_bytes > 0, "{map:?}");
    assert!(
        dirty.iter().all(|&(o, l)| o + l <= SIZE / 8),
        "only the eighth the guest writes now is dirty: {map:?}"
    );
    // The incremental backup, as the README shows it: a copy of the first backup, then the
    // dirty ranges of the second export written into it (scripts/nbd-apply-dirty.sh).
    let inc = t.join("backup2.img");
    std::fs::copy(&backup1, &inc).unwrap();
    let o = std::process::Command::new("bash")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nbd-apply-dirty.sh"))
        .args([&uri2, "snap1", s(&inc)])
        .output()
        .expect("bash");
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(stdout(&o).trim(), dirty_bytes.to_string(), "bytes copied");
    let b2 = std::fs::read(&inc).unwrap();
    // The same through a client of the test's own, range by range.
    let mut by_hand = b1.clone();
    let mut client = MiniClient::connect(&sock2);
    for &(o, l) in &dirty {
        client.read(o, &mut by_hand[o as usize..(o + l) as usize]);
    }
    assert!(by_hand == b2);
    // It is the disk at the second snapshot: a full copy of the export agrees, and it
    // is a cut of the guest's writes later than the first.
    let full2 = t.join("full2.img");
    tool_ok("nbdcopy", &[&uri2, s(&full2)]);
    assert!(
        b2 == std::fs::read(&full2).unwrap(),
        "incremental != full backup of snapshot 2"
    );
    let k2 = log.lock().unwrap().cut_of(&b2, &original);
    // The bitmap is exactly the 64 KiB blocks that the writes between the cuts touched.
    let mut touched = std::collections::BTreeSet::new();
    for (&b, seqs) in &log.lock().unwrap().writes {
        if seqs.iter().any(|&q| q > k1 && q <= k2) {
            touched.insert(b * BLOCK as u64 / 65536);
        }
    }
    let marked: std::collections::BTreeSet<u64> = dirty
        .iter()
        .flat_map(|&(o, l)| o / 65536..(o + l) / 65536)
        .collect();
    assert_eq!(marked, touched);
    assert!(k2 > k1 + 600, "{k2} vs {k1}");
    drop(client);

    let out = handle(&registry, "commit 1/xvdb");
    assert!(out.contains("snapshot second committed"), "{out}");
    let_guest_write(&log, 100);
    stop.store(true, Ordering::SeqCst);
    let mut sim = writer.join().unwrap();
    sim.flush().unwrap();
    // Every write the guest made is on the disk, and in the image file.
    let model = log.lock().unwrap().model(&original);
    let mut all = vec![0u8; SIZE as usize];
    sim.read(0, &mut all).unwrap();
    assert!(
        all == model,
        "the disk after commit differs from the guest's writes"
    );
    sim.shutdown().unwrap();
    assert!(
        std::fs::read(&img).unwrap() == model,
        "the image file misses writes"
    );
}

#[test]
fn bad_snapshot_and_commit_requests_change_nothing() {
    let t = TempDir::new("backup-bad");
    let img = t.join("disk.img");
    random_file(&img, 1 << 20, 4);
    let so = plugin_path("file");
    let stack = open_stack(
        so.to_str().unwrap(),
        &Config::from_pairs(&[format!("path={}", img.display())]).unwrap(),
    )
    .unwrap();
    let disk = Arc::new(GuardedDisk::new(Box::new(stack.disk), false).unwrap());
    let registry = Registry::default();
    registry.add(Entry {
        id: "1/xvdb".into(),
        domid: 1,
        guest: String::new(),
        vbd: "xvdb".into(),
        stack: Mutex::new("file".into()),
        disk: disk.clone(),
        stats: Arc::new(DeviceStats::default()),
        stop: Arc::new(AtomicBool::new(false)),
        journal: None,
    });
    std::env::set_var("XEN_DISK_PLUGIN_PATH", target_dir());
    let before = disk.current();
    for (line, want) in [
        ("commit 1/xvdb", "no snapshot is open"),
        ("snapshot 1/xvdb", "--nbd"),
        (
            "snapshot 1/xvdb --nbd unix:/nonexistent-dir/x.sock",
            "not frozen",
        ),
        (
            "snapshot 1/xvdb --nbd unix:/tmp/x.sock -c granularity=3",
            "not frozen",
        ),
        ("snapshot 9/xvdz --nbd unix:/tmp/x.sock", "9/xvdz"),
    ] {
        let out = registry.handle(line);
        assert!(
            out.starts_with("error: ") && out.contains(want),
            "{line}: {out}"
        );
        assert_eq!(out.lines().count(), 1, "{out}");
    }
    assert!(
        Arc::ptr_eq(&before, &disk.current()),
        "a refused snapshot swapped the disk"
    );
    assert!(disk.trackers().is_empty());
}

#[test]
fn ctl_snapshot_and_commit_on_a_connect_sim_process() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let t = TempDir::new("backup-ctl");
    let img = t.join("disk.img");
    random_file(&img, 8 << 20, 8);
    let control = t.join("ctl.sock");
    build_all();
    let mut child = Command::new(target_dir().join("xen-disk-host"))
        .args(["connect", "1", "--sim", "--plugin", "file", "-c"])
        .arg(format!("path={}", img.display()))
        .arg("--control")
        .arg(&control)
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    // Kept open: the process prints again when it detaches.
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    lines.read_line(&mut first).unwrap();
    assert!(first.starts_with("attached file"), "{first}");
    let ctl = |words: &[&str]| {
        let mut args = vec!["ctl", "--socket", s(&control)];
        args.extend(words);
        let o = host(&args);
        assert!(o.status.success(), "{words:?}: {}", stderr(&o));
        stdout(&o)
    };
    let nbd = t.join("snap.sock");
    let out = ctl(&[
        "snapshot",
        "1/xvdb",
        "--nbd",
        &format!("unix:{}", s(&nbd)),
        "--name",
        "nightly",
    ]);
    assert!(out.contains("snapshot nightly frozen"), "{out}");
    assert!(ctl(&["list"]).contains("stack=cow over file"));
    let uri = format!("nbd+unix:///?socket={}", s(&nbd));
    // The frozen base is the image as it was.
    tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&img), &uri],
    );
    let info = tool_ok("nbdinfo", &["--json", &uri]);
    assert!(
        info.contains("\"is_read_only\": true") && info.contains("nightly"),
        "{info}"
    );
    // A second snapshot while one is open is refused, in one line, exit 2.
    let o = host(&[
        "ctl",
        "--socket",
        s(&control),
        "snapshot",
        "1/xvdb",
        "--nbd",
        "unix:/tmp/y.sock",
    ]);
    assert_bad_input(&o, &["ctl commit 1/xvdb"]);
    let out = ctl(&["commit", "1/xvdb"]);
    assert!(
        out.contains("snapshot nightly committed") && out.contains("now file"),
        "{out}"
    );
    assert!(ctl(&["list"]).contains("stack=file"));
    // A snapshot whose overlay a swap replaces is dropped, and says so on commit.
    let out = ctl(&["snapshot", "1/xvdb", "--nbd", &format!("unix:{}", s(&nbd))]);
    assert!(out.contains("frozen"), "{out}");
    ctl(&["swap", "1/xvdb", "file", "-c", &format!("path={}", s(&img))]);
    let o = host(&["ctl", "--socket", s(&control), "commit", "1/xvdb"]);
    assert_bad_input(&o, &["was swapped since snapshot", "dropped"]);
    assert!(std::os::unix::net::UnixStream::connect(&nbd).is_err());
    let out = ctl(&["snapshot", "1/xvdb", "--nbd", &format!("unix:{}", s(&nbd))]);
    assert!(out.contains("frozen"), "{out}");
    ctl(&["commit", "1/xvdb"]);
    ctl(&["detach", "1/xvdb"]);
    assert!(child.wait().unwrap().success());
}

/// A registry entry for `disk` as device `id`.
fn entry(id: &str, disk: Arc<GuardedDisk>, stack: &str) -> Entry {
    Entry {
        id: id.into(),
        domid: 1,
        guest: String::new(),
        vbd: id.split('/').nth(1).unwrap().into(),
        stack: Mutex::new(stack.into()),
        disk,
        stats: Arc::new(DeviceStats::default()),
        stop: Arc::new(AtomicBool::new(false)),
        journal: None,
    }
}

#[test]
fn a_long_commit_holds_up_no_other_device_and_refuses_a_second_commit_at_once() {
    let t = TempDir::new("backup-two");
    std::env::set_var("XEN_DISK_PLUGIN_PATH", target_dir());
    let (img1, img2) = (t.join("one.img"), t.join("two.img"));
    random_file(&img1, 4 << 20, 5);
    random_file(&img2, 4 << 20, 6);
    let open = |plugin: &str, pairs: &[String]| {
        let so = plugin_path(plugin);
        let stack = open_stack(so.to_str().unwrap(), &Config::from_pairs(pairs).unwrap()).unwrap();
        Arc::new(GuardedDisk::new(Box::new(stack.disk), false).unwrap())
    };
    // Device 1's disk takes 30 ms a write, so committing 40 blocks takes over a second.
    let slow = open(
        "delay",
        &[
            "write_ms=30".into(),
            "base=file".into(),
            format!("base.path={}", img1.display()),
        ],
    );
    let other = open("file", &[format!("path={}", img2.display())]);
    let registry = Arc::new(Registry::default());
    registry.add(entry("1/xvdb", slow.clone(), "delay over file"));
    registry.add(entry("1/xvdc", other.clone(), "file"));

    handle(
        &registry,
        &format!(
            "snapshot 1/xvdb --nbd unix:{}",
            t.join("one.sock").display()
        ),
    );
    let mut sim = SimulatedDisk::start(slow.clone()).unwrap();
    for i in 0..40u64 {
        sim.write(i * DIRTY, &stamped(i + 1, i)).unwrap();
    }
    let trackers = slow.trackers().len();
    let done = Arc::new(AtomicBool::new(false));
    let committer = {
        let (registry, done) = (registry.clone(), done.clone());
        std::thread::spawn(move || {
            let out = registry.handle("commit 1/xvdb");
            done.store(true, Ordering::SeqCst);
            out
        })
    };
    // The commit is copying once it tracks the guest's writes during the copy.
    let t0 = std::time::Instant::now();
    while slow.trackers().len() <= trackers {
        assert!(
            !done.load(Ordering::SeqCst) && t0.elapsed().as_secs() < 20,
            "the commit never started copying"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }

    let again = registry.handle("commit 1/xvdb");
    assert!(
        again.starts_with("error: 1/xvdb: a snapshot or commit of this device is still running"),
        "{again}"
    );
    assert_eq!(again.lines().count(), 1, "{again}");
    let out = handle(
        &registry,
        &format!(
            "snapshot 1/xvdc --nbd unix:{}",
            t.join("two.sock").display()
        ),
    );
    assert!(out.contains("snapshot snap1 frozen"), "{out}");
    assert!(
        !done.load(Ordering::SeqCst),
        "the other device's snapshot waited for the commit"
    );

    let out = committer.join().unwrap();
    assert!(out.contains("snapshot snap1 committed"), "{out}");
    handle(&registry, "commit 1/xvdc");
    // Every write made under the snapshot reached device 1's file.
    drop(sim);
    let after = std::fs::read(&img1).unwrap();
    for i in 0..40u64 {
        let at = (i * DIRTY) as usize;
        assert_eq!(&after[at..at + BLOCK], &stamped(i + 1, i)[..], "block {i}");
    }
}

/// The dirty map's granularity: one write in each such block makes one block to copy.
const DIRTY: u64 = xen_disk_host::control::backup::DIRTY_GRANULARITY;
