//! `xen-disk-host nbd` against the real NBD clients over a Unix socket: qemu-img (convert,
//! compare, map), qemu-io (patterns, discard, zeroes, FUA), nbdinfo (export facts, --map),
//! nbdcopy and fio's nbd engine; plus a raw client that breaks every rule it can while a
//! well-behaved one keeps working.

mod common;
mod nbd_common;
use common::*;
use nbd_common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[test]
fn qemu_img_convert_and_compare_through_a_plain_and_a_filtered_export() {
    let t = TempDir::new("nbd-convert");
    let src = t.join("src.img");
    random_file(&src, 16 * MIB, 3);
    // A plain file export: what qemu-img writes lands in the file.
    let target = t.join("target.img");
    sparse(&target, 16 * MIB as u64);
    {
        let srv = NbdServer::start(
            &t.join("a.sock"),
            &["file", "-c", &format!("path={}", s(&target))],
        );
        tool_ok(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                s(&src),
                &srv.uri(),
            ],
        );
        tool_ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", s(&src), &srv.uri()],
        );
    }
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&src).unwrap());
    // A filter stack: cow over a zeroed base. The export shows the writes; the base keeps none.
    let base = t.join("base.img");
    sparse(&base, 16 * MIB as u64);
    let srv = NbdServer::start(
        &t.join("b.sock"),
        &[
            "cow",
            "-c",
            "base=file",
            "-c",
            &format!("base.path={}", s(&base)),
        ],
    );
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            s(&src),
            &srv.uri(),
        ],
    );
    tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&src), &srv.uri()],
    );
    assert!(std::fs::read(&base).unwrap().iter().all(|&b| b == 0));
    // A changed byte is found.
    let mut other = std::fs::read(&src).unwrap();
    other[5 * MIB + 7] ^= 1;
    let changed = t.join("changed.img");
    std::fs::write(&changed, other).unwrap();
    let o = tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&changed), &srv.uri()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
}

#[test]
fn qemu_io_patterns_discard_zeroes_and_fua_read_back() {
    let t = TempDir::new("nbd-qemu-io");
    let img = t.join("disk.img");
    random_file(&img, 8 * MIB, 5);
    let srv = NbdServer::start(
        &t.join("s.sock"),
        &["file", "-c", &format!("path={}", s(&img))],
    );
    let out = tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xa5 0 1M",
            "-c",
            "write -f -P 0x5a 1M 64k",
            "-c",
            "write -z 2M 512k",
            "-c",
            "discard 3M 1M",
            "-c",
            "aio_write -P 0x11 4M 4k",
            "-c",
            "aio_write -P 0x22 5M 4k",
            "-c",
            "aio_flush",
            "-c",
            "flush",
            "-c",
            "read -P 0xa5 0 1M",
            "-c",
            "read -P 0x5a 1M 64k",
            "-c",
            "read -P 0 2M 512k",
            "-c",
            "read -P 0x11 4M 4k",
            "-c",
            "read -P 0x22 5M 4k",
            &srv.uri(),
        ],
    );
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    assert_eq!(out.matches("read ").count(), 5, "{out}");
    drop(srv);
    // The file holds the same bytes; the discarded range (file's discard punches a hole)
    // reads as zeroes.
    let data = std::fs::read(&img).unwrap();
    assert!(data[..MIB].iter().all(|&b| b == 0xa5));
    assert!(data[MIB..MIB + 65536].iter().all(|&b| b == 0x5a));
    assert!(data[2 * MIB..2 * MIB + 512 * 1024].iter().all(|&b| b == 0));
    assert!(data[3 * MIB..4 * MIB].iter().all(|&b| b == 0));
    assert!(data[4 * MIB..4 * MIB + 4096].iter().all(|&b| b == 0x11));
}

#[test]
fn a_read_only_export_says_so_and_refuses_writes() {
    let t = TempDir::new("nbd-ro");
    let img = t.join("disk.img");
    random_file(&img, 4 * MIB, 7);
    let before = std::fs::read(&img).unwrap();
    let srv = NbdServer::start(
        &t.join("s.sock"),
        &["--read-only", "file", "-c", &format!("path={}", s(&img))],
    );
    let info = tool_ok("nbdinfo", &["--json", &srv.uri()]);
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    assert!(info.contains("\"can_trim\": false"), "{info}");
    let o = tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &srv.uri()],
    );
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        text.contains("read-only") || text.contains("not permitted") || text.contains("Permission"),
        "{text}"
    );
    drop(srv);
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn nbdinfo_reports_the_export_and_its_map_equals_qemu_img_map_of_the_file() {
    let t = TempDir::new("nbd-info");
    let img = t.join("sparse.img");
    sparse(&img, 32 * MIB as u64);
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 1M 3M",
            "-c",
            "write -P 2 20M 64k",
            s(&img),
        ],
    );
    let srv = NbdServer::start(
        &t.join("s.sock"),
        &["file", "-c", &format!("path={}", s(&img))],
    );
    let info = tool_ok("nbdinfo", &["--json", &srv.uri()]);
    for want in [
        "\"export-size\": 33554432",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_zero\": true",
        "\"can_multi_conn\": true",
        "\"block_size_minimum\": 512",
        "\"block_size_maximum\": 33554432",
        "\"base:allocation\"",
    ] {
        assert!(info.contains(want), "{want}: {info}");
    }
    let list = tool_ok("nbdinfo", &["--list", "--json", &srv.uri()]);
    assert!(list.contains("\"xen-disk\""), "{list}");
    let map = tool_ok("nbdinfo", &["--map", &srv.uri()]);
    let want = "0 1048576 3 hole,zero\n1048576 3145728 0 data\n4194304 16777216 3 hole,zero\n\
                20971520 65536 0 data\n21037056 12517376 3 hole,zero\n";
    let got: String = map
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n")
        .collect();
    assert_eq!(got, want);
    assert_eq!(qemu_map(&srv.uri(), None), qemu_map(s(&img), Some("raw")));
}

#[test]
fn nbdcopy_copies_in_and_out_with_several_connections() {
    let t = TempDir::new("nbd-copy");
    let src = t.join("src.img");
    random_file(&src, 24 * MIB, 9);
    let img = t.join("disk.img");
    sparse(&img, 24 * MIB as u64);
    let srv = NbdServer::start(
        &t.join("s.sock"),
        &["file", "-c", &format!("path={}", s(&img))],
    );
    tool_ok(
        "nbdcopy",
        &["--connections=4", "--requests=16", s(&src), &srv.uri()],
    );
    let out = t.join("out.img");
    tool_ok("nbdcopy", &["--connections=4", &srv.uri(), s(&out)]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
}

#[test]
fn fio_nbd_engine_writes_and_verifies_at_depth() {
    let t = TempDir::new("nbd-fio");
    let img = t.join("disk.img");
    sparse(&img, 16 * MIB as u64);
    let srv = NbdServer::start(
        &t.join("s.sock"),
        &["file", "-c", &format!("path={}", s(&img))],
    );
    let out = tool_ok(
        "fio",
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri()),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    );
    // Terse output: field 6 is the read kB (the verify pass), 47 the write kB.
    let fields: Vec<&str> = out.trim().split(';').collect();
    assert!(fields.len() > 50, "{out}");
    assert_eq!(fields[5], "16384", "verify read the whole disk back: {out}");
}

// ---- a raw client that breaks the rules ----

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;

struct Raw(UnixStream);

impl Raw {
    /// Connects and reads the greeting; sends `flags`.
    fn connect(socket: &Path, flags: u32) -> Raw {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        s.write_all(&flags.to_be_bytes()).unwrap();
        Raw(s)
    }
    fn option(&mut self, option: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.0.write_all(&v).unwrap();
    }
    /// One option reply: (type, data).
    fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d).unwrap();
        (kind, d)
    }
    /// Sends GO for the default export and reads replies to the ACK.
    fn go(&mut self) {
        self.option(7, &[0, 0, 0, 0, 0, 0]);
        loop {
            let (kind, _) = self.reply();
            if kind == 1 {
                return;
            }
            assert_eq!(kind, 3, "INFO or ACK");
        }
    }
    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, flags: u16) {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&v).unwrap();
    }
    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn a_hostile_client_gets_errors_or_is_disconnected_and_others_go_on() {
    let t = TempDir::new("nbd-hostile");
    let img = t.join("disk.img");
    random_file(&img, 4 * MIB, 13);
    let srv = NbdServer::start(
        &t.join("s.sock"),
        &["file", "-c", &format!("path={}", s(&img))],
    );
    let sock = srv.socket.clone();

    // Unknown client flags and a client that is not fixed newstyle: disconnected.
    assert!(Raw::connect(&sock, 0x80).closed());
    assert!(Raw::connect(&sock, 0).closed());
    // A wrong option magic: disconnected.
    let mut r = Raw::connect(&sock, 3);
    r.0.write_all(&[0u8; 16]).unwrap();
    assert!(r.closed());

    let mut r = Raw::connect(&sock, 3);
    // An oversize option is read, dropped and refused with TOO_BIG; the session goes on.
    r.option(3, &vec![0u8; 200 * 1024]);
    assert_eq!(r.reply().0, (1 << 31) + 9);
    // A GO whose name length lies: INVALID. An unknown export: UNKNOWN. Unknown option: UNSUP.
    r.option(7, &[0, 0, 0xff, 0xff, 0, 0]);
    assert_eq!(r.reply().0, (1 << 31) + 3);
    r.option(7, &[0, 0, 0, 3, b'n', b'o', b'p', 0, 0]);
    assert_eq!(r.reply().0, (1 << 31) + 6);
    r.option(99, &[]);
    assert_eq!(r.reply().0, (1 << 31) + 1);
    // SET_META_CONTEXT before structured replies: INVALID.
    r.option(10, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.reply().0, (1 << 31) + 3);
    // LIST works in the middle of it all.
    r.option(3, &[]);
    assert_eq!(r.reply().0, 2);
    assert_eq!(r.reply().0, 1);
    r.go();
    let size = 4 * MIB as u64;
    // Past the end, overflowing, zero length, over the maximum payload, unaligned write,
    // unknown command, unknown flag, block status without a context: EINVAL, each.
    for (kind, offset, len, flags) in [
        (0u16, size - 512, 1024u32, 0u16),
        (0, u64::MAX - 511, 1024, 0),
        (0, 0, 0, 0),
        (0, 0, (32 << 20) + 1, 0),
        (6, 100, 512, 0),
        (42, 0, 512, 0),
        (0, 0, 512, 1 << 9),
        (7, 0, 4096, 0),
    ] {
        r.request(kind, 9, offset, len, flags);
        assert_eq!(r.simple(), (22, 9), "{kind} {offset}+{len} {flags:#x}");
    }
    // An oversize write: its payload is read and dropped, then refused; in step after it.
    let big = (32u32 << 20) + 4096;
    r.request(1, 10, 0, big, 0);
    r.0.write_all(&vec![0u8; big as usize]).unwrap();
    assert_eq!(r.simple(), (22, 10));
    // A good read still works, unaligned too, and returns the file's bytes.
    r.request(0, 11, 1000, 100, 0);
    assert_eq!(r.simple(), (0, 11));
    let mut data = [0u8; 100];
    r.0.read_exact(&mut data).unwrap();
    assert_eq!(&data[..], &std::fs::read(&img).unwrap()[1000..1100]);

    // Meanwhile a well-behaved client works.
    let good = tool_ok("qemu-io", &["-f", "raw", "-c", "read 0 64k", &srv.uri()]);
    assert!(good.contains("read 65536/65536"), "{good}");

    // A wrong request magic: disconnected.
    r.0.write_all(&[0xffu8; 28]).unwrap();
    assert!(r.closed());
    // And the server still serves.
    let good = tool_ok("qemu-io", &["-f", "raw", "-c", "read 0 64k", &srv.uri()]);
    assert!(good.contains("read 65536/65536"), "{good}");
}

#[test]
fn bad_command_lines_get_one_error_line() {
    let t = TempDir::new("nbd-bad");
    let sock = t.join("s.sock");
    assert_bad_input(
        &host(&["nbd", "no-such-plugin-xyz", "--unix", s(&sock)]),
        &["no-such-plugin-xyz"],
    );
    assert_bad_input(
        &host(&[
            "nbd",
            "file",
            "-c",
            "path=/nonexistent/x.img",
            "--unix",
            s(&sock),
        ]),
        &["/nonexistent/x.img"],
    );
    let o = host(&["nbd", "file", "-c", "path=/dev/null"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--unix"), "{}", stderr(&o));
}

#[test]
fn the_bench_script_measures_every_server_and_prints_the_medians() {
    build_all();
    let o = std::process::Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nbd-bench.sh"))
        .args(["1", "0.2", "16"])
        .env("XEN_DISK_HOST", target_dir().join("xen-disk-host"))
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .output()
        .expect("bash");
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    for server in [
        "ours-raw",
        "nbdkit-raw",
        "qemu-raw",
        "ours-qcow2",
        "qemu-qcow2",
    ] {
        let rounds = out
            .lines()
            .filter(|l| l.starts_with("round") && l.contains(server));
        assert_eq!(rounds.count(), 2, "{server}: {out}");
        let medians = out
            .lines()
            .filter(|l| !l.starts_with("round") && l.contains(&format!("{server} ")));
        assert_eq!(medians.count(), 2, "{server}: {out}");
    }
    for want in [
        "randread ours-raw",
        "read ours-qcow2",
        "ratio to qemu-qcow2",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    assert_eq!(out.matches("ratio to ").count(), 4, "{out}");
}

#[test]
fn a_tcp_export_serves_the_same_disk() {
    let t = TempDir::new("nbd-tcp");
    let img = t.join("disk.img");
    random_file(&img, 4 * MIB, 17);
    // A free port from the kernel; released just before the server binds it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    build_all();
    let mut child = std::process::Command::new(target_dir().join("xen-disk-host"))
        .args(["nbd", "file", "-c", &format!("path={}", s(&img))])
        .args(["--tcp", &format!("127.0.0.1:{port}")])
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd://127.0.0.1:{port}");
    let result = std::panic::catch_unwind(|| {
        tool_ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", s(&img), &uri],
        );
        let info = tool_ok("nbdinfo", &["--json", &uri]);
        assert!(info.contains("\"export-size\": 4194304"), "{info}");
    });
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert!(child.wait().unwrap().success(), "SIGTERM ends it cleanly");
    result.unwrap();
}
