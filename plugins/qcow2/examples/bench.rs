//! Throughput of the plugin (through the FFI boundary) against `qemu-img bench -f qcow2`,
//! with the same pattern: sequential requests of 4 KiB or 1 MiB, reads and writes, on an
//! allocated (pre-written) and a fresh image. Prints MB/s for both and the ratio, each the
//! median of `RUNS` runs (every run on a newly made image). Both sides: one request at a
//! time (qemu-img `-d 1`), cache mode writeback (`-t writeback`; the plugin uses the page
//! cache), writes flushed once at the end and the flush timed; image open not timed (see
//! [`qemu`] for how qemu-img's time is taken).
//!
//! `cargo run --release -p xen-disk-plugin-qcow2 --example bench [dir]` (default /tmp).

use qcow2::Qcow2Plugin;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Config, Disk, ForeignDisk};

const IMAGE: u64 = 256 << 20;
const RUNS: usize = 3;
/// qemu-img's queue depth: 1, like the plugin's loop (one request at a time).
const QEMU_DEPTH: u32 = 1;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn make(path: &Path, allocated: bool) {
    let _ = std::fs::remove_file(path);
    let p = path.to_str().unwrap();
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", p, &IMAGE.to_string()])
        .status()
        .unwrap()
        .success());
    if allocated {
        assert!(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P 0x5a 0 {IMAGE}"), p])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success());
    }
}

fn plugin(path: &Path, bs: usize, count: u64, write: bool) -> f64 {
    let cfg = Config::from_pairs(&[format!("path={}", path.display())]).unwrap();
    let disk =
        ForeignDisk::open(xen_disk_plugin_api::__root_module::<Qcow2Plugin>(), &cfg).unwrap();
    // Page-aligned, as the host's guest pages and qemu-img's buffers are.
    let mut backing = vec![0x33u8; bs + 4096];
    let skip = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skip..skip + bs];
    let t = Instant::now();
    for i in 0..count {
        let off = (i * bs as u64) % IMAGE;
        if write {
            with_write_bufs(&[&*buf], |b| disk.write(off, b)).unwrap();
        } else {
            with_read_bufs(&mut [&mut *buf], |b| disk.read(off, b)).unwrap();
        }
    }
    if write {
        disk.flush().unwrap();
    }
    (bs as u64 * count) as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn qemu_run(path: &Path, bs: usize, count: u64, write: bool) -> (f64, f64) {
    let mut args = vec![
        "bench".to_string(),
        "-f".into(),
        "qcow2".into(),
        "-t".into(),
        "writeback".into(),
        "-d".into(),
        QEMU_DEPTH.to_string(),
    ];
    args.extend(["-c".into(), count.to_string(), "-s".into(), bs.to_string()]);
    if write {
        args.extend(["-w".into(), "--flush-interval".into(), count.to_string()]);
    }
    args.push(path.display().to_string());
    let t = Instant::now();
    let out = Command::new("qemu-img").args(&args).output().unwrap();
    let wall = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let reported: f64 = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no timing in qemu-img output: {text}"));
    (wall, reported)
}

/// qemu-img's time for the requests (and, for writes, the final flush). Reads: its own "Run
/// completed in" figure. Writes: that figure leaves out the flush of the written data (done
/// at close), so the time is the process's
/// wall time minus that of a one-request run on an identical image (start-up, open,
/// close), and never less than the reported figure.
fn qemu(path: &Path, bs: usize, count: u64, write: bool, allocated: bool) -> f64 {
    let (wall, reported) = qemu_run(path, bs, count, write);
    if !write {
        // Nothing is left out of a read run's own timing.
        return (bs as u64 * count) as f64 / reported.max(1e-6) / 1e6;
    }
    make(path, allocated);
    let (base, _) = qemu_run(path, bs, 1, write);
    let secs = (wall - base).max(reported).max(1e-6);
    (bs as u64 * count) as f64 / secs / 1e6
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "/tmp".into());
    let path = Path::new(&dir).join(format!("qcow2-bench-{}.qcow2", std::process::id()));
    println!(
        "{:<28} {:>12} {:>12} {:>7}   runs (plugin | qemu)",
        "case", "plugin MB/s", "qemu MB/s", "ratio"
    );
    for bs in [4096usize, 1 << 20] {
        for write in [false, true] {
            // 4K: 64 MiB. 1M writes: one pass over the image (fresh stays fresh); 1M reads:
            // eight passes, so a run lasts tens of ms against qemu-img's 1 ms resolution.
            let count = match (bs, write) {
                (4096, _) => 16384,
                (_, true) => 256,
                (_, false) => 2048,
            };
            for allocated in [true, false] {
                let (mut ps, mut qs) = (Vec::new(), Vec::new());
                for _ in 0..RUNS {
                    make(&path, allocated);
                    ps.push(plugin(&path, bs, count, write));
                    make(&path, allocated);
                    qs.push(qemu(&path, bs, count, write, allocated));
                }
                let runs = |v: &[f64]| {
                    v.iter()
                        .map(|x| format!("{x:.0}"))
                        .collect::<Vec<_>>()
                        .join("/")
                };
                let spread = format!("{} | {}", runs(&ps), runs(&qs));
                let (p, q) = (median(ps), median(qs));
                let name = format!(
                    "{} {} {}",
                    if bs == 4096 { "4K" } else { "1M" },
                    if write { "write" } else { "read" },
                    if allocated { "allocated" } else { "fresh" }
                );
                println!("{name:<28} {p:>12.1} {q:>12.1} {:>7.2}   {spread}", p / q);
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}
