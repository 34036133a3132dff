//! Helpers for the NBD tests: a `xen-disk-host nbd` child process, the client tools, and
//! `qemu-img map` read as runs.

#![allow(dead_code)]

use crate::common::*;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MIB: usize = 1 << 20;

/// A running `xen-disk-host nbd`, stopped (SIGTERM, then waited for) when dropped.
pub struct NbdServer {
    pub child: Child,
    pub socket: PathBuf,
}

impl NbdServer {
    pub fn start(socket: &Path, args: &[&str]) -> NbdServer {
        build_all();
        let mut cmd = Command::new(target_dir().join("xen-disk-host"));
        cmd.arg("nbd")
            .args(args)
            .arg("--unix")
            .arg(socket)
            .env("XEN_DISK_PLUGIN_PATH", target_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start xen-disk-host nbd");
        let started = Instant::now();
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("nbd {args:?} exited with {status}: {err}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the server never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NbdServer {
            child,
            socket: socket.to_path_buf(),
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

pub fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} is needed (see .ci/run's PKGS): {e}"))
}

pub fn tool_ok(name: &str, args: &[&str]) -> String {
    let o = tool(name, args);
    assert!(
        o.status.success(),
        "{name} {args:?}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn sparse(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

/// `qemu-img map --output=json` as (start, length, zero, data) runs, merged where equal.
pub fn qemu_map(target: &str, format: Option<&str>) -> Vec<(u64, u64, bool, bool)> {
    let mut args = vec!["map", "--output=json"];
    if let Some(f) = format {
        args.extend(["-f", f]);
    } else {
        args.extend(["-f", "raw"]);
    }
    args.push(target);
    let out = tool_ok("qemu-img", &args);
    let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
    for line in out.lines().filter(|l| l.contains("\"start\"")) {
        let line = line.replace(' ', "");
        let num = |k: &str| json_number(&line, k) as u64;
        let flag = |k: &str| line.contains(&format!("\"{k}\":true"));
        let (start, len, zero, data) = (num("start"), num("length"), flag("zero"), flag("data"));
        match runs.last_mut() {
            Some(r) if r.2 == zero && r.3 == data && r.0 + r.1 == start => r.1 += len,
            _ => runs.push((start, len, zero, data)),
        }
    }
    runs
}

/// `nbdinfo --map` (of `context`, or base:allocation) as (start, length, flags) runs.
pub fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = tool_ok("nbdinfo", &[&arg, uri]);
    out.lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (
                w[0].parse().unwrap(),
                w[1].parse().unwrap(),
                w[2].parse().unwrap(),
            )
        })
        .collect()
}

/// A minimal NBD reader for the tests: `NBD_OPT_GO` on the default export, then reads with
/// simple replies. Enough to copy chosen ranges, which no command-line client does.
pub struct MiniClient(UnixStream);

impl MiniClient {
    pub fn connect(socket: &Path) -> MiniClient {
        use std::io::Write;
        let mut s = UnixStream::connect(socket).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut go = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&6u32.to_be_bytes());
        go.extend_from_slice(&[0u8; 6]);
        s.write_all(&go).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).unwrap();
            match kind {
                1 => return MiniClient(s),
                3 => {}
                other => panic!("GO answered {other:#x}"),
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) {
        use std::io::Write;
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&[0, 0, 0, 0]);
        r.extend_from_slice(&1u64.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&(buf.len() as u32).to_be_bytes());
        self.0.write_all(&r).unwrap();
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[4..8], &[0, 0, 0, 0], "read at {offset} failed");
        self.0.read_exact(buf).unwrap();
    }
}
