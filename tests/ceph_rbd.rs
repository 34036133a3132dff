//! The `ceph-rbd` plugin against a real one-node Ceph cluster (the lab script
//! `ceph-one-node.sh`: one mon, mgr and memstore OSD on loopback). The monitor's port is
//! fixed, so this binary starts one cluster and runs every scenario in one test, in order;
//! the OSD is killed last. The cluster is stopped however the test ends.
//!
//! The script is the repository's `tests/ceph-lab/ceph-one-node.sh`; `CEPH_LAB` (the script
//! or its folder) names another. A missing script or missing Ceph packages fail the test
//! with a message saying so.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xen_disk_host::plugin::{load, GuardedDisk};
use xen_disk_host::simulation::SimulatedDisk;
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Config};

const SCRIPT: &str = "ceph-one-node.sh";

fn lab_script() -> PathBuf {
    if let Some(v) = std::env::var_os("CEPH_LAB") {
        let p = PathBuf::from(v);
        let p = if p.is_dir() { p.join(SCRIPT) } else { p };
        if p.is_file() {
            return p;
        }
        panic!("CEPH_LAB={} names no {SCRIPT}", p.display());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/ceph-lab")
        .join(SCRIPT);
    assert!(
        p.is_file(),
        "the Ceph lab script {} is missing; set CEPH_LAB to a {SCRIPT}",
        p.display()
    );
    p
}

/// A running one-node cluster, stopped on drop (also when an assertion fails).
struct Cluster {
    script: PathBuf,
    dir: TempDir,
    conf: PathBuf,
}

impl Cluster {
    fn start() -> Cluster {
        let script = lab_script();
        for tool in ["ceph-mon", "ceph-osd", "ceph-mgr", "rbd"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "{tool} is not installed (apt-get install ceph-mon ceph-osd ceph-mgr ceph-common librbd-dev)"
            );
        }
        let dir = TempDir::new("ceph");
        let cluster = Cluster {
            conf: dir.join("c/ceph.conf"),
            script,
            dir,
        };
        let o = Command::new("bash")
            .arg(&cluster.script)
            .arg("start")
            .arg(cluster.dir.join("c"))
            .output()
            .expect("run the ceph lab script");
        assert!(
            o.status.success(),
            "the one-node cluster did not start: {}{}",
            stdout(&o),
            stderr(&o)
        );
        cluster
    }

    fn conf_key(&self) -> String {
        format!("conf={}", self.conf.display())
    }

    /// Runs `rbd -c CONF ARGS` and insists it succeeds.
    fn rbd(&self, args: &[&str]) -> Output {
        let o = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("run rbd");
        assert!(o.status.success(), "rbd {args:?}: {}", stderr(&o));
        o
    }

    /// Sends `signal` to osd.0 (SIGSTOP pauses it, SIGCONT resumes it, SIGKILL ends it).
    fn signal_osd(&self, signal: i32) {
        let pid = std::fs::read_to_string(self.dir.join("c/osd.0.pid")).expect("osd pid file");
        let pid: i32 = pid.trim().parse().expect("osd pid");
        // SAFETY: sending a signal to the OSD process this test's cluster started.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "signal {signal} to osd.0"
        );
        // kill() only queues a stop: a thread of the OSD already running on the other CPU can
        // still answer a request before it stops, and the test would read from a "paused"
        // OSD. Wait until every thread says it is stopped.
        if signal == libc::SIGSTOP {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !all_threads_stopped(pid) {
                assert!(Instant::now() < deadline, "osd.0 did not stop within 10 s");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Whether every thread of `pid` is stopped (state T or t).
fn all_threads_stopped(pid: i32) -> bool {
    let threads = threads(pid as u32);
    !threads.is_empty()
        && threads
            .iter()
            .all(|t| matches!(t.state(), Some('T') | Some('t')))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(self.dir.join("c"))
            .output();
    }
}

fn open(pairs: &[String]) -> GuardedDisk {
    let p = load(&plugin_path("ceph-rbd")).unwrap();
    let disk = p.open(&Config::from_pairs(pairs).unwrap()).unwrap();
    GuardedDisk::new(Box::new(disk), false).unwrap()
}

fn one_line_error(args: &[&str], needles: &[&str]) {
    let started = Instant::now();
    let o = host(args);
    assert_bad_input(&o, needles);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{args:?} took {:?}",
        started.elapsed()
    );
}

#[test]
fn ceph_rbd_against_a_one_node_cluster() {
    build_all();
    let c = Cluster::start();
    let conf = c.conf_key();
    let t = TempDir::new("rbdfiles");

    // Mistakes and an unreachable cluster: one line each, and no hang.
    let read_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["sim", "read", "ceph-rbd", "--out", "/dev/null"]
            .map(String::from)
            .to_vec();
        for e in extra {
            v.push("-c".into());
            v.push(e.to_string());
        }
        v
    };
    let run = |extra: &[&str], needles: &[&str]| {
        let args = read_args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        one_line_error(&args, needles);
    };
    c.rbd(&["create", "--size", "32M", "rbd/small"]);
    run(&["image=nope", &conf], &["image `nope` does not exist"]);
    run(
        &["image=small", "pool=nopool", &conf],
        &["pool `nopool` does not exist"],
    );
    run(
        &["image=small", "snapshot=s9", &conf],
        &["snapshot `s9` does not exist"],
    );
    run(
        &["image=small", "non-blocking-aio=maybe", &conf],
        &["non-blocking-aio", "true or false"],
    );
    run(
        &[
            "image=small",
            &format!("conf={}", t.join("none.conf").display()),
        ],
        &["none.conf", "no such file"],
    );
    let elsewhere = t.join("elsewhere.conf");
    let text = std::fs::read_to_string(&c.conf).unwrap();
    std::fs::write(&elsewhere, text.replace("40789", "40798")).unwrap();
    run(
        &[
            "image=small",
            &format!("conf={}", elsewhere.display()),
            "timeout=3",
        ],
        &["cannot connect to the cluster", "40798", "timeout=3 s"],
    );

    // An imported image reads back byte for byte through the full path.
    let (a, b, out) = (t.join("a.bin"), t.join("b.bin"), t.join("out.bin"));
    random_file(&a, 48 << 20, 11);
    random_file(&b, 48 << 20, 12);
    c.rbd(&["import", a.to_str().unwrap(), "rbd/disk"]);
    c.rbd(&["snap", "create", "rbd/disk@before"]);
    let sim = |verb: &str, file: &Path, extra: &[&str]| -> Output {
        let flag = if verb == "read" { "--out" } else { "--in" };
        let mut args = vec!["sim", verb, "ceph-rbd", "-c", "image=disk", "-c", &conf];
        for e in extra {
            // Host flags as they are, plugin keys after -c.
            if e.starts_with("--") {
                args.push(e);
            } else {
                args.extend(["-c", e]);
            }
        }
        args.extend([flag, file.to_str().unwrap()]);
        host(&args)
    };
    let o = sim("read", &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap(),
        "sim read of an imported image differs from the file imported"
    );

    // What sim write writes, rbd export gives back; the snapshot keeps the old bytes and
    // refuses writes. This one hands librbd's completions to the ring thread to answer
    // (--answer-on-completion=false); the others answer on librbd's threads (the default).
    let o = sim("write", &b, &["--answer-on-completion=false"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let exported = t.join("exported.bin");
    c.rbd(&["export", "rbd/disk", exported.to_str().unwrap()]);
    assert!(
        std::fs::read(&exported).unwrap() == std::fs::read(&b).unwrap(),
        "rbd export differs from what sim write wrote"
    );
    // This one through librbd's own dispatch thread; everything else starts requests on the
    // ring thread (the default).
    let o = sim("read", &out, &["snapshot=before", "non-blocking-aio=true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap(),
        "the snapshot changed"
    );
    let o = sim("write", &b, &["snapshot=before"]);
    assert!(!o.status.success(), "a write to a snapshot succeeded");

    // The benchmark's reference: rbd bench on the same image in the same run, its figure and
    // the ratio printed beside the plugin's.
    let o = host(&[
        "bench",
        "ceph-rbd",
        "-c",
        "image=disk",
        "-c",
        &conf,
        "--rw",
        "read",
        "--bs",
        "1M",
        "--iodepth",
        "4",
        "--seconds",
        "0.3",
        "--rbd-bench",
    ]);
    let text = stdout(&o);
    assert!(o.status.success(), "bench failed:\n{text}{}", stderr(&o));
    let figure = |label: &str| -> f64 {
        let line = text.lines().find(|l| l.trim_start().starts_with(label));
        let line = line.unwrap_or_else(|| panic!("no {label} line:\n{text}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!(
        figure("plugin:") > 0.0 && figure("rbd:") > 0.0 && figure("rbd-fair:") > 0.0,
        "{text}"
    );
    assert!(text.contains("of rbd bench"), "{text}");
    assert!(text.contains("of rbd-fair"), "{text}");

    // The fair reference really writes: every request it counts moved the whole block, on
    // an image of its own (the scenarios below need `disk` as it is). The 1 MiB one runs
    // before the plugin (`--fair-first`): the plugin's disk, closed meanwhile, opens again
    // after the reference's handle has taken and released the image's exclusive lock.
    c.rbd(&["create", "--size", "16M", "rbd/benchw"]);
    // The third run is the plugin alone (`--submit`: its submissions from one thread, no
    // ring and no guest) beside the same reference.
    for (rw, bs, flag) in [
        ("randwrite", 4096u64, None),
        ("write", 1 << 20, Some("--fair-first")),
        ("randwrite", 4096, Some("--submit")),
    ] {
        let bs_text = bs.to_string();
        let mut args = vec![
            "bench",
            "ceph-rbd",
            "-c",
            "image=benchw",
            "-c",
            &conf,
            "--rw",
            rw,
            "--bs",
            &bs_text,
            "--iodepth",
            "4",
            "--seconds",
            "0.3",
            "--rbd-bench",
            "--json",
        ];
        args.extend(flag);
        let o = host(&args);
        let out = stdout(&o);
        assert!(
            o.status.success(),
            "bench {rw} {flag:?} failed:\n{out}{}",
            stderr(&o)
        );
        let (fair_first, submit) = (flag == Some("--fair-first"), flag == Some("--submit"));
        assert_eq!(out.contains("\"fair_first\":true"), fair_first, "{out}");
        assert_eq!(out.contains("\"mode\":\"submit\""), submit, "{out}");
        let field = |k: &str| json_number(&out, k);
        let ops = field("rbd_fair_ops");
        assert!(ops >= 1.0, "{out}");
        assert_eq!(field("rbd_fair_bytes"), ops * bs as f64, "{out}");
        assert_eq!(field("rbd_fair_failed"), 0.0, "{out}");
        assert!(field("ops") >= 1.0 && field("failed") == 0.0, "{out}");
        // librbd's threads count in each process's CPU time, not in its client side's.
        assert!(
            field("rbd_fair_cpu_us_per_op") > field("rbd_fair_client_cpu_us_per_op"),
            "{out}"
        );
        assert!(
            field("cpu_us_per_op") > field("client_cpu_us_per_op"),
            "{out}"
        );
        // Only a ring run has a simulated guest.
        if submit {
            assert!(!out.contains("guest_cpu_us_per_op"), "{out}");
        } else {
            assert!(field("guest_cpu_us_per_op") > 0.0, "{out}");
        }
        assert!(
            field("iops") > 0.0 && field("rbd_bench_iops") > 0.0,
            "{out}"
        );
    }

    // The conformance suite.
    c.rbd(&["create", "--size", "64M", "rbd/check"]);
    let o = host(&[
        "check",
        "--destructive",
        "ceph-rbd",
        "-c",
        "pool=rbd",
        "-c",
        "image=check",
        "-c",
        &conf,
    ]);
    let text = stdout(&o);
    assert!(o.status.success(), "check failed:\n{text}{}", stderr(&o));
    assert!(text.contains(" 0 failed"), "{text}");
    assert!(
        text.contains("discard") && text.contains("write-zeroes  ") && text.contains("(native)"),
        "{text}"
    );

    // `rbd resize` reaches the guest: the backend publishes the new size.
    {
        let disk = Arc::new(open(&["image=check".into(), conf.clone()]));
        let mut guest = SimulatedDisk::start(disk.clone()).unwrap();
        assert_eq!(guest.size(), 64 << 20);
        c.rbd(&["resize", "--size", "96M", "rbd/check"]);
        let started = Instant::now();
        while guest.backend_sectors() != Some((96 << 20) / 512) {
            // Looked for every second; never published, it fails all the same.
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the resize was not published: {:?}",
                guest.backend_sectors()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        guest.refresh_size();
        assert_eq!(guest.size(), 96 << 20);
        // The grown end reads as zeroes (rbd grows an image with unwritten space), and the
        // guest can write there and read it back.
        let end = (96 << 20) - 8192;
        let mut back = vec![0xa5u8; 8192];
        guest.read(end, &mut back).unwrap();
        assert!(
            back.iter().all(|&b| b == 0),
            "the grown end does not read as zeroes"
        );
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
        guest.write(end, &data).unwrap();
        guest.flush().unwrap();
        back.fill(0);
        guest.read(end, &mut back).unwrap();
        assert!(back == data, "a write at the grown end does not read back");
        guest.shutdown().unwrap();
    }

    // A paused OSD (SIGSTOP): with io-timeout=0 a read stalls and completes when the OSD
    // resumes; with io-timeout=3 it fails, and the same disk reads again once the OSD is back.
    {
        let want = std::fs::read(&b).unwrap();
        let ro = |timeout: &str| {
            Arc::new(open(&[
                "image=disk".into(),
                conf.clone(),
                "readonly=true".into(),
                format!("io-timeout={timeout}"),
            ]))
        };
        let (patient, quick) = (ro("0"), ro("3"));
        let read = |d: &GuardedDisk, at: usize| {
            let mut buf = vec![0u8; 64 << 10];
            with_read_bufs(&mut [&mut buf], |bb| d.read(at as u64, bb)).map(|_| buf)
        };
        c.signal_osd(libc::SIGSTOP);
        let (tx, rx) = mpsc::channel();
        let d = patient.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let r = with_read_bufs(&mut [&mut buf], |bb| d.read(1 << 20, bb));
            let _ = tx.send(r.map(|_| buf).map_err(|e| e.to_string()));
        });
        let paused = Instant::now();
        let e = read(&quick, 2 << 20).expect_err("a read from a paused OSD succeeded");
        let waited = paused.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(20),
            "io-timeout=3 gave up after {waited:?}: {e}"
        );
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(
            rx.try_recv().is_err(),
            "io-timeout=0 should wait for the OSD, not answer"
        );
        c.signal_osd(libc::SIGCONT);
        let got = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the stalled read did not resume with the OSD")
            .expect("the stalled read failed");
        assert!(
            got == want[1 << 20..][..64 << 10],
            "resumed read: wrong bytes"
        );
        let again = read(&quick, 2 << 20).expect("no I/O after the OSD came back");
        assert!(
            again == want[2 << 20..][..64 << 10],
            "read after recovery: wrong bytes"
        );
    }

    // Killing the OSD during I/O: the guest gets BLKIF_RSP_ERROR once io-timeout passes, and
    // nothing hangs or crashes. (Last: memstore loses everything with the OSD.)
    let io_timeout = 5u64;
    let disk = Arc::new(open(&[
        "image=disk".into(),
        conf.clone(),
        format!("io-timeout={io_timeout}"),
    ]));
    let mut guest = SimulatedDisk::start(disk.clone()).unwrap();
    let (tx, rx) = mpsc::channel::<(String, String)>();
    let size = guest.size();
    let tx1 = tx.clone();
    let guest_thread = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4 << 20];
        let mut at = 0u64;
        loop {
            if let Err(e) = guest.read(at, &mut buf) {
                let _ = tx1.send(("guest read".into(), e));
                return guest;
            }
            at = (at + buf.len() as u64) % size;
        }
    });
    for i in 0..2u64 {
        let (tx, disk) = (tx.clone(), disk.clone());
        std::thread::spawn(move || {
            let data = vec![i as u8 + 1; 64 << 10];
            let mut back = vec![0u8; 64 << 10];
            let mut n = 0u64;
            loop {
                let at = ((n * 2 + i) * (64 << 10)) % size;
                n += 1;
                let r = with_write_bufs(&[&data], |b| disk.write(at, b, false))
                    .and_then(|_| disk.flush())
                    .and_then(|_| with_read_bufs(&mut [&mut back], |b| disk.read(at, b)));
                if let Err(e) = r {
                    let _ = tx.send((format!("worker {i}"), e.to_string()));
                    return;
                }
            }
        });
    }
    drop(tx);
    std::thread::sleep(Duration::from_secs(1));
    c.signal_osd(libc::SIGKILL);
    let killed = Instant::now();
    let deadline = Duration::from_secs(io_timeout * 3 + 20);
    for _ in 0..3 {
        let (who, e) = rx
            .recv_timeout(deadline.saturating_sub(killed.elapsed()))
            .unwrap_or_else(|_| panic!("I/O still hangs {deadline:?} after the OSD was killed"));
        eprintln!("{who}: error after {:?}: {e}", killed.elapsed());
        if who == "guest read" {
            assert!(e.contains("answered BLKIF_RSP_ERROR (-1"), "guest: {e}");
        } else {
            assert!(e.contains("timed out"), "{who}: {e}");
        }
    }
    let guest = guest_thread.join().unwrap();
    // The device and the image close without the OSD, within a bound too.
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = guest.shutdown();
        drop(disk);
        let _ = done_tx.send(r);
    });
    done_rx
        .recv_timeout(Duration::from_secs(io_timeout * 2 + 20))
        .expect("closing the disk hangs without the OSD")
        .unwrap();
}
