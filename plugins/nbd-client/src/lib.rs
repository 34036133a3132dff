//! `nbd-client`: a disk served by an NBD server, over a Unix socket or TCP
//! (`libnbd_client.so`; `libnbd.so` is the system library it links with).
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `uri` | string | required | `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT` (also `nbds…` with TLS when libnbd has it) |
//! | `readonly` | bool | `false` | serve the export read-only even if the server allows writes |
//! | `connections` | integer | `0` | connections to open; `0`: with a server that advertises multi-conn, one per CPU the process may use, at most 4; else 1 (`XEN_DISK_NBD_AUTO_CONNECTIONS=N` sets the automatic number). More than one needs multi-conn, or `readonly` |
//! | `timeout` | integer | `30` | seconds to wait for the handshake, and for any progress while requests are outstanding; then the connection is cut and its requests fail |
//! | `structured-replies` | bool | `false` | ask the server for structured replies: it may then answer sparse reads with holes (less data on a slow link), at one more system call per read |
//! | `libnbd-commands` | bool | `false` | exchange commands through libnbd's API rather than on the socket directly (see below); TLS and structured replies always do |
//!
//! ```text
//! xen-disk-host connect guest1 --plugin nbd-client -c 'uri=nbd+unix:///?socket=/run/nbd.sock'
//! ```
//!
//! libnbd (Debian's `libnbd0`, 1.14 or later, through a few hand-written declarations in
//! [`ffi`]) parses the URI, connects and negotiates: fixed newstyle handshake, the export,
//! its size and what the server can do (read-only, flush, FUA, trim, write-zeroes,
//! multi-conn, block sizes), TLS for `nbds://`. After that, on a plain connection with simple
//! replies (the default), the plugin speaks the transmission phase on the socket itself
//! ([`wire`]): each command is one `sendmsg`, and the reader takes a burst of replies per
//! `recvmsg`, a read's data landing in the guest's pages. The first connection is offered
//! to the host's ring thread (plugin ABI 1.3, [`Disk::attach_completions`]): it then reads
//! that connection's replies itself, and the commands it sends wait for its next pass to go
//! out together in one `sendmsg`, while the reader thread only stands in (see [`conn`]).
//! libnbd's own commands cost a
//! system call more per reply (it reads header and data separately) and a lock the reader
//! holds while it reads: the reader's CPU time per 4 KiB random read was 4.0 µs that way,
//! 2.7 µs here, and `bench` against fio's nbd engine went from 0.85 to 0.94 of it (medians of
//! 14 interleaved same-run pairs on 2 cores). With TLS, structured replies or
//! `libnbd-commands=true`, every command goes through libnbd's asynchronous API instead
//! (`nbd_aio_pread`/`pwrite`…), whose zeroing of read buffers is turned off: a failed read
//! answers the guest ERROR, and the guest's page holds only its own data, so there is
//! nothing to hide.
//!
//! ## Parallelism: asynchronous commands, shared connections
//!
//! The disk declares `ThreadModel::Async`: the host's ring thread hands it every read and
//! write as a submission, which is sent at once, before `submit` returns. Each connection
//! has a reader thread of its own that takes the replies (or runs libnbd's state machine);
//! the command's completion answers the guest. One connection thus carries every request the
//! guest has in flight, as fio's nbd engine does with its iodepth, and this works with every
//! server (qemu-nbd serves a single client unless told otherwise).
//!
//! A command's bytes go out on the submitting thread, which waits while the socket is full.
//! On a Unix socket it speaks on itself (no TLS, simple replies) the plugin therefore raises
//! the send buffer to 4 MiB (as far as `net.core.wmem_max` allows): with the kernel's
//! default of about 208 KiB a 1 MiB write filled it five times over, and the ring thread
//! slept until the server had read each part, one connection at a time. In `bench` against
//! `nbdkit memory` (10 interleaved turns, 1 MiB writes) that took the plugin from 0.92 to
//! 1.16 of the fair libnbd reference, better in every turn; 4 KiB requests and reads did
//! not change. TCP sockets keep the kernel's autotuning, which a fixed size would switch
//! off.
//!
//! Flush, trim and write-zeroes, and `read`/`write` called directly (`check`, `bench
//! --direct`), block the calling thread: it submits the same way and parks until the reader
//! thread's callback wakes it (see [`conn`]).
//!
//! When the server advertises multi-conn, the disk also opens a few connections (one per CPU
//! the process may use, at most 4, or `connections`: readers beyond the CPUs only compete).
//! A request takes the first connection with less than 1 MiB in flight, else the one with
//! the least: small requests share one socket, whose replies the ring thread takes in a
//! burst per wake-up (spread over several sockets, each reply would wake a reader of its
//! own), while large transfers spread over all of them and their readers copy in parallel.
//! Without multi-conn the NBD protocol does not promise that connections see each other's
//! writes, so more than one is refused unless `readonly`.
//! Automatic extra connections are optional: a server that admits fewer clients
//! (`qemu-nbd --shared=2`) leaves the next one unanswered, which costs 2 s at open, and the
//! disk then uses the connections it has.
//!
//! An NBD command reads or writes one contiguous range of memory, and the guest's buffers are
//! pages that may lie anywhere. Pages mapped side by side are merged into runs; a request in
//! one run, or in a few runs of 32 KiB or more, goes straight into the guest's pages with one
//! command per run, all in flight together; scattered small pages go through a per-thread
//! bounce buffer and one command (a 4 KiB copy costs less than a command).
//!
//! ## Failures
//!
//! A server that is not there fails `open` with one line naming the URI. A server that dies
//! fails every outstanding and later request with an I/O error (the guest sees EIO); one
//! that stops answering, or stops reading while a command waits to be sent, is cut off after
//! `timeout` seconds without progress, with the same effect. So does a server that breaks
//! the protocol (a reply with a bad magic, or for a command not in flight): nothing it sends
//! is trusted beyond the bytes a command asked for.
//! An error the server reports for one command (ENOSPC, EIO…) fails that request alone, with
//! that errno. The plugin does not reconnect: detach and attach again (or `ctl swap`).

pub mod conn;
pub mod ffi;
pub mod wire;

use conn::{Caps, Command, Conn, Pending};
use std::cell::RefCell;
use std::time::Duration;
use xen_disk_plugin_api::*;

/// The longest trim or write-zeroes sent as one command: NBD lengths are 32-bit.
const MAX_RANGE: u64 = 1 << 30;

/// The most connections opened when the server advertises multi-conn and the user did not
/// say: small requests share the first (see `NbdDisk::conn`), large transfers spread over
/// all, whose readers then copy in parallel; more would cost an idle socket and thread each.
///
/// Fewer are opened on a host with fewer CPUs (those the process may use): one per CPU, as
/// readers beyond that only compete with one another, the ring thread, the guest and the
/// server. On 2 CPUs, through the ring against `nbdkit memory` (8 interleaved turns of 1
/// MiB reads, README "Benchmarks"), two connections ran 1.06-1.27 of the fair libnbd
/// reference where one ran 0.87-1.04, better in every turn; four had run 0.84-0.94. Small
/// requests, which stay on the first connection, and 1 MiB writes did not change.
const AUTO_CONNECTIONS: u64 = 4;

/// Sets how many connections `connections=0` opens with a multi-conn server (1 to 16),
/// whatever the CPUs: for a host whose CPUs are not what the disk gets, and for tests.
const AUTO_CONNECTIONS_ENV: &str = "XEN_DISK_NBD_AUTO_CONNECTIONS";

/// How many connections `connections=0` opens with a multi-conn server.
fn auto_connections() -> Result<u64> {
    if let Ok(v) = std::env::var(AUTO_CONNECTIONS_ENV) {
        return match v.trim().parse::<u64>() {
            Ok(n) if (1..=16).contains(&n) => Ok(n),
            _ => Err(Error::config(
                "connections",
                format!("{AUTO_CONNECTIONS_ENV}={v:?}: must be 1 to 16"),
            )),
        };
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(auto_for_cpus(cpus))
}

/// [`auto_connections`] on a host whose process may use `cpus` CPUs.
fn auto_for_cpus(cpus: usize) -> u64 {
    (cpus.max(1) as u64).min(AUTO_CONNECTIONS)
}

/// Bytes in flight on a connection before the next request goes to another one.
const SPREAD_BYTES: u64 = 1 << 20;

/// How long an automatic extra connection may take to open before the disk does without.
const AUTO_EXTRA_TIMEOUT: Duration = Duration::from_secs(2);

/// An open export.
pub struct NbdDisk {
    conns: Vec<std::sync::Arc<Conn>>,
    info: DiskInfo,
    /// Each connection's reader thread (asynchronous submissions), stopped on drop.
    readers: Vec<std::thread::JoinHandle<()>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bounce buffers for scattered submissions, reused: a fresh 1 MiB buffer per request
    /// costs page faults on every use.
    spare: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Drop for NbdDisk {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        for c in &self.conns {
            c.nudge();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// A read's or write's buffers as libnbd takes them: the guest's pages when they form one
/// run, else a buffer of ours (copied back into the pages after a read).
struct Target {
    ptr: *mut u8,
    len: usize,
    bounce: Option<Vec<u8>>,
}

// SAFETY: the pointer is the guest's pages or our own bounce buffer, valid until the command
// completes, whichever thread completes it.
unsafe impl Send for Target {}

thread_local! {
    /// Per worker thread: where scattered guest pages are gathered for one command.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// At most this many NBD commands serve one request whose buffers lie in separate runs...
const MAX_RUNS: usize = 8;
/// ...when each run is at least this long; otherwise one command and a bounce buffer.
const MIN_RUN: usize = 32 << 10;

/// The buffers merged into runs of adjacent memory: `None` when there are more than
/// [`MAX_RUNS`] or a run shorter than [`MIN_RUN`] (a copy is then cheaper than commands).
/// A single run may be of any length.
fn runs(bufs: &[RawBuf]) -> Option<([(*mut u8, usize); MAX_RUNS], usize)> {
    let mut out = [(std::ptr::null_mut(), 0); MAX_RUNS];
    let mut n = 0;
    for b in bufs {
        if n > 0 && out[n - 1].0 as usize + out[n - 1].1 == b.base as usize {
            out[n - 1].1 += b.len;
        } else {
            if n == MAX_RUNS {
                return None;
            }
            out[n] = (b.base, b.len);
            n += 1;
        }
    }
    if n > 1 && out[..n].iter().any(|r| r.1 < MIN_RUN) {
        return None;
    }
    Some((out, n))
}

fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < len {
            b.resize(len, 0);
        }
        f(&mut b[..len])
    })
}

impl NbdDisk {
    /// The connection for a command of `bytes`: the first one with less than
    /// [`SPREAD_BYTES`] in flight, else the one with the fewest bytes in flight. Small
    /// requests thus share one socket (one reader wake-up per burst of replies, where
    /// spreading them would cost a wake-up per reply on each socket), and large transfers
    /// spread over every connection, whose readers copy in parallel.
    fn conn(&self, bytes: u64) -> &Conn {
        let first = self
            .conns
            .iter()
            .find(|c| c.pending_bytes() + bytes <= SPREAD_BYTES);
        first.unwrap_or_else(|| {
            self.conns
                .iter()
                .min_by_key(|c| c.pending_bytes())
                .expect("at least one connection")
        })
    }

    /// The connection the host's ring thread may take replies from: the first, which
    /// carries the small requests ([`conn`](Self::conn)).
    fn taken(&self) -> &Conn {
        &self.conns[0]
    }

    /// Sends a submission as one command and returns; the reader thread answers it.
    fn submit_async(&self, mut sub: Submission) {
        let offset = sub.offset();
        let len = sub.len();
        let target = match runs(sub.raw()) {
            Some((r, 1)) => Target {
                ptr: r[0].0,
                len: r[0].1,
                bounce: None,
            },
            _ => {
                let mut b = self
                    .spare
                    .lock()
                    .ok()
                    .and_then(|mut s| s.pop())
                    .unwrap_or_default();
                b.resize(len, 0);
                if let Some(w) = sub.write_bufs() {
                    w.copy_to(&mut b);
                }
                Target {
                    ptr: b.as_mut_ptr(),
                    len,
                    bounce: Some(b),
                }
            }
        };
        let (ptr, n) = (target.ptr, target.len);
        let op = sub.op();
        // Only a bounced request returns its buffer to the pool (the common, direct one
        // takes no reference: each is an atomic add here and a subtract on the reader).
        let spare = target.bounce.as_ref().map(|_| self.spare.clone());
        let done = move |r: Result<()>| {
            let target = target;
            if let (Ok(()), Some(b), SubmitOp::Read) = (&r, &target.bounce, op) {
                if let Some(mut bufs) = sub.read_bufs() {
                    bufs.copy_from(b);
                }
            }
            sub.complete(r.map_err(|e| e.context(format!("offset {offset}, {len} bytes"))));
            if let (Some(b), Some(spare)) = (target.bounce, spare) {
                if let Ok(mut s) = spare.lock() {
                    if s.len() < 64 {
                        s.push(b);
                    }
                }
            }
        };
        let conn = self.conn(n as u64);
        let cmd = match op {
            SubmitOp::Read => Command::Read {
                buf: ptr,
                len: n,
                offset,
            },
            SubmitOp::Write | SubmitOp::WriteFua => Command::Write {
                buf: ptr,
                len: n,
                offset,
                fua: op == SubmitOp::WriteFua,
            },
        };
        let what = if op == SubmitOp::Read {
            "read"
        } else {
            "write"
        };
        // SAFETY: ptr is valid for n bytes (the guest's pages, which the submission keeps
        // mapped, or the bounce buffer `done` owns) until `done` runs, which is after the
        // command lets go of it; the connection outlives its commands (the host drops the
        // disk with none in flight).
        unsafe { conn.start_async(what, cmd, done) };
    }

    /// Reads (or with `write: Some(fua)`, writes) the runs, which hold consecutive bytes from
    /// `offset`, with one command each, all in flight together.
    fn transfer(&self, offset: u64, runs: &[(*mut u8, usize)], write: Option<bool>) -> Result<()> {
        let total: usize = runs.iter().map(|r| r.1).sum();
        let conn = self.conn(total as u64);
        let what = if write.is_some() { "write" } else { "read" };
        let mut pending = Vec::with_capacity(runs.len());
        let mut first_err = None;
        let mut at = offset;
        for &(buf, len) in runs {
            let cmd = match write {
                Some(fua) => Command::Write {
                    buf,
                    len,
                    offset: at,
                    fua,
                },
                None => Command::Read {
                    buf,
                    len,
                    offset: at,
                },
            };
            // SAFETY: buf is valid for len bytes (the caller's buffers or bounce buffer, only
            // read for a write) until wait() returns below.
            let started = unsafe { conn.start(what, cmd) };
            match started {
                Ok(p) => pending.push(p),
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            }
            at += len as u64;
        }
        for p in pending {
            if let Err(e) = p.wait() {
                first_err.get_or_insert(e);
            }
        }
        let len = at - offset;
        match first_err {
            Some(e) => Err(e.context(format!("offset {offset}, {len} bytes"))),
            None => Ok(()),
        }
    }

    fn write_with(&self, offset: u64, bufs: &WriteBufs<'_>, fua: bool) -> Result<()> {
        if bufs.is_empty() {
            return Ok(());
        }
        match runs(bufs.raw()) {
            // libnbd only reads from the runs, though the pointers are `*mut`.
            Some((r, n)) => self.transfer(offset, &r[..n], Some(fua)),
            None => with_bounce(bufs.len(), |b| {
                bufs.copy_to(b);
                self.transfer(offset, &[(b.as_mut_ptr(), b.len())], Some(fua))
            }),
        }
    }

    /// Sends `op` over the range in pieces of at most [`MAX_RANGE`], all in flight at once.
    fn ranged(
        &self,
        what: &'static str,
        offset: u64,
        len: u64,
        op: fn(u64, u64) -> Command,
    ) -> Result<()> {
        let conn = self.conn(0);
        let mut pending: Vec<Pending<'_>> = Vec::new();
        let mut first_err = None;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(MAX_RANGE);
            // SAFETY: the command uses no buffer.
            match unsafe { conn.start(what, op(offset + at, n)) } {
                Ok(p) => pending.push(p),
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            }
            at += n;
        }
        for p in pending {
            if let Err(e) = p.wait() {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e.context(format!("offset {offset}, {len} bytes"))),
            None => Ok(()),
        }
    }
}

impl Disk for NbdDisk {
    fn info(&self) -> DiskInfo {
        self.info
    }

    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        if bufs.is_empty() {
            return Ok(());
        }
        match runs(bufs.raw()) {
            // Adjacent buffers, each valid for writes per ReadBufs' contract, make one range.
            Some((r, n)) => self.transfer(offset, &r[..n], None),
            None => with_bounce(bufs.len(), |b| {
                self.transfer(offset, &[(b.as_mut_ptr(), b.len())], None)?;
                bufs.copy_from(b);
                Ok(())
            }),
        }
    }

    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.write_with(offset, bufs, false)
    }

    fn submit(&self, submission: Submission) {
        self.submit_async(submission);
    }

    fn attach_completions(&self) -> Option<i32> {
        self.taken().attach()
    }

    fn take_completions(&self) {
        self.taken().take();
    }

    fn detach_completions(&self) {
        self.taken().detach();
    }

    fn write_fua(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.write_with(offset, bufs, true)
    }

    /// With several connections every one is flushed: the multi-conn promise covers writes
    /// completed on any connection, and flushing all costs little and relies on nothing.
    fn flush(&self) -> Result<()> {
        let mut pending = Vec::with_capacity(self.conns.len());
        let mut first_err = None;
        for c in &self.conns {
            // SAFETY: flush uses no buffer.
            match unsafe { c.start("flush", Command::Flush) } {
                Ok(p) => pending.push(p),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        for p in pending {
            if let Err(e) = p.wait() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.ranged("trim", offset, len, |offset, len| Command::Trim {
            offset,
            len,
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.ranged("write-zeroes", offset, len, |offset, len| Command::Zero {
            offset,
            len,
        })
    }
}

/// Refuses what is clearly not an NBD URI before libnbd sees it.
fn check_uri(uri: &str) -> Result<()> {
    const SCHEMES: &[&str] = &[
        "nbd://",
        "nbds://",
        "nbd+unix://",
        "nbds+unix://",
        "nbd+vsock://",
        "nbds+vsock://",
    ];
    if !SCHEMES.iter().any(|s| uri.starts_with(s)) {
        return Err(Error::config(
            "uri",
            format!(
                "{uri:?} is not an NBD URI (nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT)"
            ),
        ));
    }
    let unix = uri.starts_with("nbd+unix://") || uri.starts_with("nbds+unix://");
    if unix && !uri.contains("socket=") {
        return Err(Error::config(
            "uri",
            format!("{uri}: a unix URI needs ?socket=PATH"),
        ));
    }
    Ok(())
}

fn disk_info(caps: &Caps, readonly: bool, uri: &str) -> Result<DiskInfo> {
    let sector: u32 = match caps.min_block {
        0..=512 => 512,
        4096 => 4096,
        n => {
            return Err(Error::io(
                libc::EINVAL,
                format!("{uri}: the server's minimum block size {n} is neither 512 nor 4096"),
            ))
        }
    };
    let size = caps.size / u64::from(sector) * u64::from(sector);
    if size == 0 {
        return Err(Error::io(
            libc::EINVAL,
            format!(
                "{uri}: the export is {} bytes, less than one {sector}-byte sector",
                caps.size
            ),
        ));
    }
    let physical = match caps.preferred_block {
        4096 => 4096,
        _ => sector,
    };
    Ok(DiskInfo::new(size)
        .sector_size(sector)
        .physical_sector_size(physical.max(sector))
        .read_only(readonly || caps.read_only)
        .flush(caps.flush)
        .fua(caps.flush && caps.fua)
        .discard(caps.trim)
        .write_zeroes(caps.zero)
        .thread_model(ThreadModel::Async))
}

/// The plugin.
pub struct NbdClientPlugin;

impl Plugin for NbdClientPlugin {
    type Disk = NbdDisk;
    const NAME: &'static str = "nbd-client";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "An NBD server's export (unix socket or TCP, libnbd), many requests in flight";
    const CONFIG_KEYS: &'static [ConfigKey] = &[
        ConfigKey::required(
            "uri",
            KeyType::String,
            "nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT",
        ),
        ConfigKey::optional(
            "readonly",
            KeyType::Bool,
            "false",
            "Serve read-only even if the server allows writes",
        ),
        ConfigKey::optional(
            "connections",
            KeyType::Integer,
            "0",
            "Connections; 0: 4 if the server advertises multi-conn, else 1 (more than 1 needs multi-conn, or readonly)",
        ),
        ConfigKey::optional(
            "timeout",
            KeyType::Integer,
            "30",
            "Seconds without progress before the connection is cut and its requests fail",
        ),
        ConfigKey::optional(
            "structured-replies",
            KeyType::Bool,
            "false",
            "Ask for structured replies (lets a server send holes in sparse reads; costs a system call per read)",
        ),
        ConfigKey::optional(
            "libnbd-commands",
            KeyType::Bool,
            "false",
            "Send commands and read replies through libnbd instead of on the socket directly (TLS and structured replies always do)",
        ),
    ];

    fn open(config: &Config) -> Result<NbdDisk> {
        let uri = config.str("uri")?.to_string();
        check_uri(&uri)?;
        let readonly = config.bool("readonly")?;
        let connections = config.u64("connections")?;
        if connections > 16 {
            return Err(Error::config(
                "connections",
                format!("{connections}: must be 0 (automatic) to 16"),
            ));
        }
        let timeout = config.u64("timeout")?;
        if !(1..=3600).contains(&timeout) {
            return Err(Error::config(
                "timeout",
                format!("{timeout}: must be 1 to 3600 seconds"),
            ));
        }
        let timeout = Duration::from_secs(timeout);
        let options = conn::Options {
            structured_replies: config.bool("structured-replies")?,
            libnbd_commands: config.bool("libnbd-commands")?,
        };
        let auto = connections == 0;
        // Checked before connecting: a bad setting fails at once.
        let automatic = if auto { auto_connections()? } else { 0 };
        let first = Conn::open(&uri, timeout, options)?;
        let info = disk_info(&first.caps, readonly, &uri)?;
        let connections = match connections {
            0 if first.caps.multi_conn => automatic,
            0 => 1,
            n => n,
        };
        if connections > 1 && !first.caps.multi_conn && !info.read_only {
            return Err(Error::config(
                "connections",
                format!(
                    "{uri}: the server does not advertise multi-conn, so writes on {connections} connections could be seen inconsistently; use connections=1 or readonly=true"
                ),
            ));
        }
        let mut conns = vec![first];
        for _ in 1..connections {
            if !auto {
                conns.push(Conn::open(&uri, timeout, options)?);
                continue;
            }
            // Extra connections the user did not ask for are a bonus: a server that admits
            // fewer clients (qemu-nbd --shared=2) leaves the next one waiting unanswered, so
            // give it little time and carry on with the connections there are.
            match Conn::open(&uri, timeout.min(AUTO_EXTRA_TIMEOUT), options) {
                Ok(c) => conns.push(c),
                Err(_) => break,
            }
        }
        let conns: Vec<std::sync::Arc<Conn>> = conns.into_iter().map(std::sync::Arc::new).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::with_capacity(conns.len());
        for (i, c) in conns.iter().enumerate() {
            let (c2, stop2) = (c.clone(), stop.clone());
            match std::thread::Builder::new()
                .name(format!("nbd-reader-{i}"))
                .spawn(move || c2.run_reader(&stop2))
            {
                Ok(r) => readers.push(r),
                Err(e) => {
                    // The readers already running stop before the connections close.
                    stop.store(true, std::sync::atomic::Ordering::Release);
                    conns.iter().for_each(|c| c.nudge());
                    readers.into_iter().for_each(|r| {
                        let _ = r.join();
                    });
                    return Err(Error::from(e).context("nbd-client: reader thread"));
                }
            }
        }
        Ok(NbdDisk {
            conns,
            info,
            readers,
            stop,
            spare: Default::default(),
        })
    }
}

export_plugin!(NbdClientPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_connections_follow_the_cpus() {
        assert_eq!(auto_for_cpus(0), 1);
        assert_eq!(auto_for_cpus(1), 1);
        assert_eq!(auto_for_cpus(2), 2);
        assert_eq!(auto_for_cpus(3), 3);
        assert_eq!(auto_for_cpus(4), AUTO_CONNECTIONS);
        assert_eq!(auto_for_cpus(64), AUTO_CONNECTIONS);
    }

    #[test]
    fn uris_that_are_not_nbd_are_refused_naming_the_key() {
        for bad in ["/tmp/x.sock", "http://x/", "nbd+unix:///export"] {
            let e = check_uri(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}");
            assert!(e.message().contains("`uri`"), "{}", e.message());
        }
        check_uri("nbd+unix:///?socket=/tmp/s").unwrap();
        check_uri("nbd://localhost:10809/disk").unwrap();
    }

    #[test]
    fn adjacent_buffers_make_runs_and_small_scattered_ones_none() {
        let mut a = vec![0u8; 4 * MIN_RUN];
        let (x, rest) = a.split_at_mut(MIN_RUN);
        let (y, rest) = rest.split_at_mut(MIN_RUN);
        let (_, z) = rest.split_at_mut(MIN_RUN);
        let lens = |bufs: &[RawBuf]| {
            runs(bufs).map(|(r, n)| r[..n].iter().map(|r| r.1).collect::<Vec<_>>())
        };
        let bufs = [RawBuf::from_mut(x), RawBuf::from_mut(y)];
        assert_eq!(lens(&bufs), Some(vec![2 * MIN_RUN]));
        let bufs = [RawBuf::from_mut(x), RawBuf::from_mut(z)];
        assert_eq!(lens(&bufs), Some(vec![MIN_RUN, MIN_RUN]));
        let bufs = [RawBuf::from_mut(&mut x[..512]), RawBuf::from_mut(z)];
        assert_eq!(lens(&bufs), None);
        let mut pages = vec![0u8; 2 * 4096 * (MAX_RUNS + 1)];
        let bufs: Vec<RawBuf> = pages
            .chunks_mut(8192)
            .map(|c| RawBuf::from_mut(&mut c[..4096]))
            .collect();
        assert_eq!(lens(&bufs), None);
        assert_eq!(lens(&bufs[..1]), Some(vec![4096]));
    }

    #[test]
    fn capabilities_follow_the_server() {
        let caps = Caps {
            size: 10 * 4096 + 100,
            read_only: false,
            flush: true,
            fua: true,
            trim: false,
            zero: true,
            multi_conn: false,
            min_block: 4096,
            preferred_block: 4096,
        };
        let i = disk_info(&caps, false, "u").unwrap();
        assert_eq!((i.size, i.logical_sector_size), (10 * 4096, 4096));
        assert!(i.can_flush && i.can_fua && !i.can_discard && i.can_write_zeroes);
        assert!(!i.read_only);
        assert!(disk_info(&caps, true, "u").unwrap().read_only);
        let no_flush = Caps {
            flush: false,
            ..caps
        };
        assert!(!disk_info(&no_flush, false, "u").unwrap().can_fua);
        let odd = Caps {
            min_block: 1024,
            ..caps
        };
        assert!(disk_info(&odd, false, "u").is_err());
    }
}
