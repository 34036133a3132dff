//! `scripts/pairs.sh`, which gathers the README's same-run pairs: three runs of the ring
//! bench on the discard plugin beside nbdkit's null plugin, and interleaved pairs of the
//! `nbd-client` plugin against the fair libnbd reference and fio on every pattern, over
//! `nbdkit memory` (needs nbdkit and fio).

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn pairs(args: &[&str]) -> std::process::Output {
    pairs_with_order("alternate", args)
}

/// `scripts/pairs.sh ARGS` with `PAIRS_ORDER=order`.
fn pairs_with_order(order: &str, args: &[&str]) -> std::process::Output {
    build_all();
    Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pairs.sh"))
        .args(args)
        .env("XEN_DISK_HOST", target_dir().join("xen-disk-host"))
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .env("PAIRS_ORDER", order)
        .output()
        .expect("bash")
}

#[test]
fn pairs_prints_every_pair_and_the_median_ratio() {
    let o = pairs(&[
        "3",
        "discard",
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--seconds",
        "0.2",
        "--nbdkit",
    ]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    let mut ratios = Vec::new();
    for (i, l) in lines[..3].iter().enumerate() {
        // pair N: plugin P iops, nbdkit R iops, ratio P/R
        let w: Vec<&str> = l.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        assert_eq!(w[..2], ["pair", &format!("{}:", i + 1)], "{l}");
        let (p, r, ratio): (f64, f64, f64) = (
            w[3].parse().unwrap(),
            w[6].parse().unwrap(),
            w[9].parse().unwrap(),
        );
        assert!(p > 0.0 && r > 0.0, "{l}");
        assert!((ratio - p / r).abs() < 0.001, "{l}");
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    let want = format!("median ratio {:.3} of nbdkit over 3 pairs", ratios[1]);
    assert!(lines[3].starts_with(&want), "want {want:?}:\n{out}");
}

#[test]
fn pairs_refuses_a_bad_count_and_stops_at_a_failed_bench() {
    let o = pairs(&["x", "discard"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("usage"), "{}", stderr(&o));
    let o = pairs(&["2", "discard", "--bs", "1000"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--bs"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    let o = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pairs.sh"))
        .args(["2", "discard"])
        // The setting is checked before the binary: no build is needed to hear about it.
        .env("XEN_DISK_HOST", "/nonexistent/xen-disk-host")
        .env("PAIRS_ORDER", "sometimes")
        .output()
        .expect("bash");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("PAIRS_ORDER"), "{}", stderr(&o));
    // The order flag needs a fair reference to order against.
    let o = host(&["bench", "discard", "--seconds", "0.1", "--fair-first"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("--fair-first") && err.lines().count() == 1,
        "{err}"
    );
    // Refused before anything runs, fair reference included.
    let o = host(&[
        "bench",
        "discard",
        "--against",
        "discard",
        "--fio-nbd",
        "--fair-first",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("--against") && err.lines().count() == 1,
        "{err}"
    );
}

/// `nbdkit memory SIZE` on a socket in `dir`, killed when dropped.
struct Nbdkit(std::process::Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdkit_memory(dir: &TempDir, size: &str) -> (Nbdkit, String) {
    let socket = dir.join("nbd.sock");
    let child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "-U"])
        .arg(&socket)
        .args(["memory", size])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("nbdkit is not installed (apt-get install nbdkit; .ci/run installs it)");
    let server = Nbdkit(child);
    let started = std::time::Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "nbdkit made no socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (
        server,
        format!("uri=nbd+unix:///?socket={}", socket.display()),
    )
}

/// The words of a line, split at spaces, commas and semicolons.
fn words(l: &str) -> Vec<&str> {
    l.split([' ', ',', ';']).filter(|w| !w.is_empty()).collect()
}

#[test]
fn pairs_against_the_fair_nbd_reference_on_every_pattern() {
    let t = TempDir::new("pairs-nbd");
    let (_server, cfg) = nbdkit_memory(&t, "64M");
    for (rw, bs) in [
        ("randread", "4k"),
        ("randwrite", "4k"),
        ("read", "1M"),
        ("write", "1M"),
    ] {
        // The order within a pair alternates (the second runs the reference first), except
        // with PAIRS_ORDER=fixed, tried on one pattern.
        let fixed = rw == "randwrite";
        let o = pairs_with_order(
            if fixed { "fixed" } else { "alternate" },
            &[
                "2",
                "nbd-client",
                "-c",
                &cfg,
                "--rw",
                rw,
                "--bs",
                bs,
                "--iodepth",
                "8",
                "--seconds",
                "0.3",
                "--poll-us",
                "0",
                "--fio-nbd",
            ],
        );
        let out = stdout(&o);
        assert!(o.status.success(), "{rw}: {out}{}", stderr(&o));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), if fixed { 5 } else { 6 }, "{rw}: {out}");
        let (mut fair, mut fio, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
        for (i, l) in lines[..2].iter().enumerate() {
            // pair N: plugin P iops, nbd-fair R iops, ratio X; fio-nbd F iops, ratio Y;
            // cpu A / B us per request [; fair first]
            let w = words(l);
            assert_eq!(w[..2], ["pair", &format!("{}:", i + 1)], "{l}");
            let fair_first = i == 1 && !fixed;
            assert_eq!(w.len(), if fair_first { 24 } else { 22 }, "{l}");
            if fair_first {
                assert_eq!(w[22..], ["fair", "first"], "{l}");
            }
            assert_eq!((w[5], w[10], w[15]), ("nbd-fair", "fio-nbd", "cpu"), "{l}");
            assert_eq!(w[17], "/", "{l}");
            let n = |at: usize| -> f64 { w[at].parse().unwrap_or_else(|_| panic!("{l}")) };
            let (p, r, x, f, y) = (n(3), n(6), n(9), n(11), n(14));
            assert!(p > 0.0 && r > 0.0 && f > 0.0, "{l}");
            assert!(
                (x - p / r).abs() < 0.001 && (y - p / f).abs() < 0.001,
                "{l}"
            );
            assert!(n(16) > 0.0 && n(18) > 0.0, "{l}");
            fair.push(x);
            fio.push(y);
            cpu.push((n(16), n(18)));
        }
        for (line, name, r) in [(lines[2], "nbd-fair", &fair), (lines[3], "fio-nbd", &fio)] {
            let want = format!(
                "median ratio {:.3} of {name} over 2 pairs",
                (r[0] + r[1]) / 2.0
            );
            assert!(line.starts_with(&want), "want {want:?}:\n{out}");
        }
        if !fixed {
            let want = format!(
                "by order: plugin first median {:.3} over 1 pairs, nbd-fair first median {:.3} over 1 pairs",
                fair[0], fair[1]
            );
            assert_eq!(lines[4], want, "{out}");
        }
        // The CPU medians of both sides; a ring run names its simulated guest.
        let want = format!(
            "median cpu per request: plugin {:.1} us (client side ",
            (cpu[0].0 + cpu[1].0) / 2.0
        );
        let last = lines[lines.len() - 1];
        assert!(last.starts_with(&want), "want {want:?}:\n{out}");
        let want = format!(
            "nbd-fair {:.1} us (submitting thread ",
            (cpu[0].1 + cpu[1].1) / 2.0
        );
        assert!(
            last.contains(&want) && last.contains(", guest "),
            "{want:?}:\n{out}"
        );
    }
    // Every request the reference counts moved its whole block.
    let o = host(&[
        "bench",
        "nbd-client",
        "-c",
        &cfg,
        "--rw",
        "write",
        "--bs",
        "1M",
        "--iodepth",
        "4",
        "--seconds",
        "0.3",
        "--fio-nbd",
        "--json",
    ]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    let ops = json_number(&out, "nbd_fair_ops");
    assert!(ops >= 1.0, "{out}");
    assert_eq!(json_number(&out, "nbd_fair_bytes"), ops * (1 << 20) as f64);
    assert_eq!(json_number(&out, "nbd_fair_failed"), 0.0, "{out}");
}

/// The CPUs a thread of process `pid` may run on (`Cpus_allowed_list`), by thread name.
fn allowed_cpus(pid: u32) -> Vec<(String, String)> {
    threads(pid)
        .into_iter()
        .filter_map(|t| {
            Some((
                t.comm.clone(),
                t.status_field("Cpus_allowed_list")?.to_string(),
            ))
        })
        .collect()
}

/// `--client-cpu N` keeps the simulated guest and the ring thread on CPU N, leaves the
/// plugin's own threads (nbd-client's readers) where the scheduler puts them, says so in
/// the JSON, and refuses a CPU the process may not use in one line.
#[test]
fn client_cpu_keeps_guest_and_ring_on_one_cpu_and_the_plugins_threads_free() {
    let t = TempDir::new("pairs-cpu");
    let (_server, cfg) = nbdkit_memory(&t, "64M");
    build_all();
    let child = Command::new(target_dir().join("xen-disk-host"))
        .args(["bench", "nbd-client", "-c", &cfg, "--rw", "randwrite"])
        .args(["--seconds", "2", "--poll-us", "0", "--client-cpu", "0"])
        .args(["--fio-nbd", "--json"])
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    // A thread carries its name from its first instruction but pins itself a moment later,
    // so the snapshot kept is the last one with all three threads, and the wait ends early
    // only once the pinned ones show their CPU.
    let mut seen = Vec::new();
    while start.elapsed() < std::time::Duration::from_secs(20) {
        let now = allowed_cpus(child.id());
        let on = |n: &str| now.iter().find(|(c, _)| c == n).map(|(_, l)| l.as_str());
        if on("guest-0").is_some() && on("ring-0").is_some() && on("nbd-reader-0").is_some() {
            let pinned = on("guest-0") == Some("0") && on("ring-0") == Some("0");
            seen = now;
            if pinned {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let o = child.wait_with_output().unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    let cpus = |n: &str| {
        seen.iter()
            .find(|(c, _)| c == n)
            .map(|(_, l)| l.clone())
            .unwrap_or_else(|| panic!("no thread {n} seen: {seen:?}"))
    };
    assert_eq!(cpus("guest-0"), "0", "{seen:?}");
    assert_eq!(cpus("ring-0"), "0", "{seen:?}");
    // SAFETY: no preconditions.
    if unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } > 1 {
        assert_ne!(
            cpus("nbd-reader-0"),
            "0",
            "a plugin thread was pinned: {seen:?}"
        );
    }
    assert_eq!(json_number(&out, "client_cpu"), 0.0, "{out}");
    assert!(json_number(&out, "nbd_fair_iops") > 0.0, "{out}");

    let o = host(&["bench", "nbd-client", "-c", &cfg, "--client-cpu", "100000"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--client-cpu 100000"), "{err}");
}
