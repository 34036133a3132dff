//! A backend crash the guest never notices: a simulated guest in this process writes and
//! verifies (a checksum per 64 KiB block) while `serve --sim-guests` is killed with SIGKILL
//! at random moments and started again. Each new serve takes the connected disk over from
//! its journal. Asserted: every acknowledged write reads back, the guest never sees an I/O
//! error, and never a response it did not ask for or got already (the Rust frontend checks
//! every response's id, as blkfront does). With qcow2 images, `qemu-img check` runs after
//! every kill; with a `cow` overlay, every restart reopens the overlay file (which refuses
//! a damaged one) and the qcow2 base must stay untouched.
//!
//! `XEN_DISK_CRASH_KILLS=N` runs N kills per test (a soak); CI runs the defaults.

mod common;
use common::*;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xen_disk_host::simulation::{GuestDisk, SimOptions};
use xen_disk_host::xen::sim::hypervisor::SimDomain;
use xen_disk_host::xen::sim::remote::guest_socket;
use xen_disk_host::xen::sim::xenstored::SimXenstored;
use xen_disk_host::xen::xenstore::{transaction, Access, Perm, Xenstore, NO_TX};

const DISK: u64 = 32 << 20;
const BLOCK: u64 = 64 << 10;
const BE: &str = "/local/domain/0/backend/vbd3/1/51728";
const FE: &str = "/local/domain/1/device/vbd/51728";
/// What serve logs when it took a connected disk over.
const TAKEN_OVER: &str = "taken over: the guest stays connected";

/// The bytes of `block` at generation `gen` (0: never written, zeroes).
fn pattern(block: u64, gen: u64, out: &mut [u8]) {
    if gen == 0 {
        out.fill(0);
        return;
    }
    let mut x = (block << 32 | gen).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

fn checksum(b: &[u8]) -> u64 {
    b.chunks(8).fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
        (h ^ u64::from_le_bytes(c.try_into().unwrap())).wrapping_mul(0x100_0000_01b3)
    })
}

/// The guest's expectations: each block's generation and the checksum of its bytes.
#[derive(Default)]
struct Map {
    blocks: HashMap<u64, (u64, u64)>,
}

impl Map {
    fn expect(&self, block: u64) -> (u64, u64) {
        let mut buf = vec![0u8; BLOCK as usize];
        let (gen, sum) = self.blocks.get(&block).copied().unwrap_or((0, 0));
        if gen == 0 {
            pattern(block, 0, &mut buf);
            return (0, checksum(&buf));
        }
        (gen, sum)
    }
}

/// Writes random ranges (1 to 48 blocks: up to 3 MiB, several requests in flight), reads
/// random ranges back and sometimes flushes, until told to stop; each acknowledged write is recorded in the map.
fn guest_io(
    mut disk: GuestDisk,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    seed: u64,
    verify_reads: bool,
) -> Result<(GuestDisk, Map), String> {
    let mut map = Map::default();
    let mut gen = 0u64;
    let mut x = seed | 1;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let blocks = DISK / BLOCK;
    while !stop.load(Ordering::Relaxed) {
        // Some flushes: qcow2 and cow write their metadata back then, so kills land in
        // the middle of that too.
        if rand(6) == 0 {
            disk.flush().map_err(|e| format!("flush: {e}"))?;
            ops.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let n = 1 + rand(48);
        let first = rand(blocks - n + 1);
        let mut buf = vec![0u8; (n * BLOCK) as usize];
        if rand(3) > 0 {
            gen += 1;
            for (i, chunk) in buf.chunks_mut(BLOCK as usize).enumerate() {
                pattern(first + i as u64, gen, chunk);
            }
            disk.write(first * BLOCK, &buf)
                .map_err(|e| format!("write of blocks {first}+{n}: {e}"))?;
            for (i, chunk) in buf.chunks(BLOCK as usize).enumerate() {
                map.blocks.insert(first + i as u64, (gen, checksum(chunk)));
            }
        } else {
            disk.read(first * BLOCK, &mut buf)
                .map_err(|e| format!("read of blocks {first}+{n}: {e}"))?;
            if verify_reads {
                verify(&map, first, &buf)?;
            }
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
    Ok((disk, map))
}

fn verify(map: &Map, first: u64, buf: &[u8]) -> Result<(), String> {
    for (i, chunk) in buf.chunks(BLOCK as usize).enumerate() {
        let b = first + i as u64;
        let (gen, sum) = map.expect(b);
        if checksum(chunk) != sum {
            return Err(format!(
                "block {b}: does not read back as written (generation {gen})"
            ));
        }
    }
    Ok(())
}

/// The host side: xenstored and the guest's memory in this process, serve in a child.
struct Host {
    dir: TempDir,
    xenstored: Arc<SimXenstored>,
    domain: Arc<SimDomain>,
    serve: Option<Child>,
    starts: usize,
    /// serve's `--config`, when the disk is a static one.
    config: Option<PathBuf>,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Host {
    fn new(tag: &str) -> Host {
        build_all();
        let dir = TempDir::new(tag);
        let xenstored = Arc::new(SimXenstored::new());
        xenstored.listen(&dir.join("xs.sock"), 0).unwrap();
        xenstored.add_domain(1, "alpha", "00000000-0000-0000-0000-0000000000a1");
        let domain = SimDomain::new(1, 4 * GuestDisk::pages_needed(2), 64).unwrap();
        domain.serve(&guest_socket(&dir.0, 1)).unwrap();
        Host {
            dir,
            xenstored,
            domain,
            serve: None,
            starts: 0,
            config: None,
        }
    }

    fn start_serve(&mut self) {
        self.starts += 1;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .unwrap();
        let mut cmd = Command::new(target_dir().join("xen-disk-host"));
        cmd.args(["serve", "--queues", "2", "--workers", "2"]);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .arg("--sim-guests")
            .arg(&self.dir.0)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--control")
            .arg(self.dir.join("ctl.sock"))
            .arg("--descriptors")
            .arg(self.dir.join("desc"))
            .env("XENSTORED_PATH", self.dir.join("xs.sock"))
            .env("XEN_DISK_PLUGIN_PATH", target_dir())
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run xen-disk-host serve");
        self.serve = Some(child);
    }

    fn kill_serve(&mut self) {
        let mut c = self.serve.take().expect("serve running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM: serve must hand over (drain, leave the disk connected) and exit 0.
    fn term_serve(&mut self) {
        let mut c = self.serve.take().expect("serve running");
        // SAFETY: signals our own child, which has not been reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = c.wait().unwrap();
        assert!(
            status.success(),
            "serve after SIGTERM: {status}\n{}",
            self.log()
        );
        let log = self.log();
        assert!(log.ends_with("handed over\n"), "{log}");
        assert!(
            self.dir.join("state/vbd3-1-51728.journal").exists(),
            "the journal stays for the next serve"
        );
    }

    /// `ctl upgrade`: the same process starts its binary again (the `n`th time).
    fn upgrade_serve(&mut self, n: usize) {
        let out = host(&[
            "ctl",
            "--socket",
            self.dir.join("ctl.sock").to_str().unwrap(),
            "upgrade",
        ]);
        assert!(out.status.success(), "ctl upgrade: {}", stderr(&out));
        let asked = Instant::now();
        while self.log().matches("upgrade: starting").count() < n {
            assert!(asked.elapsed() < Duration::from_secs(60), "{}", self.log());
            std::thread::sleep(Duration::from_millis(2));
        }
        let c = self.serve.as_mut().expect("serve running");
        assert!(c.try_wait().unwrap().is_none(), "the same process goes on");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// Creates the device as libxl does (both directories in one transaction).
    fn add_device(&self, params: &str) {
        let xs = self.xenstored.connect(0).unwrap();
        let perm = |domid, access| Perm { domid, access };
        transaction(&xs, |tx| {
            xs.mkdir(tx, BE)?;
            xs.set_perms(tx, BE, &[perm(0, Access::None), perm(1, Access::Read)])?;
            xs.mkdir(tx, FE)?;
            xs.set_perms(tx, FE, &[perm(1, Access::None), perm(0, Access::Read)])?;
            for (k, v) in [
                ("frontend", FE),
                ("frontend-id", "1"),
                ("online", "1"),
                ("state", "1"),
                ("mode", "w"),
                ("params", params),
            ] {
                xs.write(tx, &format!("{BE}/{k}"), v.as_bytes())?;
            }
            for (k, v) in [
                ("backend", BE),
                ("backend-id", "0"),
                ("state", "1"),
                ("virtual-device", "51728"),
            ] {
                xs.write(tx, &format!("{FE}/{k}"), v.as_bytes())?;
            }
            Ok(())
        })
        .unwrap();
    }

    fn attach_guest(&self) -> GuestDisk {
        let xs = self.xenstored.connect(1).unwrap();
        let opts = SimOptions {
            queues: 2,
            ring_page_order: 0,
            ..SimOptions::default()
        };
        GuestDisk::attach(&xs, &self.domain, FE, BE, 0, &opts)
            .unwrap_or_else(|e| panic!("guest attach: {e}\n{}", self.log()))
    }

    fn state(&self, dir: &str) -> Vec<u8> {
        let xs = self.xenstored.connect(0).unwrap();
        xs.read(NO_TX, &format!("{dir}/state")).unwrap_or_default()
    }
}

/// How serve goes away under the guest.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum How {
    /// SIGKILL, then a new serve.
    Kill,
    /// SIGTERM (systemctl stop/restart): serve hands the disk over and exits 0; a new
    /// serve takes it.
    Term,
    /// `ctl upgrade`: serve hands over and starts its binary again in the same process.
    Upgrade,
}

/// What the image check after each kill found.
#[derive(Default, Debug)]
struct Checks {
    runs: usize,
    /// At the last check (they add up: each kill can leave a few more).
    leaked_clusters: u64,
}

/// `qemu-img check`: corruption fails the test; leaked clusters (space allocated and not
/// referenced, harmless to data) are counted and reported.
fn qemu_img_check(image: &Path, checks: &mut Checks, log: &dyn Fn() -> String) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(image)
        .output()
        .expect("qemu-img (Debian package qemu-utils) must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    // Exit 0: clean; 3: leaks only; 2: corruptions; 1: could not check.
    match out.status.code() {
        Some(0) | Some(3) => {}
        _ => panic!(
            "qemu-img check after a kill: {text}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            log()
        ),
    }
    checks.runs += 1;
    // Pretty JSON: `"leaks": N,` when there are any.
    if let Some(at) = text.find("\"leaks\":") {
        let n = text[at + 8..].split([',', '\n', '}']).next().unwrap_or("");
        checks.leaked_clusters += n
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("leaks in {text}"));
    }
}

/// The whole run: attach, then `kills` times: let the guest make progress, kill serve at a
/// random moment, check the image, start serve again; prints the pauses the guest saw.
/// `check_data`: the guest checks what it reads (off where the plugin is known to lose
/// acknowledged writes with its process: the run then proves the rest).
fn run(
    tag: &str,
    params: &dyn Fn(&Path) -> String,
    qcow2: Option<&dyn Fn(&Path) -> PathBuf>,
    kills: usize,
    check_data: bool,
) {
    run_with(tag, params, qcow2, kills, check_data, How::Kill, false)
}

fn run_with(
    tag: &str,
    params: &dyn Fn(&Path) -> String,
    qcow2: Option<&dyn Fn(&Path) -> PathBuf>,
    kills: usize,
    check_data: bool,
    how: How,
    static_disk: bool,
) {
    let mut host = Host::new(tag);
    std::fs::create_dir_all(host.dir.join("desc")).unwrap();
    let params = params(&host.dir.0);
    if static_disk {
        // disks.toml's disk for domain alpha, no vbd: serve picks xvdb (xvda is left for a root disk), the device's paths.
        let path = params.strip_prefix("file:").expect("a file disk");
        let config = host.dir.join("disks.toml");
        std::fs::write(
            &config,
            format!("[[disk]]\ndomain = \"alpha\"\nplugin = \"file\"\n[disk.plugin-config]\npath = \"{path}\"\n"),
        )
        .unwrap();
        host.config = Some(config);
    } else {
        host.add_device(&params);
    }
    host.start_serve();
    let disk = host.attach_guest();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let guest = {
        let (stop, ops) = (stop.clone(), ops.clone());
        std::thread::spawn(move || guest_io(disk, stop, ops, 23, check_data))
    };
    let mut checks = Checks::default();
    let mut pauses = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..kills {
        // This serve took the disk over (after the first), then the guest finished something
        // under it.
        let restarted = Instant::now();
        while host.log().matches(TAKEN_OVER).count() < i {
            assert!(
                restarted.elapsed() < Duration::from_secs(60),
                "kill {i}: serve did not take the disk over in 60 s\n{}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let before = ops.load(Ordering::Relaxed);
        while ops.load(Ordering::Relaxed) <= before {
            if guest.is_finished() {
                let r = guest.join().unwrap().map(|_| ());
                panic!("kill {i}: the guest stopped: {r:?}\n{}", host.log());
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(60),
                "kill {i}: no guest progress for 60 s after serve started\n{}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        if i > 0 {
            pauses.push(restarted.elapsed());
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_micros(x % 40_000));
        match how {
            How::Kill => host.kill_serve(),
            How::Term => host.term_serve(),
            How::Upgrade => host.upgrade_serve(i + 1),
        }
        // The guest's side never moves: the disk stays Connected while nobody serves it.
        assert_eq!(host.state(FE), b"4");
        assert_eq!(host.state(BE), b"4");
        if let Some(image) = qcow2 {
            qemu_img_check(&image(&host.dir.0), &mut checks, &|| host.log());
        }
        if how != How::Upgrade {
            host.start_serve();
        }
    }
    // One more round of progress, then the guest stops and reads everything back.
    let before = ops.load(Ordering::Relaxed);
    while ops.load(Ordering::Relaxed) <= before + 1 && !guest.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let (mut disk, map) = guest
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the guest saw: {e}\n{}", host.log()));
    let mut buf = vec![0u8; DISK as usize];
    disk.read(0, &mut buf).unwrap();
    if check_data {
        verify(&map, 0, &buf).unwrap_or_else(|e| panic!("{e}\n{}", host.log()));
    }
    let log = host.log();
    let takeovers = log.matches(TAKEN_OVER).count();
    assert_eq!(takeovers, kills, "each restart took the disk over\n{log}");
    assert!(!log.contains("cannot take"), "{log}");
    pauses.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    println!(
        "{tag}: {kills} kills, {} guest operations, {} blocks written; pause the guest saw: median {:.0} ms, max {:.0} ms; qemu-img checks {} (leaked clusters at the end {})",
        ops.load(Ordering::Relaxed),
        map.blocks.len(),
        pauses.get(pauses.len() / 2).map_or(0.0, ms),
        pauses.last().map_or(0.0, ms),
        checks.runs,
        checks.leaked_clusters,
    );
}

fn kills(default: usize) -> usize {
    std::env::var("XEN_DISK_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_raw_file_disk_survives_kill_9_of_serve_at_random_moments() {
    run(
        "crash-file",
        &|dir| {
            let img = dir.join("disk.img");
            File::create(&img).unwrap().set_len(DISK).unwrap();
            format!("file:{}", img.display())
        },
        None,
        kills(100),
        true,
    );
}

/// qcow2: the image stays consistent after every kill (`qemu-img check`: no corruption;
/// leaked clusters are counted and allowed: allocated, never referenced, harmless), and the
/// guest sees no error and no stray response. What it reads is not checked here: see the
/// ignored test below.
#[test]
fn a_qcow2_disk_survives_kill_9_and_qemu_img_check_finds_no_corruption() {
    run(
        "crash-qcow2",
        &qcow2_params,
        Some(&qcow2_image),
        kills(40),
        false,
    );
}

/// Not yet true, hence ignored (run it with `--ignored`): qcow2 keeps its metadata (L2
/// tables, refcounts) in memory until a flush, so a write that allocated a cluster and was
/// acknowledged is lost with the process: the guest reads the old bytes after the takeover.
/// A flush does not close the gap: the kill can land between a write's answer and the end
/// of the flush after it, and the replayed flush runs in a process that never saw the
/// metadata. The plugin must put its metadata where the process's death cannot take it.
#[test]
#[ignore = "qcow2 loses acknowledged writes with its process (metadata cached until flush)"]
fn a_qcow2_disk_keeps_every_acknowledged_write_across_kill_9() {
    run(
        "crash-qcow2-data",
        &qcow2_params,
        Some(&qcow2_image),
        kills(40),
        true,
    );
}

/// cow over a qcow2 base: every restart reopens the overlay file (which refuses a damaged
/// one), the base is never written and stays clean, no error and no stray response.
#[test]
fn a_cow_overlay_over_qcow2_survives_kill_9_and_reopens_clean_every_time() {
    run("crash-cow", &cow_params, Some(&cow_base), kills(40), false);
}

/// Not yet true, as for qcow2: the cow overlay's bitmap reaches its file only at a flush.
#[test]
#[ignore = "cow loses acknowledged writes with its process (bitmap cached until flush)"]
fn a_cow_overlay_keeps_every_acknowledged_write_across_kill_9() {
    run(
        "crash-cow-data",
        &cow_params,
        Some(&cow_base),
        kills(40),
        true,
    );
}

fn qcow2_image(dir: &Path) -> PathBuf {
    dir.join("disk.qcow2")
}

fn qcow2_params(dir: &Path) -> String {
    let img = qcow2_image(dir);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        &DISK.to_string(),
    ]);
    format!("qcow2:{}", img.display())
}

/// The base is never written: it must stay exactly as clean as it was made.
fn cow_base(dir: &Path) -> PathBuf {
    dir.join("base.qcow2")
}

fn cow_params(dir: &Path) -> String {
    let base = cow_base(dir);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().unwrap(),
        &DISK.to_string(),
    ]);
    let desc = dir.join("desc").join("cow.toml");
    std::fs::write(
        &desc,
        format!(
            "plugin = \"cow\"\n[plugin-config]\noverlay = \"{}\"\n[plugin-config.base]\nplugin = \"qcow2\"\npath = \"{}\"\n",
            dir.join("overlay.cow").display(),
            base.display()
        ),
    )
    .unwrap();
    format!("aio:{}", desc.display())
}

/// `systemctl stop` / `restart` (SIGTERM): serve drains, leaves the disk Connected (no
/// state change the guest could see) and its journal, and exits 0; the next serve takes
/// the disk over. Every write still reads back.
#[test]
fn sigterm_hands_the_disk_over_to_the_next_serve_without_a_state_change() {
    run_with(
        "handover-term",
        &raw_params,
        None,
        kills(10),
        true,
        How::Term,
        false,
    );
}

/// `ctl upgrade`: the running serve hands over and starts its binary again in the same
/// process (same pid: systemd sees the service go on), which takes the disk over.
#[test]
fn ctl_upgrade_starts_the_binary_again_in_place_and_it_takes_the_disk_over() {
    run_with(
        "handover-upgrade",
        &raw_params,
        None,
        kills(10),
        true,
        How::Upgrade,
        false,
    );
}

fn raw_params(dir: &Path) -> String {
    let img = dir.join("disk.img");
    File::create(&img).unwrap().set_len(DISK).unwrap();
    format!("file:{}", img.display())
}

/// A disk from disks.toml that names no vbd: the new serve finds the device the dead one
/// made for it (its journal, no toolstack `params`) instead of attaching a second one.
#[test]
fn a_static_disk_without_a_vbd_is_taken_over_too() {
    run_with(
        "crash-static",
        &raw_params,
        None,
        kills(10),
        true,
        How::Kill,
        true,
    );
}
