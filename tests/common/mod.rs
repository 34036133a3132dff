//! Shared helpers for the end-to-end tests: build the binary and every plugin once, run the
//! `xen-disk-host` binary, make temporary files.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// `target/<profile>`, where cargo put this test and where it builds the plugins.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// Builds the host binary, every plugin and the test fixtures (once per test binary).
pub fn build_all() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--lib", "--bins"]);
        if target_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace failed");
    });
}

/// A plugin file built by [`build_all`], e.g. `plugin_path("mmap")`.
pub fn plugin_path(name: &str) -> PathBuf {
    build_all();
    target_dir().join(format!("lib{}.so", name.replace('-', "_")))
}

/// Runs `xen-disk-host ARGS` with the plugin search path set to the build directory.
pub fn host(args: &[&str]) -> Output {
    host_with_env(args, &[])
}

/// [`host`] with these environment variables set as well.
pub fn host_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    build_all();
    Command::new(target_dir().join("xen-disk-host"))
        .args(args)
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .envs(env.iter().copied())
        .output()
        .expect("run xen-disk-host")
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the command failed as bad input: exit code 2 and exactly one stderr line that
/// contains every one of `needles`.
pub fn assert_bad_input(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "exit code; stderr: {err}; stdout: {}",
        stdout(o)
    );
    assert_eq!(
        err.lines().count(),
        1,
        "one error line expected, got: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
}

/// A fresh temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("xen-disk-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a file of `len` pseudo-random bytes.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    std::fs::write(path, data).unwrap();
}

/// The number under `"key":` in a one-line JSON object (the `--json` output of `bench`,
/// `ctl stats`); panics naming the key and the text when it is missing.
pub fn json_number(out: &str, key: &str) -> f64 {
    let at = out
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} missing: {out}"))
        + key.len()
        + 3;
    out[at..]
        .split([',', '}'])
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} is not a number: {out}"))
}

/// One thread of a process, as `/proc/PID/task/TID` shows it.
pub struct ProcThread {
    pub tid: u32,
    /// Its name (`comm`), trimmed.
    pub comm: String,
    /// Its `status` file (`Name:`, `Cpus_allowed_list:`, `voluntary_ctxt_switches:`...).
    pub status: String,
    /// Its `stat` line.
    pub stat: String,
}

impl ProcThread {
    /// The number after `key:` in `status`.
    pub fn status_number(&self, key: &str) -> Option<u64> {
        self.status_field(key)?.parse().ok()
    }

    /// The first word after `key:` in `status`.
    pub fn status_field(&self, key: &str) -> Option<&str> {
        self.status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
            .split_whitespace()
            .next()
    }

    /// Its state letter (`R`, `S`, `T`...): the field after the name in `stat`, which is in
    /// parentheses and may hold spaces.
    pub fn state(&self) -> Option<char> {
        let i = self.stat.rfind(')')?;
        self.stat[i + 1..].trim_start().chars().next()
    }
}

/// The threads of process `pid`, by thread id; empty once it has exited. A thread that ends
/// while it is read is left out.
pub fn threads(pid: u32) -> Vec<ProcThread> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<ProcThread> = tasks
        .flatten()
        .filter_map(|t| {
            let path = t.path();
            let tid = t.file_name().to_str()?.parse().ok()?;
            Some(ProcThread {
                tid,
                comm: std::fs::read_to_string(path.join("comm"))
                    .ok()?
                    .trim()
                    .to_string(),
                status: std::fs::read_to_string(path.join("status")).ok()?,
                stat: std::fs::read_to_string(path.join("stat")).ok()?,
            })
        })
        .collect();
    out.sort_by_key(|t| t.tid);
    out
}

/// Makes a file immutable (`chattr +i`) for as long as it lives. Tests run as root, which
/// ignores a 0444 mode; an immutable file refuses even root's writes (EPERM), as a read-only
/// image refuses a user's.
pub struct Immutable(pub PathBuf);

impl Immutable {
    pub fn new(path: &Path) -> Self {
        let s = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .expect("run chattr");
        assert!(
            s.success(),
            "chattr +i {}: this test needs a filesystem with immutable files (ext4, xfs, btrfs) \
             and CAP_LINUX_IMMUTABLE",
            path.display()
        );
        let refused = std::fs::OpenOptions::new().write(true).open(path);
        assert!(
            refused.is_err(),
            "{} still opens for writing",
            path.display()
        );
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A child process killed when dropped (a failed test leaves nothing running).
pub struct Running {
    /// The process.
    pub child: Child,
    lines: Option<Receiver<String>>,
    seen: Vec<String>,
    /// The last lines of its stderr, for a failure's message (a daemon that died says why
    /// there, not on stdout).
    errors: Option<Arc<Mutex<VecDeque<String>>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Runs `xen-disk-host ARGS`, its stdout read line by line.
    pub fn host(args: &[&str]) -> Running {
        Running::host_env(args, &[])
    }

    /// [`Running::host`] with more variables in its environment.
    pub fn host_env(args: &[&str], env: &[(&str, &str)]) -> Running {
        build_all();
        let mut child = Command::new(target_dir().join("xen-disk-host"))
            .args(args)
            .env("XEN_DISK_PLUGIN_PATH", target_dir())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run xen-disk-host");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let errors = Arc::new(Mutex::new(VecDeque::new()));
        let (err, tail) = (child.stderr.take().unwrap(), errors.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut t = tail.lock().unwrap();
                if t.len() == 20 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        Running {
            child,
            lines: Some(rx),
            seen: Vec::new(),
            errors: Some(errors),
        }
    }

    /// A child whose output is not read, killed when dropped.
    pub fn from_child(child: Child) -> Running {
        Running {
            child,
            lines: None,
            seen: Vec::new(),
            errors: None,
        }
    }

    /// Waits (at most 60 s) for a stdout line containing `needle`.
    pub fn expect(&mut self, needle: &str) -> String {
        self.expect_all(&[needle])
    }

    /// Waits (at most 60 s) for a stdout line containing every needle. Lines seen earlier
    /// count too: the order in which a daemon reports two devices is not part of a test.
    pub fn expect_all(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let rx = self.lines.as_ref().unwrap();
        loop {
            if let Some(l) = self
                .seen
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => self.seen.push(l),
                Err(e) => panic!(
                    "no line with {needles:?} ({}); saw:\n{}\nlast of stderr:\n{}",
                    match e {
                        RecvTimeoutError::Timeout => "60 s passed",
                        RecvTimeoutError::Disconnected => "its stdout closed",
                    },
                    self.seen.join("\n"),
                    self.stderr_tail()
                ),
            }
        }
    }

    /// Forgets the lines seen so far: the next [`Running::expect`] waits for a new one (a
    /// device attached again reports what it reported before).
    pub fn forget_seen(&mut self) {
        self.seen.clear();
    }

    /// The last lines of its stderr (none for [`Running::from_child`]).
    fn stderr_tail(&self) -> String {
        self.errors.as_ref().map_or(String::new(), |e| {
            e.lock()
                .unwrap()
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        })
    }

    /// Sends it signal `sig` (`-TERM`, `-HUP`…) with kill(1).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Stops it with SIGTERM and requires a clean exit; every stdout line it wrote.
    pub fn terminate(&mut self) -> Vec<String> {
        self.signal("-TERM");
        let status = self.child.wait().unwrap();
        if let Some(rx) = &self.lines {
            while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
                self.seen.push(l);
            }
        }
        assert!(
            status.success(),
            "exit {status:?}:\n{}\nlast of stderr:\n{}",
            self.seen.join("\n"),
            self.stderr_tail()
        );
        self.seen.clone()
    }

    /// The `host:port` of the `metrics at http://host:port/metrics` line.
    pub fn metrics_addr(&mut self) -> String {
        let line = self.expect("metrics at http://");
        line.split("http://")
            .nth(1)
            .unwrap()
            .trim_end_matches("/metrics")
            .to_string()
    }
}

/// One HTTP GET over a plain TcpStream; the status line and the body.
pub fn http_get(addr: &str, target: &str) -> (String, String) {
    let mut c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(c, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The Xen lab's scripts (`tests/xen-lab`).
pub fn lab_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xen-lab")
}

/// A kept lab log from `tests/xen-lab/testdata`.
/// Asserts that `tests/xen-lab/SCRIPT --checks-only` fails on `log`, with a FAIL line
/// naming `check`.
pub fn lab_check_fails(script: &str, log: &str, check: &str) {
    let (ok, out) = lab_checks(script, log);
    assert!(!ok, "passed: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL  ") && l.contains(check)),
        "no FAIL for {check:?}: {out}"
    );
}

/// `log` with each line starting `from` replaced by what `edit` makes of it (nothing: the
/// line goes); at least one line must start so.
pub fn edit_lines(log: &str, from: &str, edit: &dyn Fn(&str) -> Option<String>) -> String {
    let mut hits = 0;
    let mut out = Vec::new();
    for l in log.lines() {
        if l.starts_with(from) {
            hits += 1;
            out.extend(edit(l));
        } else {
            out.push(l.to_string());
        }
    }
    assert!(hits > 0, "the passing log has no line starting {from:?}");
    out.join("\n") + "\n"
}

pub fn lab_log(name: &str) -> String {
    let path = lab_dir().join("testdata").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `tests/xen-lab/SCRIPT --checks-only` on `log` (no boot): whether it passed, and its
/// stdout. The checks must write nothing to stderr.
pub fn lab_checks(script: &str, log: &str) -> (bool, String) {
    let dir = TempDir::new("labchecks");
    let path = dir.join("lab.log");
    std::fs::write(&path, log).unwrap();
    let o = Command::new("bash")
        .arg(lab_dir().join(script))
        .arg("--checks-only")
        .arg(&path)
        .output()
        .expect("bash");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.is_empty(), "{script} wrote to stderr: {err}");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}
