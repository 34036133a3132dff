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
    run_with(
        tag,
        params,
        qcow2,
        kills,
        check_data,
        How::Kill,
        &Hooks::NONE,
    );
}

/// What a test does besides writing and killing: the disk from disks.toml rather than
/// the toolstack, what to do before the guest starts, and before each kill (with the
/// kill's number).
struct Hooks<'a> {
    static_disk: bool,
    before_guest: &'a dyn Fn(&Host),
    before_kill: &'a dyn Fn(&Host, usize),
}

impl Hooks<'_> {
    const NONE: Hooks<'static> = Hooks {
        static_disk: false,
        before_guest: &|_| {},
        before_kill: &|_, _| {},
    };
    const STATIC: Hooks<'static> = Hooks {
        static_disk: true,
        ..Hooks::NONE
    };
}

/// `xen-disk-host ctl <words>` against the test's serve; its output.
fn ctl(h: &Host, words: &[&str]) -> String {
    let sock = h.dir.join("ctl.sock");
    let mut args = vec!["ctl", "--socket", sock.to_str().unwrap()];
    args.extend_from_slice(words);
    let out = host(&args);
    assert!(
        out.status.success(),
        "ctl {words:?}: {}\n{}",
        stderr(&out),
        h.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_with(
    tag: &str,
    params: &dyn Fn(&Path) -> String,
    qcow2: Option<&dyn Fn(&Path) -> PathBuf>,
    kills: usize,
    check_data: bool,
    how: How,
    hooks: &Hooks<'_>,
) -> (Host, Map) {
    let mut host = Host::new(tag);
    std::fs::create_dir_all(host.dir.join("desc")).unwrap();
    let params = params(&host.dir.0);
    if hooks.static_disk {
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
    (hooks.before_guest)(&host);
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
        (hooks.before_kill)(&host, i);
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
    (host, map)
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

/// qcow2: every acknowledged write reads back after every kill, and the image stays
/// consistent (`qemu-img check`: no corruption; leaked clusters are counted and allowed:
/// allocated, never referenced, harmless). qcow2 keeps its metadata (L2 tables, refcounts)
/// in memory until a flush; a write that allocated is answered only once its metadata
/// changes are in the crash log under serve's state dir, which the next serve replays on
/// open. Without that the guest reads old bytes after a takeover (a flush would not help:
/// the kill can land between a write's answer and the end of the flush after it).
#[test]
fn a_qcow2_disk_keeps_every_acknowledged_write_across_kill_9_and_stays_clean() {
    run(
        "crash-qcow2",
        &qcow2_params,
        Some(&qcow2_image),
        kills(40),
        true,
    );
}

/// cow over a qcow2 base: every restart reopens the overlay file (which refuses a damaged
/// one), the base is never written and stays clean, and every acknowledged write reads
/// back: the overlay's bitmap reaches its file only at a flush, so each new bit is in the
/// crash log before the write is answered, and the next serve persists it on open.
#[test]
fn a_cow_overlay_over_qcow2_keeps_every_acknowledged_write_across_kill_9() {
    run("crash-cow", &cow_params, Some(&cow_base), kills(40), true);
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
        &Hooks::NONE,
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
        &Hooks::NONE,
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
        &Hooks::STATIC,
    );
}

/// `ctl swap` to another image before the guest writes, then kill -9 again and again: each
/// serve that takes the device over serves the swapped-in image (recorded beside the
/// journal), not the one `params` (or disks.toml) names. At the end the swapped-in file
/// holds every write and the first is untouched.
fn swapped_then_killed(tag: &str, static_disk: bool) {
    let swap = |h: &Host| {
        let b = h.dir.join("swapped.img");
        File::create(&b).unwrap().set_len(DISK).unwrap();
        let out = ctl(
            h,
            &["swap", "1/xvdb", "file", &format!("path={}", b.display())],
        );
        assert!(out.contains("now file"), "{out}");
    };
    let hooks = Hooks {
        static_disk,
        before_guest: &swap,
        before_kill: &|_, _| {},
    };
    let (h, map) = run_with(tag, &raw_params, None, kills(8), true, How::Kill, &hooks);
    let swapped = std::fs::read(h.dir.join("swapped.img")).unwrap();
    verify(&map, 0, &swapped).unwrap_or_else(|e| panic!("the swapped-in file: {e}"));
    let first = std::fs::read(h.dir.join("disk.img")).unwrap();
    assert!(
        first.iter().all(|&b| b == 0),
        "a write reached the image params names"
    );
}

#[test]
fn a_swapped_disk_is_served_again_after_kill_9_not_the_one_params_names() {
    swapped_then_killed("crash-swap", false);
}

#[test]
fn a_swapped_static_disk_is_served_again_after_kill_9_too() {
    swapped_then_killed("crash-swap-static", true);
}

/// A backup snapshot open at every kill (`ctl snapshot`: the guest's writes go to a cow
/// overlay while the base is exported): each serve taking the device over writes the
/// overlay into the disk before serving, so no write made after a snapshot is lost with
/// the process; the overlay and its record are gone after, and the image file alone holds
/// every write at the end.
#[test]
fn a_snapshot_open_at_kill_9_is_committed_by_the_next_serve() {
    let snapshot = |h: &Host, i: usize| {
        let sock = h.dir.join(&format!("snap{i}.sock"));
        let out = ctl(
            h,
            &[
                "snapshot",
                "1/xvdb",
                "--nbd",
                &format!("unix:{}", sock.display()),
            ],
        );
        assert!(out.contains("frozen"), "{out}");
        assert!(h.dir.join("state/vbd3-1-51728.journal.snapshot").exists());
    };
    let hooks = Hooks {
        before_kill: &snapshot,
        ..Hooks::NONE
    };
    let n = kills(8);
    let (h, map) = run_with(
        "crash-snapshot",
        &raw_params,
        None,
        n,
        true,
        How::Kill,
        &hooks,
    );
    let log = h.log();
    assert_eq!(
        log.matches("a snapshot was open when the last serve died")
            .count(),
        n,
        "{log}"
    );
    assert!(!h.dir.join("state/vbd3-1-51728.journal.snapshot").exists());
    assert!(!h
        .dir
        .join("state/vbd3-1-51728.journal.snapshot.cow")
        .exists());
    let image = std::fs::read(h.dir.join("disk.img")).unwrap();
    verify(&map, 0, &image).unwrap_or_else(|e| panic!("the image file: {e}"));
}

/// A disk that grew while no serve ran: the one taking it over tells the guest the new
/// size (`sectors`, then `state` again), as an online resize while serving would.
#[test]
fn a_disk_grown_while_serve_was_dead_is_announced_after_the_takeover() {
    let mut h = Host::new("crash-grow");
    std::fs::create_dir_all(h.dir.join("desc")).unwrap();
    let params = raw_params(&h.dir.0);
    h.add_device(&params);
    h.start_serve();
    let _guest = h.attach_guest();
    let sectors = |h: &Host| {
        let xs = h.xenstored.connect(0).unwrap();
        let v = xs.read(NO_TX, &format!("{BE}/sectors")).unwrap_or_default();
        String::from_utf8_lossy(&v)
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    assert_eq!(sectors(&h), DISK / 512);
    h.kill_serve();
    File::options()
        .write(true)
        .open(h.dir.join("disk.img"))
        .unwrap()
        .set_len(2 * DISK)
        .unwrap();
    h.start_serve();
    let started = Instant::now();
    while !(h.log().contains(TAKEN_OVER) && sectors(&h) == 2 * DISK / 512) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "sectors {} after 60 s\n{}",
            sectors(&h),
            h.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(h.log().contains("resized: "), "{}", h.log());
    assert_eq!(h.state(BE), b"4");
}
