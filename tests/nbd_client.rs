//! The `nbd-client` plugin against real NBD servers on Unix sockets in temporary
//! directories: `qemu-nbd` serving a qcow2 and `nbdkit memory`. Bytes go both ways through
//! the full simulated path (`sim write` / `sim read`) and are compared with what QEMU's own
//! tools see; the conformance suite passes; requests really overlap on one connection; and a
//! server that is missing, dies or hangs gives errors, never a hang. Both ways of exchanging
//! commands are covered: on the socket directly (the default) and through libnbd
//! (`libnbd-commands=true`); a fake server breaks the protocol on purpose.
//!
//! The servers are required: a missing tool fails the test with the package to install.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xen_disk_host::plugin::{load, GuardedDisk};
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Config};

/// Fails the test, naming the package, when `tool` is not on PATH.
fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: the nbd-client tests need it (apt-get install {package}; .ci/run installs it)"
    );
}

/// An NBD server on a Unix socket, killed when dropped.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(mut cmd: Command, socket: &Path) -> Server {
        // A server killed before leaves its socket file behind: waiting for the file would
        // then not wait for the new server.
        let _ = std::fs::remove_file(socket);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        let mut s = Server {
            child,
            socket: socket.to_path_buf(),
        };
        let start = Instant::now();
        while !socket.exists() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("{cmd:?} exited before creating its socket: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{cmd:?} did not create {} within 60 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// `nbdkit memory SIZE` with extra arguments before the plugin name (filters).
    fn nbdkit(dir: &TempDir, size: &str, filters: &[&str], params: &[&str]) -> Server {
        need("nbdkit", "nbdkit");
        let socket = dir.join("nbdkit.sock");
        let mut cmd = Command::new("nbdkit");
        cmd.args(["--foreground", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args(filters)
            .args(["memory", size])
            .args(params);
        Server::start(cmd, &socket)
    }

    /// `qemu-nbd` serving a qcow2, persistent (several clients one after another).
    fn qemu_nbd(dir: &TempDir, qcow2: &Path) -> Server {
        Server::qemu_nbd_shared(dir, qcow2, 16)
    }

    /// `qemu-nbd` admitting at most `clients` at once.
    fn qemu_nbd_shared(dir: &TempDir, qcow2: &Path, clients: u32) -> Server {
        need("qemu-nbd", "qemu-utils");
        let socket = dir.join("qemu-nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["--format=qcow2", "--persistent"])
            .arg(format!("--shared={clients}"))
            .arg("--socket")
            .arg(&socket)
            .arg(qcow2);
        Server::start(cmd, &socket)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    fn config(&self) -> String {
        format!("uri={}", self.uri())
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A stopped (SIGSTOP) server still dies on SIGKILL.
        self.stop();
    }
}

fn run_ok(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn sim(dir: &str, server: &Server, file: &Path) {
    sim_with(dir, server, &[], file);
}

/// `sim` with more plugin configuration (`key=value` pairs).
fn sim_with(dir: &str, server: &Server, config: &[&str], file: &Path) {
    let flag = if dir == "write" { "--in" } else { "--out" };
    let cfg = server.config();
    let mut args = vec!["sim", dir, "nbd-client", "-c", &cfg];
    for c in config {
        args.extend(["-c", c]);
    }
    args.extend([flag, file.to_str().unwrap()]);
    let o = host(&args);
    assert!(o.status.success(), "sim {dir}: {}", stderr(&o));
}

fn same(a: &Path, b: &Path, what: &str) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{what}: sizes differ");
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{what}: first difference at byte {i}");
    }
}

fn open(pairs: &[String]) -> GuardedDisk {
    let p = load(&plugin_path("nbd-client")).unwrap();
    let disk = p.open(&Config::from_pairs(pairs).unwrap()).unwrap();
    GuardedDisk::new(Box::new(disk), false).unwrap()
}

fn check_passes(server: &Server) -> String {
    check_passes_with(server, &[])
}

fn check_passes_with(server: &Server, config: &[&str]) -> String {
    let cfg = server.config();
    let mut args = vec!["check", "--destructive", "nbd-client", "-c", &cfg];
    for c in config {
        args.extend(["-c", c]);
    }
    let o = host(&args);
    let out = stdout(&o);
    assert!(o.status.success(), "check failed:\n{out}{}", stderr(&o));
    assert!(out.contains(" 0 failed"), "{out}");
    out
}

#[test]
fn qemu_nbd_qcow2_round_trips_both_ways_and_passes_check() {
    need("qemu-img", "qemu-utils");
    let t = TempDir::new("nbd-qemu");
    let (raw_in, qcow2) = (t.join("in.raw"), t.join("disk.qcow2"));
    random_file(&raw_in, 24 << 20, 7);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .args([&raw_in, &qcow2]),
    );
    // Server → guest: the disk read through the plugin is the qcow2's content.
    let mut server = Server::qemu_nbd(&t, &qcow2);
    let got = t.join("read.raw");
    sim("read", &server, &got);
    same(&got, &raw_in, "sim read of the qcow2 served by qemu-nbd");
    // Guest → server: what sim write wrote is what the qcow2 holds afterwards.
    let data = t.join("write.raw");
    random_file(&data, 24 << 20, 8);
    sim("write", &server, &data);
    let back = t.join("back.raw");
    sim("read", &server, &back);
    same(&back, &data, "sim read after sim write (qemu-nbd)");
    let out = check_passes(&server);
    assert!(out.contains("flush"), "{out}");
    server.stop();
    // check wrote its own patterns; write the data again for QEMU's view of the image.
    let mut server = Server::qemu_nbd(&t, &qcow2);
    sim("write", &server, &data);
    server.stop();
    let converted = t.join("converted.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .args([&qcow2, &converted]),
    );
    same(
        &converted,
        &data,
        "qemu-img convert of the qcow2 after sim write",
    );
    run_ok(Command::new("qemu-img").args(["check", "-q"]).arg(&qcow2));
}

/// `qemu-nbd` answers reads of a sparse qcow2's unallocated clusters with holes when
/// structured replies are on; whichever reply form, the guest reads exact bytes, zeroes
/// included, into pages that held other data a moment before.
#[test]
fn sparse_reads_are_exact_with_and_without_structured_replies() {
    need("qemu-img", "qemu-utils");
    let t = TempDir::new("nbd-sparse");
    let (raw, qcow2) = (t.join("sparse.raw"), t.join("sparse.qcow2"));
    // Data and holes alternating every MiB, so large reads cross both.
    random_file(&raw, 16 << 20, 11);
    let mut bytes = std::fs::read(&raw).unwrap();
    for (i, mib) in bytes.chunks_mut(1 << 20).enumerate() {
        if i % 2 == 1 {
            mib.fill(0);
        }
    }
    std::fs::write(&raw, &bytes).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-S", "4k", "-f", "raw", "-O", "qcow2"])
            .args([&raw, &qcow2]),
    );
    let server = Server::qemu_nbd(&t, &qcow2);
    for structured in ["true", "false"] {
        let got = t.join(&format!("read-{structured}.raw"));
        let key = format!("structured-replies={structured}");
        sim_with("read", &server, &[&key], &got);
        same(&got, &raw, &format!("structured-replies={structured}"));
    }
}

#[test]
fn automatic_connections_settle_for_what_the_server_admits() {
    need("qemu-img", "qemu-utils");
    let t = TempDir::new("nbd-shared");
    let qcow2 = t.join("disk.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow2)
            .arg("8M"),
    );
    // Two clients at most: the third automatic connection is never answered. It costs 2 s
    // an open; one that waited the connection timeout instead (120 s here) would take past
    // the bound, which leaves a loaded machine room for check's own work. Four automatic
    // connections whatever the CPUs (a host with 2 or fewer gets one).
    let server = Server::qemu_nbd_shared(&t, &qcow2, 2);
    let start = Instant::now();
    let cfg = server.config();
    let o = host_with_env(
        &[
            "check",
            "--destructive",
            "nbd-client",
            "-c",
            &cfg,
            "-c",
            "timeout=120",
        ],
        &[("XEN_DISK_NBD_AUTO_CONNECTIONS", "4")],
    );
    let out = stdout(&o);
    assert!(o.status.success(), "check failed:\n{out}{}", stderr(&o));
    assert!(out.contains(" 0 failed"), "{out}");
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    // Asked for outright, the connections are required.
    let cfg = server.config();
    let o = host(&[
        "check",
        "nbd-client",
        "-c",
        &cfg,
        "-c",
        "connections=3",
        "-c",
        "timeout=1",
    ]);
    assert_bad_input(&o, &["qemu-nbd.sock"]);
}

#[test]
fn nbdkit_memory_round_trips_both_ways_and_passes_check() {
    need("qemu-img", "qemu-utils");
    let t = TempDir::new("nbd-kit");
    let server = Server::nbdkit(&t, "16M", &[], &[]);
    // Guest → server, read back by QEMU's NBD client.
    let data = t.join("in.raw");
    random_file(&data, 16 << 20, 9);
    sim("write", &server, &data);
    let by_qemu = t.join("qemu.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &server.uri()])
            .arg(&by_qemu),
    );
    same(&by_qemu, &data, "qemu-img's read of what sim write wrote");
    // Server → guest: QEMU writes, the plugin reads.
    let other = t.join("other.raw");
    random_file(&other, 16 << 20, 10);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&other)
            .arg(server.uri()),
    );
    let got = t.join("got.raw");
    sim("read", &server, &got);
    same(&got, &other, "sim read of what qemu-img wrote");
    let out = check_passes(&server);
    for cap in ["discard", "write-zeroes"] {
        assert!(out.contains(&format!("ok    {cap}")), "{cap}: {out}");
    }
}

/// Reads 4 KiB blocks `0..n` and checks that block `i` holds byte `i + seed`.
fn read_blocks(disk: &GuardedDisk, n: u64, seed: u8) {
    for i in 0..n {
        let mut b = vec![0u8; 4096];
        with_read_bufs(&mut [&mut b], |r| disk.read(i * 4096, r)).unwrap();
        assert!(
            b.iter().all(|&x| x == (i as u8).wrapping_add(seed)),
            "block {i}"
        );
    }
}

/// The host may read a connection's replies on its own thread (plugin ABI 1.3, what the
/// ring thread does): one attacher at a time, and the replies it takes complete the
/// requests with their data, its own blocking calls included. While it takes none (a ring held up by a swap, say), the
/// reader thread stands in, so nothing hangs or times out; detached, the disk carries on.
#[test]
fn replies_are_taken_by_the_host_and_by_the_reader_when_the_host_stops() {
    let t = TempDir::new("nbd-take");
    let server = Server::nbdkit(&t, "16M", &[], &[]);
    let disk = Arc::new(open(&[
        server.config(),
        "connections=1".into(),
        "timeout=60".into(),
    ]));
    for i in 0..64u64 {
        let b = vec![(i as u8).wrapping_add(3); 4096];
        with_write_bufs(&[&b], |w| disk.write(i * 4096, w, false)).unwrap();
    }
    let taker = disk
        .attach_completions()
        .expect("nbd-client offers its socket");
    assert!(disk.attach_completions().is_none(), "a second attacher");
    // Taken here: another thread reads while this one watches the socket and takes.
    let reads = {
        let d = disk.clone();
        std::thread::spawn(move || read_blocks(&d, 64, 3))
    };
    while !reads.is_finished() {
        let mut p = libc::pollfd {
            fd: taker.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, 10) };
        taker.take();
    }
    reads.join().unwrap();
    // The attached thread's own blocking reads: it takes their replies while it waits.
    read_blocks(&disk, 64, 3);
    // Attached but never taking: another thread's reads are answered by the reader thread
    // standing in (the timeout is 60 s, so a read that waited for it would fail the test's
    // bound, not end in an error).
    let start = Instant::now();
    let d = disk.clone();
    std::thread::spawn(move || read_blocks(&d, 64, 3))
        .join()
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "reads waited {:?} for a host that stopped taking",
        start.elapsed()
    );
    drop(taker);
    read_blocks(&disk, 64, 3);
    let again = disk.attach_completions();
    assert!(again.is_some(), "detached, the socket is offered again");
}

#[test]
fn requests_from_many_threads_overlap_on_one_connection() {
    let t = TempDir::new("nbd-par");
    // Every read takes a second in the server; nbdkit serves a connection's requests with
    // several threads, so only requests sent together finish together.
    let server = Server::nbdkit(&t, "16M", &["--filter=delay"], &["rdelay=1000ms"]);
    let disk = Arc::new(open(&[server.config(), "connections=1".into()]));
    let start = Instant::now();
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let d = disk.clone();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 4096];
                with_read_bufs(&mut [&mut b], |r| d.read(i * 4096, r)).unwrap();
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    // One after another they take 8 s; together about 1 s. Half the serial time leaves a
    // loaded machine 3 s for starting threads and the round trips.
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "8 reads of 1 s each took {took:?}: they were not in flight together"
    );
}

#[test]
fn scattered_buffers_and_fua_writes_round_trip() {
    let t = TempDir::new("nbd-sg");
    let server = Server::nbdkit(&t, "4M", &[], &[]);
    let disk = open(&[server.config()]);
    let info = disk.info();
    assert!(info.can_flush && info.can_fua && info.can_discard && info.can_write_zeroes);
    // Two buffers that are not adjacent in memory: the bounce path.
    let (mut a, mut b) = (vec![1u8; 4096], vec![2u8; 8192]);
    with_write_bufs(&[&a, &b], |w| disk.write(8192, w, true)).unwrap();
    a.fill(0);
    b.fill(0);
    with_read_bufs(&mut [&mut b[..4096], &mut a[..]], |r| disk.read(8192, r)).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 1));
    assert!(a[..].iter().all(|&x| x == 2));
    // Two large buffers apart in memory: one command each, straight into them.
    let (mut c, mut d) = (vec![3u8; 64 << 10], vec![4u8; 128 << 10]);
    with_write_bufs(&[&c, &d], |w| disk.write(1 << 20, w, false)).unwrap();
    c.fill(0);
    d.fill(0);
    with_read_bufs(&mut [&mut d[..], &mut c[..]], |r| disk.read(1 << 20, r)).unwrap();
    assert!(d[..64 << 10].iter().all(|&x| x == 3));
    assert!(d[64 << 10..].iter().all(|&x| x == 4));
    assert!(c.iter().all(|&x| x == 4));
    disk.flush().unwrap();
    disk.write_zeroes(8192, 4096).unwrap();
    let mut c = vec![9u8; 4096];
    with_read_bufs(&mut [&mut c], |r| disk.read(8192, r)).unwrap();
    assert!(c.iter().all(|&x| x == 0));
}

#[test]
fn a_missing_server_and_bad_keys_are_one_line() {
    let t = TempDir::new("nbd-bad");
    let sock = t.join("nobody.sock");
    let uri = format!("uri=nbd+unix:///?socket={}", sock.display());
    let o = host(&["check", "nbd-client", "-c", &uri]);
    assert_bad_input(&o, &["nobody.sock"]);
    let o = host(&[
        "sim",
        "read",
        "nbd-client",
        "-c",
        &uri,
        "--out",
        "/dev/null",
    ]);
    assert_bad_input(&o, &["nobody.sock"]);
    let o = host(&["check", "nbd-client", "-c", "uri=/tmp/x.sock"]);
    assert_bad_input(&o, &["uri", "not an NBD URI"]);
    let o = host(&[
        "check",
        "nbd-client",
        "-c",
        "uri=nbd+unix:///?socket=/x",
        "-c",
        "connections=17",
    ]);
    assert_bad_input(&o, &["connections"]);
    // A bad automatic number fails at once, naming the variable.
    for bad in ["0", "17", "four"] {
        let o = host_with_env(
            &["check", "nbd-client", "-c", "uri=nbd+unix:///?socket=/x"],
            &[("XEN_DISK_NBD_AUTO_CONNECTIONS", bad)],
        );
        assert_bad_input(&o, &["XEN_DISK_NBD_AUTO_CONNECTIONS", "1 to 16"]);
    }
    // A socket that accepts but never speaks NBD: the handshake times out.
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let start = Instant::now();
    let o = host(&["check", "nbd-client", "-c", &uri, "-c", "timeout=1"]);
    assert_bad_input(&o, &["nobody.sock", "handshake"]);
    assert!(start.elapsed() < Duration::from_secs(20));
    drop(listener);
}

#[test]
fn several_connections_only_with_multi_conn_or_readonly() {
    let t = TempDir::new("nbd-mc");
    let server = Server::nbdkit(
        &t,
        "4M",
        &["--filter=multi-conn"],
        &["multi-conn-mode=disable"],
    );
    let cfg = server.config();
    let o = host(&["check", "nbd-client", "-c", &cfg, "-c", "connections=2"]);
    assert_bad_input(&o, &["connections", "multi-conn"]);
    // Automatic: one connection, and the disk works.
    check_passes(&server);
    let o = host(&[
        "check",
        "nbd-client",
        "-c",
        &cfg,
        "-c",
        "connections=2",
        "-c",
        "readonly=true",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// Runs reads from four threads until each has seen an error; panics if that takes longer
/// than `limit`.
fn reads_fail_within(disk: &Arc<GuardedDisk>, limit: Duration, what: &str) {
    let start = Instant::now();
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let d = disk.clone();
            std::thread::spawn(move || loop {
                let mut b = vec![0u8; 65536];
                let r = with_read_bufs(&mut [&mut b], |r| d.read(i * 65536, r));
                if let Err(e) = r {
                    return e;
                }
            })
        })
        .collect();
    let deadline = start + limit;
    for th in threads {
        while !th.is_finished() {
            assert!(Instant::now() < deadline, "{what}: reads still blocked");
            std::thread::sleep(Duration::from_millis(20));
        }
        let e = th.join().unwrap();
        assert!(e.errno() != 0, "{what}: {e:?}");
    }
}

#[test]
fn a_server_killed_or_hung_during_io_gives_errors_not_a_hang() {
    let t = TempDir::new("nbd-kill");
    for mode in [None, Some("libnbd-commands=true")] {
        let config = |server: &Server, more: &[&str]| {
            let mut c = vec![server.config()];
            c.extend(mode.map(String::from));
            c.extend(more.iter().map(|s| s.to_string()));
            c
        };
        // Killed: every caller gets an error, and later calls fail at once.
        let _ = std::fs::remove_file(t.join("nbdkit.sock"));
        let mut server = Server::nbdkit(&t, "16M", &[], &[]);
        let disk = Arc::new(open(&config(&server, &[])));
        let pid = server.pid();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: pid is our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        // Broken, the reads hang for good: any bound tells, so a generous one.
        reads_fail_within(&disk, Duration::from_secs(30), "killed server");
        killer.join().unwrap();
        server.stop();
        let mut b = vec![0u8; 4096];
        let e = with_read_bufs(&mut [&mut b], |r| disk.read(0, r)).unwrap_err();
        assert!(
            e.message().contains("nbdkit.sock"),
            "{mode:?}: {}",
            e.message()
        );
        drop(disk);

        // Hung (stopped, socket open): the timeout cuts the connection.
        let _ = std::fs::remove_file(t.join("nbdkit.sock"));
        let server = Server::nbdkit(&t, "16M", &[], &[]);
        let disk = Arc::new(open(&config(&server, &["timeout=1"])));
        let pid = server.pid();
        // SAFETY: pid is our own child, alive.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        reads_fail_within(&disk, Duration::from_secs(30), "stopped server");
        let e = with_read_bufs(&mut [&mut b], |r| disk.read(0, r)).unwrap_err();
        assert!(
            e.message().contains("no reply"),
            "{mode:?}: {}",
            e.message()
        );
        drop(disk);
        drop(server);
    }

    // The host binary too: a server killed under `sim read` makes it fail, not hang.
    let _ = std::fs::remove_file(t.join("nbdkit.sock"));
    let server = Server::nbdkit(&t, "2G", &[], &[]);
    let cfg = server.config();
    let mut child = Command::new(target_dir().join("xen-disk-host"))
        .args(["sim", "read", "nbd-client", "-c", &cfg, "--out"])
        .arg(t.join("out.raw"))
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(server);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("sim read hangs after its NBD server was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = child.wait_with_output().unwrap();
    assert!(!status.success(), "sim read succeeded without its server");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bench_measures_fio_nbd_on_the_same_server() {
    need("fio", "fio");
    let t = TempDir::new("nbd-bench");
    let server = Server::nbdkit(&t, "64M", &[], &[]);
    let cfg = server.config();
    let o = host(&[
        "bench",
        "nbd-client",
        "-c",
        &cfg,
        "--rw",
        "randread",
        "--seconds",
        "0.5",
        "--fio-nbd",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let field = |k: &str| json_number(&out, k);
    assert!(field("iops") > 0.0, "{out}");
    assert!(field("fio_nbd_iops") > 0.0, "{out}");
    // The fair reference (libnbd, fresh buffers) ran on the same server.
    assert!(
        field("nbd_fair_iops") > 0.0 && field("nbd_fair_ops") >= 1.0,
        "{out}"
    );
    assert_eq!(
        field("nbd_fair_bytes"),
        field("nbd_fair_ops") * 4096.0,
        "{out}"
    );
    // Where the CPU went, per request, on both sides: the client side is a part of the
    // process, the simulated guest a part of the client side.
    for p in ["", "nbd_fair_"] {
        let (all, client) = (
            field(&format!("{p}cpu_us_per_op")),
            field(&format!("{p}client_cpu_us_per_op")),
        );
        assert!(all > 0.0 && client > 0.0 && client <= all, "{p}: {out}");
        let busy = field(&format!("{p}machine_busy"));
        assert!(busy > 0.0 && busy <= 1.0, "{p}: {out}");
    }
    let guest = field("guest_cpu_us_per_op");
    assert!(
        guest > 0.0 && guest < field("client_cpu_us_per_op"),
        "{out}"
    );
    // A URI given outright, in text mode.
    let uri = server.uri();
    let o = host(&[
        "bench",
        "nbd-client",
        "-c",
        &cfg,
        "--seconds",
        "0.3",
        "--fio-nbd",
        &uri,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("of fio-nbd"), "{}", stdout(&o));
    assert!(stdout(&o).contains("of nbd-fair"), "{}", stdout(&o));
    let cpu_lines = stdout(&o)
        .lines()
        .filter(|l| l.starts_with("  cpu:"))
        .count();
    assert_eq!(cpu_lines, 2, "{}", stdout(&o));
    // The plugin alone, driven as the fair reference drives libnbd: one submitting thread,
    // no ring and no simulated guest.
    let o = host(&[
        "bench",
        "nbd-client",
        "-c",
        &cfg,
        "--rw",
        "randwrite",
        "--seconds",
        "0.3",
        "--submit",
        "--iodepth",
        "8",
        "--fio-nbd",
        "--fair-first",
        "--json",
    ]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    let field = |k: &str| json_number(&out, k);
    assert!(out.contains("\"mode\":\"submit\""), "{out}");
    assert!(field("iops") > 0.0 && field("failed") == 0.0, "{out}");
    assert!(field("nbd_fair_iops") > 0.0, "{out}");
    assert!(
        field("client_cpu_us_per_op") <= field("cpu_us_per_op"),
        "{out}"
    );
    assert!(!out.contains("guest_cpu_us_per_op"), "{out}");
    // Only an asynchronous plugin takes submissions; --submit is not --direct.
    let o = host(&["bench", "discard", "--seconds", "0.2", "--submit"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("--submit") && err.lines().count() == 1,
        "{err}"
    );
    let o = host(&["bench", "discard", "--submit", "--iodepth", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--iodepth 0"), "{}", stderr(&o));
    let o = host(&["bench", "nbd-client", "-c", &cfg, "--submit", "--direct"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // A plugin without a `uri` key needs one on the command line.
    let o = host(&["bench", "discard", "--seconds", "0.2", "--fio-nbd"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--fio-nbd"), "{}", stderr(&o));
}

#[test]
fn through_libnbd_too_bytes_round_trip_and_check_passes() {
    need("qemu-img", "qemu-utils");
    let t = TempDir::new("nbd-libnbd");
    let server = Server::nbdkit(&t, "16M", &[], &[]);
    let data = t.join("in.raw");
    random_file(&data, 16 << 20, 11);
    sim_with("write", &server, &["libnbd-commands=true"], &data);
    let by_qemu = t.join("qemu.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &server.uri()])
            .arg(&by_qemu),
    );
    same(
        &by_qemu,
        &data,
        "qemu-img's read of what libnbd's commands wrote",
    );
    let got = t.join("got.raw");
    sim_with("read", &server, &["libnbd-commands=true"], &got);
    same(&got, &data, "sim read through libnbd's commands");
    check_passes_with(&server, &["libnbd-commands=true"]);
}

#[test]
fn a_server_error_fails_that_request_only_with_its_errno() {
    let t = TempDir::new("nbd-errno");
    // Every write fails with ENOSPC in the server; reads work.
    let server = Server::nbdkit(
        &t,
        "4M",
        &["--filter=error"],
        &["error-pwrite=ENOSPC", "error-pwrite-rate=100%"],
    );
    for mode in [None, Some("libnbd-commands=true")] {
        let mut config = vec![server.config()];
        config.extend(mode.map(String::from));
        let disk = open(&config);
        let data = vec![7u8; 8192];
        let e = with_write_bufs(&[&data], |w| disk.write(4096, w, false)).unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{mode:?}: {}", e.message());
        assert!(e.message().contains("write"), "{mode:?}: {}", e.message());
        // The connection is still good: the error was that request's alone.
        let mut b = vec![1u8; 8192];
        with_read_bufs(&mut [&mut b], |r| disk.read(4096, r)).unwrap();
        assert!(b.iter().all(|&x| x == 0), "{mode:?}");
    }
}

/// The server's side of the fixed newstyle handshake for a writable 1 MiB export (flush
/// advertised), up to the transmission phase.
fn fake_handshake(c: &mut std::os::unix::net::UnixStream) {
    use std::io::{Read, Write};
    let mut w = Vec::new();
    w.extend(b"NBDMAGIC");
    w.extend(b"IHAVEOPT");
    w.extend(3u16.to_be_bytes()); // fixed newstyle, no zeroes
    c.write_all(&w).unwrap();
    let mut flags = [0u8; 4];
    c.read_exact(&mut flags).unwrap();
    let option_reply =
        |c: &mut std::os::unix::net::UnixStream, opt: u32, kind: u32, data: &[u8]| {
            let mut r = Vec::new();
            r.extend(0x0003_e889_0455_65a9u64.to_be_bytes());
            r.extend(opt.to_be_bytes());
            r.extend(kind.to_be_bytes());
            r.extend((data.len() as u32).to_be_bytes());
            r.extend(data);
            c.write_all(&r).unwrap();
        };
    loop {
        let mut head = [0u8; 16];
        c.read_exact(&mut head).unwrap();
        let opt = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data).unwrap();
        if opt == 7 || opt == 6 {
            // NBD_OPT_GO / INFO: NBD_INFO_EXPORT (size, flags: has flags, flush), ACK.
            let mut info = Vec::new();
            info.extend(0u16.to_be_bytes());
            info.extend((1u64 << 20).to_be_bytes());
            info.extend((1u16 | 4).to_be_bytes());
            option_reply(c, opt, 3, &info);
            option_reply(c, opt, 1, &[]);
            if opt == 7 {
                return;
            }
        } else {
            option_reply(c, opt, (1 << 31) | 1, &[]); // NBD_REP_ERR_UNSUP
        }
    }
}

/// A fake NBD server on a Unix socket: after the handshake it answers the first command
/// with `reply` (bytes of its choosing, with the command's cookie at offset 8 when
/// `cookie_at_8`), and then closes the connection (`close`) or stays silent with it open
/// until the client leaves.
fn fake_server(
    socket: &Path,
    reply: Vec<u8>,
    cookie_at_8: bool,
    close: bool,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        fake_handshake(&mut c);
        let mut req = [0u8; 28];
        c.read_exact(&mut req).unwrap();
        let mut reply = reply;
        if cookie_at_8 {
            reply[8..16].copy_from_slice(&req[8..16]);
        }
        c.write_all(&reply).unwrap();
        if close {
            return;
        }
        // Silent until the client closes.
        let mut sink = [0u8; 4096];
        while matches!(c.read(&mut sink), Ok(n) if n > 0) {}
    })
}

#[test]
fn a_server_that_stops_reading_cuts_a_blocked_write_after_the_timeout() {
    let t = TempDir::new("nbd-deaf");
    let socket = t.join("deaf.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let (done, until) = std::sync::mpsc::channel::<()>();
    // Handshakes, then reads nothing more until the test is over.
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        fake_handshake(&mut c);
        let _ = until.recv();
    });
    let uri = format!("uri=nbd+unix:///?socket={}", socket.display());
    let disk = open(&[uri, "timeout=1".into()]);
    // More than the socket holds: the send waits for room that never comes.
    let data = vec![5u8; 1 << 20];
    let start = Instant::now();
    let e = with_write_bufs(&[&data], |w| disk.write(0, w, false)).unwrap_err();
    // The sender's wait for room and the reader's no-progress clock run out together:
    // whichever cuts first names the reason.
    let m = e.message();
    assert!(
        m.contains("took no data for 1 s") || m.contains("no reply from the server for 1 s"),
        "{m}"
    );
    // Without the timeout the write waits for good; 20 s leaves a loaded machine room.
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    let mut b = vec![0u8; 4096];
    let again = Instant::now();
    with_read_bufs(&mut [&mut b], |r| disk.read(0, r)).unwrap_err();
    assert!(
        again.elapsed() < Duration::from_secs(1),
        "a later read waited"
    );
    drop(disk);
    done.send(()).unwrap();
    server.join().unwrap();
}

#[test]
fn a_server_breaking_the_protocol_fails_the_connection_not_the_host() {
    let t = TempDir::new("nbd-fake");
    let magic = 0x6744_6698u32.to_be_bytes();
    let simple = |error: u32, cookie: u64| {
        let mut r = Vec::new();
        r.extend(magic);
        r.extend(error.to_be_bytes());
        r.extend(cookie.to_be_bytes());
        r
    };
    let mut bad_magic = simple(0, 0);
    bad_magic[0] ^= 0xff;
    let mut short_data = simple(0, 0);
    short_data.extend([5u8; 100]);
    // (what, reply, echo the cookie, close after, the error expected)
    let cases: [(&str, Vec<u8>, bool, bool, &str); 4] = [
        ("bad magic", bad_magic, true, false, "protocol error"),
        (
            "unknown cookie",
            simple(0, 0xdead_beef),
            false,
            false,
            "protocol error",
        ),
        (
            "closed mid-data",
            short_data.clone(),
            true,
            true,
            "closed the connection",
        ),
        ("silent mid-data", short_data, true, false, "no reply"),
    ];
    for (what, reply, cookie_at_8, close, expect) in cases {
        let socket = t.join(&format!("{}.sock", what.replace(' ', "-")));
        let server = fake_server(&socket, reply, cookie_at_8, close);
        let uri = format!("uri=nbd+unix:///?socket={}", socket.display());
        // Only the silent server needs the timeout to end the read; the others must fail
        // at once, so they get a long one: a client that waited it out would take 10 s,
        // twice the bound, which leaves a loaded machine room.
        let timeout = if expect == "no reply" { 1 } else { 10 };
        let disk = open(&[uri, format!("timeout={timeout}")]);
        let start = Instant::now();
        // A read that got 100 of its 4096 bytes fails rather than returning them.
        let mut b = vec![0u8; 4096];
        let e = with_read_bufs(&mut [&mut b], |r| disk.read(0, r)).unwrap_err();
        assert!(e.message().contains(expect), "{what}: {}", e.message());
        // The silent one: cut after its 1 s; never cut, it would hang.
        let limit = Duration::from_secs(if expect == "no reply" { 20 } else { 5 });
        assert!(
            start.elapsed() < limit,
            "{what}: took {:?}",
            start.elapsed()
        );
        // Later requests fail at once (on the dead connection, not after another timeout).
        let again = Instant::now();
        let e = with_read_bufs(&mut [&mut b], |r| disk.read(4096, r)).unwrap_err();
        assert!(e.errno() != 0, "{what}");
        assert!(
            again.elapsed() < Duration::from_secs(timeout.min(5)),
            "{what}: a later read waited"
        );
        drop(disk);
        server.join().unwrap();
    }
}

/// A one-threaded fake server that serves every command in order: reads answered with
/// bytes of 0x5a, writes read in full and acknowledged. It writes each reply whole before
/// it reads the next command, so a large read reply the client does not take stops it
/// reading anything.
fn in_order_server(socket: &Path) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        fake_handshake(&mut c);
        let mut req = [0u8; 28];
        while c.read_exact(&mut req).is_ok() {
            let kind = u16::from_be_bytes([req[6], req[7]]);
            let len = u32::from_be_bytes(req[24..28].try_into().unwrap()) as usize;
            let mut reply = vec![0u8; 16];
            reply[0..4].copy_from_slice(&0x6744_6698u32.to_be_bytes());
            reply[8..16].copy_from_slice(&req[8..16]);
            match kind {
                0 => reply.extend(std::iter::repeat_n(0x5a, len)),
                1 => {
                    let mut data = vec![0u8; len];
                    if c.read_exact(&mut data).is_err() {
                        return;
                    }
                }
                2 => return,
                _ => {}
            }
            if c.write_all(&reply).is_err() {
                return;
            }
        }
    })
}

/// The attached (ring) thread blocked sending a large write into a full socket, while the
/// server, blocked writing a large read reply nobody takes, reads nothing: the reader's
/// stand-in takes the reply without queueing behind that send, the server moves on, and
/// both complete. The timeout is 60 s, so only that gets them through the test's bound.
#[test]
fn a_send_blocked_on_a_full_socket_is_freed_by_the_stand_in_reading_replies() {
    use xen_disk_plugin_api::{RawBuf, SubmitOp};
    let t = TempDir::new("nbd-full");
    let socket = t.join("full.sock");
    let server = in_order_server(&socket);
    let uri = format!("uri=nbd+unix:///?socket={}", socket.display());
    let disk = Arc::new(open(&[uri, "timeout=60".into()]));
    let taker = disk
        .attach_completions()
        .expect("nbd-client offers its socket");
    let start = Instant::now();
    // Both held by this (attached) thread, then sent together at its take: the server reads
    // the 1 MiB read first and blocks writing its reply, so the rest of the 1 MiB write
    // finds no room, and the take waits inside its send.
    let mut read = vec![0u8; 1 << 20];
    let data = vec![7u8; 1 << 20];
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    // SAFETY: both buffers live until both completions have been received below.
    unsafe {
        disk.submit(
            SubmitOp::Read,
            0,
            vec![RawBuf::from_mut(&mut read)],
            move |r| tx.send(("read", r)).unwrap(),
        );
        disk.submit(
            SubmitOp::Write,
            0,
            vec![RawBuf::from_ref(&data)],
            move |r| tx2.send(("write", r)).unwrap(),
        );
    }
    let mut done = Vec::new();
    while done.len() < 2 {
        taker.take();
        while let Ok((what, r)) = rx.try_recv() {
            r.unwrap_or_else(|e| panic!("{what}: {e}"));
            done.push(what);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still waiting after {:?}: {done:?} done",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    assert!(read.iter().all(|&x| x == 0x5a), "read data");
    drop(taker);
    drop(disk);
    server.join().unwrap();
}
