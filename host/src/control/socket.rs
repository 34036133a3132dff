//! The control socket's listener and client. A Unix socket, mode 0600; a peer is served only
//! when it runs as root or as this process's user (checked with SO_PEERCRED, because a socket
//! file's mode is not enforced everywhere, e.g. on some filesystems and in containers).
//!
//! Limits, so that a stuck or hostile client cannot wedge `ctl` or make a request run cut:
//! - a request is one line of at most [`MAX_REQUEST`] bytes, newline included, and must
//!   arrive whole within [`REQUEST_DEADLINE`] of connecting (one deadline for the whole line,
//!   not per read). A longer line, one without a newline, one that is not UTF-8 or one that
//!   comes too late is refused whole with an `error: ` line and nothing is done;
//! - at most [`MAX_CONNECTIONS`] connections are served at once; another gets
//!   `error: too many control connections` and is closed;
//! - a refusal is sent, the write side shut and what the peer still sends read and dropped
//!   (bounded), so that the peer reads the reason rather than a reset.
//!
//! Replies are sent with `MSG_NOSIGNAL`: `xen-disk-host` keeps SIGPIPE's default action (for
//! `| head`), and a client that hangs up early must not kill the daemon.

use super::Registry;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where `serve` listens unless told otherwise.
pub const DEFAULT_SERVE: &str = "/run/xen-disk/serve.sock";

/// The longest request, newline included. A swap with a thousand `key=value` pairs fits.
pub const MAX_REQUEST: usize = 64 * 1024;

/// How long a peer has, from connecting, to send its whole request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Connections served at once; more are refused until some end.
pub const MAX_CONNECTIONS: usize = 64;

/// After a refusal, at most this much more of the peer's request is read and dropped...
const DRAIN_BYTES: usize = 1 << 20;
/// ...for at most this long, before the connection is closed anyway.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// The limits a listener applies (tests use smaller ones).
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_request: usize,
    deadline: Duration,
    max_connections: usize,
}

const LIMITS: Limits = Limits {
    max_request: MAX_REQUEST,
    deadline: REQUEST_DEADLINE,
    max_connections: MAX_CONNECTIONS,
};

/// The default socket of a `connect` process (one per process).
pub fn default_connect() -> PathBuf {
    PathBuf::from(format!("/run/xen-disk/connect-{}.sock", std::process::id()))
}

/// Removes the socket file when the listener goes.
pub struct Listening {
    path: PathBuf,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens at `path` and answers requests on a thread until the process ends.
pub fn listen(path: &Path, registry: Arc<Registry>) -> Result<Listening, String> {
    listen_with(path, registry, LIMITS)
}

/// One connection's place under [`Limits::max_connections`], given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn listen_with(path: &Path, registry: Arc<Registry>, limits: Limits) -> Result<Listening, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(format!(
            "{}: another xen-disk-host is listening there",
            path.display()
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("xen-disk-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    // Out of descriptors, most likely: wait for some to close instead of
                    // spinning on the error.
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
                    active.fetch_sub(1, Ordering::SeqCst);
                    refuse_at_once(&conn, "too many control connections");
                    continue;
                }
                let slot = Slot(active.clone());
                let r = registry.clone();
                // A request may open a plugin (swap): answer each on its own thread so a slow
                // one does not hold up `stats`. When no thread can be made, the closure (the
                // connection and its slot) is dropped: the peer sees the connection close.
                let _ = std::thread::Builder::new()
                    .name("xen-disk-ctl".into())
                    .spawn(move || {
                        let _slot = slot;
                        let allowed = peer_allowed(&conn);
                        answer(&conn, &r, limits, allowed);
                    });
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Listening {
        path: path.to_path_buf(),
    })
}

fn peer_allowed(conn: &UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of `len` bytes at the pointer we pass.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    rc == 0 && (cred.uid == 0 || cred.uid == me)
}

/// Serves one connection: one request, one answer.
fn answer(conn: &UnixStream, registry: &Registry, limits: Limits, allowed: bool) {
    if !allowed {
        refuse(conn, "permission denied");
        return;
    }
    let line = match read_request(conn, limits) {
        Ok(line) => line,
        Err(why) => {
            refuse(conn, &why);
            return;
        }
    };
    let mut text = registry.handle(&line);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = conn.set_write_timeout(Some(limits.deadline));
    let _ = send_all(conn, text.as_bytes());
}

/// Reads one request line (without its newline), whole, or says why not.
fn read_request(conn: &UnixStream, limits: Limits) -> Result<String, String> {
    let deadline = Instant::now() + limits.deadline;
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete request within {} s; nothing was done",
                limits.deadline.as_secs_f64()
            ));
        }
        conn.set_read_timeout(Some(left))
            .map_err(|e| format!("control socket: {e}"))?;
        let n = match (&*conn).read(&mut chunk) {
            Ok(0) if line.is_empty() => return Err("empty request".into()),
            Ok(0) => return Err("the request does not end with a newline; nothing was done".into()),
            Ok(n) => n,
            // The loop's deadline decides when to give up.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(format!("reading the request: {e}")),
        };
        let end = chunk[..n].iter().position(|&b| b == b'\n');
        line.extend_from_slice(&chunk[..end.unwrap_or(n)]);
        // The newline counts: a line of max_request bytes without it is too long already.
        if line.len() >= limits.max_request {
            return Err(format!(
                "the request is longer than {} bytes; nothing was done",
                limits.max_request
            ));
        }
        if end.is_some() {
            // One request per connection: whatever follows the newline is ignored.
            return String::from_utf8(line).map_err(|_| "the request is not UTF-8".into());
        }
    }
}

/// Sends `error: <why>`, then reads and drops what the peer still sends (bounded) so that
/// closing does not reset the connection under the reply.
fn refuse(conn: &UnixStream, why: &str) {
    let _ = conn.set_write_timeout(Some(DRAIN_TIME));
    let _ = send_all(conn, format!("error: {why}\n").as_bytes());
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + DRAIN_TIME;
    let mut dropped = 0;
    let mut chunk = [0u8; 4096];
    while dropped < DRAIN_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*conn).read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => dropped += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// [`refuse`] without waiting: for the listener's own thread, which must not block.
fn refuse_at_once(conn: &UnixStream, why: &str) {
    if conn.set_nonblocking(true).is_err() {
        return;
    }
    let _ = send_all(conn, format!("error: {why}\n").as_bytes());
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut chunk = [0u8; 4096];
    let mut dropped = 0;
    while dropped < MAX_REQUEST {
        match (&*conn).read(&mut chunk) {
            Ok(n) if n > 0 => dropped += n,
            _ => return,
        }
    }
}

/// Writes all of `bytes` with `MSG_NOSIGNAL` (a peer gone is an error, not SIGPIPE).
fn send_all(conn: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a live slice of `bytes.len()` bytes; send only reads it.
        let n = unsafe {
            libc::send(
                conn.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// How long a client waits for the answer to `line`: 120 s (a daemon that says nothing for
/// that long is stuck), except for `commit`, which copies everything the guest wrote since
/// its snapshot before it answers and takes as long as that takes (Ctrl-C stops waiting;
/// the commit goes on, and `ctl list` shows when it is done).
fn reply_wait(line: &str) -> Option<Duration> {
    let verb = line.split_whitespace().next().unwrap_or_default();
    (verb != "commit").then_some(Duration::from_secs(120))
}

/// Sends one request to the socket at `path`; the answer's text. A request longer than
/// [`MAX_REQUEST`] or spanning lines is refused here, without connecting.
pub fn request(path: &Path, line: &str) -> Result<String, String> {
    let line = line.trim();
    if line.contains('\n') {
        return Err("a control request is one line; this one has a newline in it".into());
    }
    if line.len() + 1 > MAX_REQUEST {
        return Err(format!(
            "the request is {} bytes; the control socket takes at most {MAX_REQUEST}",
            line.len() + 1
        ));
    }
    let conn = UnixStream::connect(path).map_err(|e| {
        format!(
            "{}: {e} (is `xen-disk-host serve` or `connect` running? --socket names another)",
            path.display()
        )
    })?;
    conn.set_read_timeout(reply_wait(line))
        .map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    // A refusal may come before the whole request went out: read the answer even when the
    // write failed, and report the write's error only when there is none.
    let sent = send_all(&conn, format!("{line}\n").as_bytes());
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match (&conn).read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // The daemon closed with part of a refused request unread: its answer came first.
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !out.is_empty() => break,
            Err(e) => {
                return Err(format!("{}: {}", path.display(), sent.err().unwrap_or(e)));
            }
        }
    }
    if out.is_empty() {
        if let Err(e) = sent {
            return Err(format!("{}: {e}", path.display()));
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_commit_is_waited_for_without_a_limit() {
        assert_eq!(reply_wait("commit 1/xvdb"), None);
        assert_eq!(reply_wait("  commit 1/xvdb"), None);
        for line in [
            "snapshot 1/xvdb --nbd unix:/x",
            "list",
            "swap 1/xvdb file",
            "committed",
        ] {
            assert_eq!(reply_wait(line), Some(Duration::from_secs(120)), "{line}");
        }
    }
    use crate::backend::device::DeviceStats;
    use crate::backend::registry::Entry;
    use crate::plugin::GuardedDisk;
    use std::io::Write;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use xen_disk_plugin_api::{Disk, DiskInfo, ReadBufs, Result as DiskResult, WriteBufs};

    /// A disk that stores nothing: the tests are about the requests, not the data.
    struct Blank;
    impl Disk for Blank {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> DiskResult<()> {
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> DiskResult<()> {
            Ok(())
        }
    }

    /// A listener on a fresh path with one device, `1/xvdb`, whose stop flag is returned.
    struct Served {
        path: PathBuf,
        stop: Arc<AtomicBool>,
        _listening: Listening,
    }

    fn serve(tag: &str, limits: Limits) -> Served {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("xen-disk-ctl-{tag}-{}-{n}", std::process::id()));
        let path = dir.join("control.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let registry = Arc::new(Registry::default());
        registry.add(Entry {
            id: "1/xvdb".into(),
            domid: 1,
            guest: "g".into(),
            vbd: "xvdb".into(),
            stack: Mutex::new("blank".into()),
            disk: Arc::new(GuardedDisk::new(Box::new(Blank), false).unwrap()),
            stats: Arc::new(DeviceStats::default()),
            stop: stop.clone(),
            journal: None,
        });
        let listening = listen_with(&path, registry, limits).unwrap();
        Served {
            path,
            stop,
            _listening: listening,
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Sends raw bytes (from a thread: the server may stop reading) and reads the answer to
    /// the end. An error reading (a reset) fails the test.
    fn exchange(path: &Path, bytes: Vec<u8>) -> String {
        let conn = UnixStream::connect(path).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut w = conn.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
        });
        let mut out = String::new();
        (&conn)
            .read_to_string(&mut out)
            .expect("the answer, read to its end without a reset");
        writer.join().unwrap();
        out
    }

    #[test]
    fn an_over_long_request_is_refused_whole_and_never_runs() {
        let s = serve("long", LIMITS);
        // Cut anywhere before the end, this would be `detach 1/xvdb`.
        let mut req = b"detach 1/xvdb".to_vec();
        req.resize(MAX_REQUEST + 100, b' ');
        req.extend_from_slice(b"now\n");
        let out = exchange(&s.path, req);
        assert_eq!(
            out,
            format!("error: the request is longer than {MAX_REQUEST} bytes; nothing was done\n")
        );
        assert!(!s.stop.load(Ordering::SeqCst), "the cut request ran");
        // The line that just fits is served.
        let mut req = b"list".to_vec();
        req.resize(MAX_REQUEST - 1, b' ');
        req.push(b'\n');
        assert!(exchange(&s.path, req).starts_with("1/xvdb domain=1"));
    }

    #[test]
    fn a_request_without_its_newline_is_refused() {
        let s = serve("nonl", LIMITS);
        let conn = UnixStream::connect(&s.path).unwrap();
        (&conn).write_all(b"detach 1/xvdb").unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        (&conn).read_to_string(&mut out).unwrap();
        assert_eq!(
            out,
            "error: the request does not end with a newline; nothing was done\n"
        );
        assert!(!s.stop.load(Ordering::SeqCst));
    }

    #[test]
    fn a_swap_with_a_thousand_pairs_gets_an_answer_not_a_reset() {
        let s = serve("pairs", LIMITS);
        let pairs: Vec<String> = (0..1000).map(|i| format!("key{i}=value{i}")).collect();
        let line = format!("swap 1/xvdb no-such-plugin-xyz {}", pairs.join(" "));
        assert!(line.len() > 4096 && line.len() < MAX_REQUEST);
        let out = exchange(&s.path, format!("{line}\n").into_bytes());
        assert!(
            out.starts_with("error: ") && out.contains("no-such-plugin-xyz"),
            "{out}"
        );
        assert_eq!(out.lines().count(), 1, "{out}");
    }

    #[test]
    fn the_client_refuses_an_over_long_request_without_connecting() {
        let e = request(
            Path::new("/nonexistent/control.sock"),
            &"x".repeat(MAX_REQUEST),
        )
        .unwrap_err();
        assert!(e.contains("at most 65536"), "{e}");
        let e = request(Path::new("/nonexistent/control.sock"), "list\nlist").unwrap_err();
        assert!(e.contains("one line"), "{e}");
    }

    #[test]
    fn a_request_that_is_not_utf8_gets_a_reason() {
        let s = serve("utf8", LIMITS);
        assert_eq!(
            exchange(&s.path, b"list \xff\xfe\n".to_vec()),
            "error: the request is not UTF-8\n"
        );
    }

    #[test]
    fn a_request_dripping_in_is_cut_at_one_deadline() {
        let s = serve(
            "drip",
            Limits {
                deadline: Duration::from_secs(1),
                ..LIMITS
            },
        );
        let conn = UnixStream::connect(&s.path).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let started = Instant::now();
        let mut w = conn.try_clone().unwrap();
        // A byte every 200 ms for 10 s: each read is quick, the request never completes. Cut
        // at the deadline, the dripper stops at its next byte.
        let dripper = std::thread::spawn(move || {
            for b in format!("list{}", " ".repeat(46)).bytes() {
                if w.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let mut out = String::new();
        (&conn).read_to_string(&mut out).unwrap();
        let took = started.elapsed();
        assert_eq!(
            out,
            "error: no complete request within 1 s; nothing was done\n"
        );
        // A timeout per read would wait out the whole drip (10 s and more); the bound leaves
        // a loaded machine 4 s past the deadline.
        assert!(took < Duration::from_secs(5), "answered after {took:?}");
        dripper.join().unwrap();
    }

    #[test]
    fn connections_over_the_cap_are_refused_with_a_reason() {
        let s = serve(
            "cap",
            Limits {
                max_connections: 2,
                ..LIMITS
            },
        );
        let idle: Vec<UnixStream> = (0..2)
            .map(|_| UnixStream::connect(&s.path).unwrap())
            .collect();
        // The listener refuses without waiting for the request, so the peer may still be
        // writing when the connection closes: `request` reads the answer all the same.
        assert_eq!(
            request(&s.path, "list").unwrap(),
            "error: too many control connections\n"
        );
        // The idle ones go: their places are free again.
        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = request(&s.path, "list").unwrap();
            if out.starts_with("1/xvdb domain=1") {
                break;
            }
            assert!(Instant::now() < deadline, "still refused: {out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_refused_peer_reads_the_reason_not_a_reset() {
        let registry = Registry::default();
        let (client, server) = UnixStream::pair().unwrap();
        (&client).write_all(b"list\n").unwrap();
        let t = std::thread::spawn(move || answer(&server, &registry, LIMITS, false));
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut out = String::new();
        (&client)
            .read_to_string(&mut out)
            .expect("the refusal, without a reset");
        assert_eq!(out, "error: permission denied\n");
        drop(client);
        t.join().unwrap();
    }
}
