//! One NBD connection: a libnbd handle that connected and negotiated, the commands sent on
//! it, and the way a blocked caller learns that its command completed.
//!
//! ```text
//!  caller ──send command──▶ socket              (each caller sends its own command)
//!  reader thread: poll(socket) ─▶ replies ─▶ completions ─▶ answer or unpark
//! ```
//!
//! Commands go on the socket directly ([`crate::wire`]) or, with TLS, structured replies or
//! `libnbd-commands`, through libnbd's asynchronous API. Either way each connection has one
//! reader thread ([`Conn::run_reader`]) that polls the socket and takes the replies (or runs
//! libnbd's state machine); an asynchronous submission is answered on it, a blocking caller
//! (flush, trim, a direct `read`) parks until its completion wakes it. A caller returns only
//! after its buffer, which may be the guest's page, is let go.
//!
//! Through libnbd, completion runs the callback pair under libnbd's lock: `callback` records
//! the error, `free` (called exactly once, also when the submitting call fails) marks the
//! command done; waking and answering wait until the reader's notify call has released that
//! lock.
//!
//! The host's ring thread may take the replies instead ([`Conn::attach`], plugin ABI 1.3):
//! it reads the socket once per pass and while asleep polls it beside the guest's event
//! channel, and the commands it submits are held back until its next pass, then sent in one
//! message. The reader thread then stops watching the socket but looks every
//! `STAND_IN_MS`: if the ring thread took nothing since the last look (it may be waiting
//! on the disk itself, in a hot swap's drain), the reader sends what is held and reads. A
//! take that comes while the reader reads waits for it, then reads what is left.
//!
//! Nothing waits forever: if commands are outstanding and none has completed for `timeout`,
//! the reader shuts the socket down; the reader then sees end-of-file, marks the connection
//! dead and fails every outstanding command, whose callers then return an error.

use crate::ffi::*;
use crate::wire::{Reader, Stop, Wire};
use std::cell::RefCell;
use std::ffi::{c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};
use xen_disk_plugin_api::{Error, Result};

/// A libnbd handle pointer that may cross threads.
#[derive(Clone, Copy)]
pub struct Handle(pub *mut NbdHandle);

// SAFETY: libnbd handles are thread-safe (every API call takes the handle's own lock), and
// the handle is closed only in Conn's Drop, when no caller is left.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

/// What the server said it can do, read once after the handshake.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub size: u64,
    pub read_only: bool,
    pub flush: bool,
    pub fua: bool,
    pub trim: bool,
    pub zero: bool,
    pub multi_conn: bool,
    pub min_block: u64,
    pub preferred_block: u64,
}

/// How connections are opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Ask the server for structured replies (NBD_OPT_STRUCTURED_REPLY).
    pub structured_replies: bool,
    /// Exchange commands through libnbd even where [`crate::wire`] could.
    pub libnbd_commands: bool,
}

/// A libnbd function newer than the oldest libnbd we build against, if this one has it.
fn optional_fn(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks the symbol up.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

/// Whether the handle negotiated extended headers (libnbd 1.18 and later may), whose
/// framing [`crate::wire`] does not speak.
fn extended_headers(h: Handle) -> bool {
    optional_fn(c"nbd_get_extended_headers_negotiated").is_some_and(|f| {
        // SAFETY: the symbol is libnbd's `int nbd_get_extended_headers_negotiated(nbd_handle *)`.
        let f: unsafe extern "C" fn(*mut NbdHandle) -> c_int = unsafe { std::mem::transmute(f) };
        // SAFETY: h is live.
        unsafe { f(h.0) == 1 }
    })
}

/// A connection pointer an asynchronous completion carries to the reader's thread.
#[derive(Clone, Copy)]
struct ConnRef(*const Conn);

// SAFETY: Conn is Sync, and it outlives its commands (start_async's contract).
unsafe impl Send for ConnRef {}

impl ConnRef {
    /// # Safety
    /// The connection is still alive (it outlives its commands).
    unsafe fn get<'a>(self) -> &'a Conn {
        // SAFETY: the caller's contract.
        unsafe { &*self.0 }
    }
}

/// One connection to the server.
pub struct Conn {
    h: Handle,
    pub caps: Caps,
    uri: String,
    timeout: Duration,
    /// Our own descriptor of the socket. libnbd closes its descriptor when the connection
    /// dies, on whichever thread notices, and that number could then name another file; the
    /// duplicate keeps naming this socket, for poll and for cutting it off.
    fd: c_int,
    /// An eventfd: a caller whose command is not fully written nudges the reader, which may
    /// be asleep waiting for the socket to become readable only.
    wake: c_int,
    /// The transmission phase on the socket directly (see [`crate::wire`]); `None`: through
    /// libnbd (TLS, structured replies, or asked for).
    wire: Option<Wire>,
    /// Commands submitted and not yet completed.
    pending: AtomicUsize,
    /// Their data bytes.
    pending_bytes: AtomicU64,
    /// Nanoseconds since `base` of the last completion (or of the first submission after an
    /// idle spell): the no-progress clock for the timeout.
    progress_ns: AtomicU64,
    base: Instant,
    /// Why the connection was cut on our side, for the error messages that follow.
    broken: Mutex<Option<String>>,
    /// The replies' parser ([`Wire`] connections): the reader thread's, or the host's ring
    /// thread's while it has the completions ([`Conn::attach`]).
    replies: Mutex<Replies>,
    /// The host's ring thread takes the replies: the reader thread only stands in.
    attached: AtomicBool,
    /// Counts the attached thread's takes: the reader stands in only when it stopped.
    takes: AtomicU64,
    /// The attached thread's [`thread_token`] (0: none). Its submissions are held back and
    /// go out together at its next take: it takes once per pass, so before it sleeps.
    attached_by: AtomicU64,
}

/// A number for the calling thread, unique in the process and never 0.
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TOKEN.with(|t| *t)
}

/// Replies parsed out of the socket, by whichever thread reads it.
#[derive(Default)]
struct Replies {
    reader: Reader,
    /// The connection died: nothing more is read.
    dead: bool,
}

// SAFETY: the parser's pointers are the buffers of commands in flight, valid until those
// complete whichever thread completes them; the mutex lets one thread at a time use them.
unsafe impl Send for Replies {}

/// How often the reader thread looks for replies the attached ring thread has not taken.
const STAND_IN_MS: c_int = 5;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The last libnbd error of this thread, with its errno (EIO when libnbd names none).
fn last_error() -> (i32, String) {
    // SAFETY: nbd_get_error returns a thread-local string (or NULL) valid until the next
    // libnbd call on this thread; it is copied at once.
    let msg = unsafe {
        let p = nbd_get_error();
        if p.is_null() {
            "unknown libnbd error".to_string()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    // SAFETY: no preconditions; thread-local.
    let errno = unsafe { nbd_get_errno() };
    (if errno > 0 { errno } else { libc::EIO }, msg)
}

impl Conn {
    /// Connects to `uri` and completes the handshake within `timeout`.
    pub fn open(uri: &str, timeout: Duration, options: Options) -> Result<Conn> {
        let c_uri = CString::new(uri)
            .map_err(|_| Error::config("uri", format!("{uri:?} contains a NUL byte")))?;
        // SAFETY: no preconditions.
        let raw = unsafe { nbd_create() };
        if raw.is_null() {
            let (errno, msg) = last_error();
            return Err(Error::io(errno, format!("{uri}: nbd_create: {msg}")));
        }
        let h = Handle(raw);
        // Until Conn owns them, the handle and descriptors are closed here on failure.
        let close = |e: Error, fds: &[c_int]| {
            // SAFETY: h is live, no other thread has it, and it is not used again; the
            // descriptors are ours and closed once.
            unsafe {
                nbd_close(h.0);
                for &fd in fds {
                    libc::close(fd);
                }
            }
            e
        };
        // libnbd zeroes every read buffer before the read by default, so that a failed read
        // shows no stale memory: a 1 MiB memset per request on the submitting thread. A
        // failed read here answers the guest ERROR and its page holds only its own data
        // (or our bounce buffer, which is then not copied), so nothing leaks without it.
        // SAFETY: h is live.
        unsafe { nbd_set_pread_initialize(h.0, false) };
        // Structured replies cost a system call more per read (libnbd reads the chunk
        // header, then its offset, then the data), and buy only holes in sparse reads.
        // SAFETY: h is live.
        unsafe { nbd_set_request_structured_replies(h.0, options.structured_replies) };
        if let Some(f) = optional_fn(c"nbd_set_request_extended_headers") {
            // SAFETY: the symbol is libnbd's `int nbd_set_request_extended_headers(nbd_handle
            // *, bool)`.
            let f: unsafe extern "C" fn(*mut NbdHandle, bool) -> c_int =
                unsafe { std::mem::transmute(f) };
            // SAFETY: h is live. The simple framing is what crate::wire speaks.
            unsafe { f(h.0, false) };
        }
        // SAFETY: h is live; c_uri is a NUL-terminated string that outlives the call.
        if unsafe { nbd_aio_connect_uri(h.0, c_uri.as_ptr()) } == -1 {
            let (errno, msg) = last_error();
            return Err(close(Error::io(errno, format!("{uri}: {msg}")), &[]));
        }
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: h is live.
            if unsafe { nbd_aio_is_ready(h.0) } == 1 {
                break;
            }
            // SAFETY: h is live.
            if unsafe { nbd_aio_is_dead(h.0) == 1 || nbd_aio_is_closed(h.0) == 1 } {
                let (errno, msg) = last_error();
                let e = Error::io(errno, format!("{uri}: handshake: {msg}"));
                return Err(close(e, &[]));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let e = Error::io(
                    libc::ETIMEDOUT,
                    format!(
                        "{uri}: no connection and NBD handshake within {} s (is an NBD server listening there?)",
                        timeout.as_secs_f64()
                    ),
                );
                return Err(close(e, &[]));
            }
            let ms = left.as_millis().clamp(1, 1000) as c_int;
            // SAFETY: h is live; only this thread uses it during the handshake.
            if unsafe { nbd_poll(h.0, ms) } == -1 {
                let (errno, msg) = last_error();
                return Err(close(Error::io(errno, format!("{uri}: {msg}")), &[]));
            }
        }
        let caps = read_caps(h, uri).map_err(|e| close(e, &[]))?;
        // SAFETY: h is live and connected; F_DUPFD_CLOEXEC duplicates its socket.
        let fd = unsafe { libc::fcntl(nbd_aio_get_fd(h.0), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            let e = Error::from(std::io::Error::last_os_error()).context(format!("{uri}: dup"));
            return Err(close(e, &[]));
        }
        // SAFETY: no preconditions.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            let e = Error::from(std::io::Error::last_os_error());
            return Err(close(e.context(format!("{uri}: eventfd")), &[fd]));
        }
        // The socket is ours from here when nothing needs libnbd in the middle: no TLS (libnbd
        // encrypts), simple replies only.
        // SAFETY: h is live and connected.
        let plain = unsafe {
            nbd_get_tls_negotiated(h.0) != 1 && nbd_get_structured_replies_negotiated(h.0) != 1
        };
        let wire = (plain && !options.libnbd_commands && !extended_headers(h))
            .then(|| Wire::new(fd, timeout));
        Ok(Conn {
            h,
            caps,
            uri: uri.to_string(),
            timeout,
            fd,
            wake,
            wire,
            pending: AtomicUsize::new(0),
            pending_bytes: AtomicU64::new(0),
            progress_ns: AtomicU64::new(0),
            base: Instant::now(),
            broken: Mutex::new(None),
            replies: Mutex::default(),
            attached: AtomicBool::new(false),
            takes: AtomicU64::new(0),
            attached_by: AtomicU64::new(0),
        })
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Commands submitted here and not yet completed.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Data bytes of the commands submitted here and not yet completed.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes.load(Ordering::Relaxed)
    }

    /// Submits one command; [`Pending::wait`] waits for it.
    ///
    /// # Safety
    /// The command's buffer stays valid (a read's also untouched) until `wait` returns (or
    /// the Pending is dropped, which waits too).
    pub unsafe fn start(&self, what: &'static str, cmd: Command) -> Result<Pending<'_>> {
        let bytes = cmd.bytes();
        let waiter = Arc::new(Waiter {
            thread: std::thread::current(),
            done: AtomicBool::new(false),
            error: AtomicI32::new(0),
        });
        self.begun(bytes);
        let pending = Pending {
            conn: self,
            waiter: waiter.clone(),
            what,
            bytes,
            waited: false,
        };
        if let Some(wire) = &self.wire {
            let done: crate::wire::Done = Box::new(move |errno| waiter.finish(errno));
            // SAFETY: the caller's contract; the Pending waits for `done`.
            unsafe { wire.submit(cmd, done, |why| self.cut(why), false) };
            return Ok(pending);
        }
        let cb = CompletionCallback {
            callback: Some(on_complete),
            user_data: Arc::into_raw(waiter) as *mut c_void,
            free: Some(on_free),
        };
        // SAFETY: the caller's contract; h is live for &self.
        if unsafe { cmd.issue(self.h, cb) } == -1 {
            // libnbd has already called `free` (it does so when the call fails).
            let (errno, msg) = last_error();
            let mut pending = pending;
            pending.waited = true;
            self.ended(bytes, false);
            return Err(self.error(errno, what, &msg));
        }
        // SAFETY: h is live for &self.
        if unsafe { nbd_aio_get_direction(self.h.0) } & AIO_DIRECTION_WRITE != 0 {
            // Part of the command is still to be written: the reader must poll for it.
            self.nudge();
        }
        Ok(pending)
    }

    /// Records why the connection is being cut, for the error messages that follow (the
    /// first reason stays).
    fn cut(&self, why: String) {
        lock(&self.broken).get_or_insert(why);
    }

    /// Submits one command and returns; `done` runs once with its result, after the
    /// command's buffer is let go (on the reader's thread, or here when the command cannot
    /// be sent).
    ///
    /// # Safety
    /// The command's buffer stays valid (a read's also untouched) until `done` runs, and
    /// `self` outlives every command (the disk is dropped with none outstanding).
    pub unsafe fn start_async<F: FnOnce(Result<()>) + Send + 'static>(
        &self,
        what: &'static str,
        cmd: Command,
        done: F,
    ) {
        let bytes = cmd.bytes();
        self.begun(bytes);
        if let Some(wire) = &self.wire {
            let conn = ConnRef(self);
            let done: crate::wire::Done = Box::new(move |errno| {
                // SAFETY: the connection outlives its commands (this function's contract).
                let conn = unsafe { conn.get() };
                conn.ended(bytes, true);
                let result = conn.outcome(errno, what);
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(result)));
            });
            // SAFETY: the caller's contract.
            let hold = self.attached_by.load(Ordering::Relaxed) == thread_token();
            // SAFETY: as above.
            unsafe { wire.submit(cmd, done, |why| self.cut(why), hold) };
            return;
        }
        let ctx = Box::new(AsyncCommand {
            conn: self as *const Conn,
            what,
            bytes,
            error: AtomicI32::new(NOT_COMPLETED),
            result: Ok(()),
            done: Some(done),
        });
        let cb = CompletionCallback {
            callback: Some(on_complete_async::<F>),
            user_data: Box::into_raw(ctx) as *mut c_void,
            free: Some(on_free_async::<F>),
        };
        // On failure libnbd has already called `free`, which answered the command.
        // SAFETY: the caller's contract; h is live for &self.
        if unsafe { cmd.issue(self.h, cb) } != -1 {
            // SAFETY: h is live for &self.
            if unsafe { nbd_aio_get_direction(self.h.0) } & AIO_DIRECTION_WRITE != 0 {
                self.nudge();
            }
        }
    }

    fn error(&self, errno: i32, what: &str, detail: &str) -> Error {
        match lock(&self.broken).as_deref() {
            Some(why) => Error::io(errno, format!("{}: {what}: {why}", self.uri)),
            None => Error::io(errno, format!("{}: {what}: {detail}", self.uri)),
        }
    }

    /// A completed command's result from its errno (0: success).
    fn outcome(&self, errno: i32, what: &str) -> Result<()> {
        match errno {
            0 => Ok(()),
            e => {
                let text = std::io::Error::from_raw_os_error(e).to_string();
                Err(self.error(e, what, &text))
            }
        }
    }

    /// Counts a command of `bytes` as in flight; the first after an idle spell starts the
    /// no-progress clock.
    fn begun(&self, bytes: u64) {
        if self.pending.fetch_add(1, Ordering::AcqRel) == 0 {
            self.progress_ns.store(self.now_ns(), Ordering::Relaxed);
        }
        self.pending_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a command of `bytes` as done (`completed`: it made progress, which restarts
    /// the no-progress clock).
    fn ended(&self, bytes: u64, completed: bool) {
        if completed {
            self.progress_ns.store(self.now_ns(), Ordering::Relaxed);
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.pending_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The connection's reader thread: reads replies until `stop`, so no caller waits on the
    /// socket itself. Exactly one per connection.
    pub fn run_reader(&self, stop: &AtomicBool) {
        match &self.wire {
            Some(wire) => self.drive_wire(wire, stop),
            None => self.drive(|| stop.load(Ordering::Acquire)),
        }
    }

    /// The reader of a [`Wire`] connection: takes replies off the socket until `stop`; a
    /// connection that dies fails every command in flight, and the no-progress clock cuts
    /// one whose server stopped answering. While the host's ring thread has the replies
    /// ([`attach`](Self::attach)) it does not watch the socket, but looks every
    /// [`STAND_IN_MS`] whether replies wait: the ring thread may be held up (a swap drains
    /// the disk through it), and no command depends on it for progress.
    fn drive_wire(&self, wire: &Wire, stop: &AtomicBool) {
        let (mut cut, mut seen) = (false, u64::MAX);
        while !stop.load(Ordering::Acquire) {
            let dead = lock(&self.replies).dead;
            if self.attached.load(Ordering::Acquire) {
                self.wait(0, STAND_IN_MS);
                // Only when the attached thread took nothing since the last look: while it
                // runs, replies are its to take.
                let takes = self.takes.load(Ordering::Relaxed);
                if takes == seen && self.pending() > 0 {
                    // Not behind a send that waits for room: the replies read here make it.
                    self.send_held(wire, true);
                    self.read_replies(wire, &mut lock(&self.replies));
                }
                seen = takes;
            } else if self.wait(if dead { 0 } else { libc::POLLIN }, 100) != 0 {
                self.read_replies(wire, &mut lock(&self.replies));
            }
            if !dead {
                self.cut_if_stalled(&mut cut);
            }
        }
    }

    /// Reads what the socket holds; on a dead connection fails every command in flight.
    fn read_replies(&self, wire: &Wire, replies: &mut Replies) {
        if replies.dead {
            return;
        }
        if let Stop::Dead(why) = replies.reader.read(wire) {
            self.cut(why);
            wire.kill(libc::EIO);
            replies.reader.fail_current(libc::EIO);
            replies.dead = true;
        }
    }

    /// The host's ring thread takes this connection's replies from now on: the socket to
    /// watch, or `None` if it cannot (not a [`Wire`] connection, or already attached).
    pub fn attach(&self) -> Option<c_int> {
        if self.wire.is_none() || self.attached.swap(true, Ordering::AcqRel) {
            return None;
        }
        self.attached_by.store(thread_token(), Ordering::Relaxed);
        // The reader may be asleep on the socket: it steps back now.
        self.nudge();
        Some(self.fd)
    }

    /// Takes the replies that are whole. If the reader thread is standing in right now, waits
    /// for it to finish its read and then reads what is left.
    ///
    /// Skipping instead would leave the socket readable with nothing taken: the ring thread,
    /// woken again at once, would skip again, and on two CPUs a reader preempted while it
    /// holds the replies let the host count a thousand such wake-ups in a row and give the
    /// replies up for good. Waiting is safe: the reader never blocks holding the replies
    /// (its socket reads do not wait, and the completions it runs only try the host's lock).
    pub fn take(&self) {
        self.takes.fetch_add(1, Ordering::Relaxed);
        let Some(wire) = &self.wire else { return };
        // What this thread sent since its last take goes out first, in one message.
        self.send_held(wire, false);
        self.read_replies(wire, &mut lock(&self.replies));
    }

    /// Sends the commands held back (see [`Wire::send_held`]); a failed send cuts the
    /// connection.
    fn send_held(&self, wire: &Wire, unless_busy: bool) {
        if let Err(why) = wire.send_held(unless_busy) {
            self.cut(why);
            wire.kill(libc::EIO);
        }
    }

    /// Gives the replies back to the reader thread, which watches the socket again at once.
    pub fn detach(&self) {
        self.attached_by.store(0, Ordering::Relaxed);
        if let Some(wire) = &self.wire {
            self.send_held(wire, false);
        }
        if self.attached.swap(false, Ordering::AcqRel) {
            self.nudge();
        }
    }

    /// Sleeps up to `ms` until the socket is readable.
    fn wait_readable(&self, ms: c_int) {
        let mut p = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, ms) };
    }

    /// Sleeps up to `ms` until the socket shows one of `events` (0: the socket is not
    /// watched) or the reader is nudged; returns the socket's poll events.
    fn wait(&self, events: i16, ms: c_int) -> i16 {
        let mut fds = [
            libc::pollfd {
                fd: if events == 0 { -1 } else { self.fd },
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a live array of two pollfd.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) } <= 0 {
            return 0;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut n: u64 = 0;
            // SAFETY: reading 8 bytes into a live u64 from our eventfd.
            unsafe { libc::read(self.wake, (&mut n as *mut u64).cast(), 8) };
        }
        fds[0].revents
    }

    /// Cuts the connection (once: `cut`) when commands are outstanding and none has
    /// completed for `timeout`. Shutting the socket down (our duplicate; libnbd's descriptor
    /// stays open) makes the next read see end-of-file, which fails every command.
    fn cut_if_stalled(&self, cut: &mut bool) {
        let since = self
            .now_ns()
            .saturating_sub(self.progress_ns.load(Ordering::Relaxed));
        if !*cut && self.pending() > 0 && since > self.timeout.as_nanos() as u64 {
            self.cut(format!(
                "no reply from the server for {} s: connection cut",
                self.timeout.as_secs_f64()
            ));
            // SAFETY: fd is our descriptor of the socket, open until Drop.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
            *cut = true;
        }
    }

    /// Wakes the reader (to notice `stop`, or a command still to be written).
    pub fn nudge(&self) {
        let one: u64 = 1;
        // SAFETY: wake is our eventfd; 8 bytes from a live u64.
        unsafe { libc::write(self.wake, (&one as *const u64).cast(), 8) };
    }

    fn drive(&self, done: impl Fn() -> bool) {
        let h = self.h.0;
        let mut cut = false;
        while !done() {
            // SAFETY: h is live for &self.
            let dir = unsafe { nbd_aio_get_direction(h) };
            let mut events = 0;
            if dir & AIO_DIRECTION_READ != 0 {
                events |= libc::POLLIN;
            }
            if dir & AIO_DIRECTION_WRITE != 0 {
                events |= libc::POLLOUT;
            }
            // No direction: the connection is dead (libnbd then has failed every command,
            // so `mine` is done) or between states; the socket is not watched then, as a
            // dead one would report HUP forever.
            let re = self.wait(events, 100);
            let hup = re & (libc::POLLHUP | libc::POLLERR) != 0;
            // An error from a notify means the connection died: libnbd has failed the
            // commands outstanding and run their callbacks.
            if dir & AIO_DIRECTION_READ != 0 && (re & libc::POLLIN != 0 || hup) {
                // SAFETY: h is live.
                notify_then_wake(|| unsafe { nbd_aio_notify_read(h) });
            } else if dir & AIO_DIRECTION_WRITE != 0 && (re & libc::POLLOUT != 0 || hup) {
                // SAFETY: h is live.
                notify_then_wake(|| unsafe { nbd_aio_notify_write(h) });
            }
            self.cut_if_stalled(&mut cut);
        }
    }
}

/// An NBD command. A read's or write's buffer belongs to the command until it completes.
#[derive(Debug, Clone, Copy)]
pub enum Command {
    Read {
        buf: *mut u8,
        len: usize,
        offset: u64,
    },
    Write {
        buf: *const u8,
        len: usize,
        offset: u64,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

impl Command {
    /// Data bytes the command moves.
    fn bytes(&self) -> u64 {
        match *self {
            Command::Read { len, .. } | Command::Write { len, .. } => len as u64,
            _ => 0,
        }
    }

    /// Sends the command through libnbd; -1 when libnbd refused it (it has then called
    /// `cb.free`).
    ///
    /// # Safety
    /// `h` is live; the buffer is valid for the command's length until `cb.free` runs.
    unsafe fn issue(self, h: Handle, cb: CompletionCallback) -> i64 {
        // SAFETY: the caller's contract, for every arm.
        unsafe {
            match self {
                Command::Read { buf, len, offset } => {
                    nbd_aio_pread(h.0, buf.cast(), len, offset, cb, 0)
                }
                Command::Write {
                    buf,
                    len,
                    offset,
                    fua,
                } => {
                    let flags = if fua { CMD_FLAG_FUA } else { 0 };
                    nbd_aio_pwrite(h.0, buf.cast(), len, offset, cb, flags)
                }
                Command::Flush => nbd_aio_flush(h.0, cb, 0),
                Command::Trim { offset, len } => nbd_aio_trim(h.0, len, offset, cb, 0),
                Command::Zero { offset, len } => nbd_aio_zero(h.0, len, offset, cb, 0),
            }
        }
    }
}

/// A submitted command.
pub struct Pending<'a> {
    conn: &'a Conn,
    waiter: Arc<Waiter>,
    what: &'static str,
    bytes: u64,
    waited: bool,
}

impl Pending<'_> {
    /// Blocks until the command completed (the connection's timeout bounds the wait).
    pub fn wait(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        self.waited = true;
        let c = self.conn;
        let w = &self.waiter;
        // The thread that has the replies (attached: a ring thread serving a blocking call
        // itself, `--workers 0`) reads them while it waits, rather than leave its own reply
        // to the reader's stand-in look.
        let mine = c.attached_by.load(Ordering::Relaxed) == thread_token();
        // The reader thread's callback sets `done`, then unparks us (an unpark that comes
        // first makes the next park return at once).
        while !w.done.load(Ordering::Acquire) {
            if mine {
                c.take();
                if !w.done.load(Ordering::Acquire) {
                    c.wait_readable(STAND_IN_MS);
                }
            } else {
                std::thread::park();
            }
        }
        c.ended(self.bytes, true);
        c.outcome(w.error.load(Ordering::Acquire), self.what)
    }
}

impl Drop for Pending<'_> {
    /// A command dropped unwaited (a panic on the way) is still waited for: its buffer may
    /// be a caller's stack or the guest's page, which libnbd must be done with first.
    fn drop(&mut self) {
        if !self.waited {
            let _ = self.finish();
        }
    }
}

/// `error` of a command libnbd freed without completing (it could not be sent).
const NOT_COMPLETED: i32 = -1;

/// An asynchronous command's context, owned by libnbd from submission to `free`: the
/// completion lives in it (one allocation per command).
struct AsyncCommand<F> {
    conn: *const Conn,
    what: &'static str,
    bytes: u64,
    error: AtomicI32,
    result: Result<()>,
    done: Option<F>,
}

/// A freed command whose completion is still to run.
trait Answer {
    /// Runs the completion with the recorded result. Never panics.
    fn answer(self: Box<Self>);
}

impl<F: FnOnce(Result<()>) + Send> Answer for AsyncCommand<F> {
    fn answer(mut self: Box<Self>) {
        if let Some(done) = self.done.take() {
            let result = std::mem::replace(&mut self.result, Ok(()));
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(result)));
        }
    }
}

/// Records an asynchronous command's result (under libnbd's lock: no libnbd call).
unsafe extern "C" fn on_complete_async<F>(user_data: *mut c_void, error: *mut c_int) -> c_int {
    // SAFETY: user_data is the Box<AsyncCommand<F>> given in start_async, owned by libnbd
    // until on_free_async; error points to libnbd's int for this call.
    unsafe {
        let c = &*(user_data as *const AsyncCommand<F>);
        c.error.store(*error, Ordering::Release);
    }
    1
}

/// Answers an asynchronous command once libnbd is done with its buffers: on the reader,
/// after its notify call releases libnbd's lock (see TO_ANSWER); elsewhere at once. Never
/// panics into C: the answer runs under catch_unwind.
unsafe extern "C" fn on_free_async<F: FnOnce(Result<()>) + Send + 'static>(user_data: *mut c_void) {
    // SAFETY: libnbd calls free exactly once with the pointer from Box::into_raw.
    let mut c = unsafe { Box::from_raw(user_data as *mut AsyncCommand<F>) };
    // SAFETY: the connection outlives its commands (see start_async).
    let conn = unsafe { &*c.conn };
    conn.ended(c.bytes, true);
    c.result = match c.error.load(Ordering::Acquire) {
        NOT_COMPLETED => {
            let (errno, msg) = last_error();
            Err(conn.error(errno, c.what, &msg))
        }
        errno => conn.outcome(errno, c.what),
    };
    let mut answer: Option<Box<dyn Answer>> = Some(c);
    let _ = TO_ANSWER.try_with(|cell| {
        if let Ok(mut list) = cell.try_borrow_mut() {
            if let Some(list) = list.as_mut() {
                list.extend(answer.take());
            }
        }
    });
    if let Some(answer) = answer {
        answer.answer();
    }
}

/// Where a completion is reported; one strong reference is lent to libnbd per command.
struct Waiter {
    thread: Thread,
    done: AtomicBool,
    error: AtomicI32,
}

impl Waiter {
    /// Records the command's errno (0: success) and wakes its caller.
    fn finish(&self, errno: i32) {
        self.error.store(errno, Ordering::Release);
        self.done.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Records the command's result. Runs with the handle locked, so it calls no libnbd
/// function.
unsafe extern "C" fn on_complete(user_data: *mut c_void, error: *mut c_int) -> c_int {
    // SAFETY: user_data is the Arc<Waiter> lent in `start`, still owned by libnbd until
    // on_free; error points to libnbd's int for this call.
    unsafe {
        let w = &*(user_data as *const Waiter);
        w.error.store(*error, Ordering::Release);
    }
    // Retire the command automatically: nobody calls nbd_aio_command_completed.
    1
}

thread_local! {
    /// Set while this thread runs libnbd's state machine as a reader: callers to wake once
    /// libnbd's lock is released, rather than under it (a woken caller that submits its
    /// next command would otherwise block on that lock at once).
    static TO_WAKE: RefCell<Option<Vec<Arc<Waiter>>>> = const { RefCell::new(None) };
    /// Likewise, asynchronous commands to answer once libnbd's lock is released: answering
    /// may put the response on the guest's ring right here (the host's
    /// `--answer-on-completion`), and the ring thread's next submission must not wait for
    /// libnbd's lock meanwhile.
    static TO_ANSWER: RefCell<Option<Vec<Box<dyn Answer>>>> = const { RefCell::new(None) };
}

/// Marks the command done, wakes its caller (now or after the reader's notify call) and
/// gives back the reference lent to libnbd. Never panics: it is called from C.
unsafe extern "C" fn on_free(user_data: *mut c_void) {
    // SAFETY: libnbd calls free exactly once with the pointer from Arc::into_raw in `start`.
    let w = unsafe { Arc::from_raw(user_data as *const Waiter) };
    w.done.store(true, Ordering::Release);
    let deferred = TO_WAKE
        .try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut list) => match list.as_mut() {
                Some(list) => {
                    list.push(w.clone());
                    true
                }
                None => false,
            },
            Err(_) => false,
        })
        .unwrap_or(false);
    if !deferred {
        w.thread.unpark();
    }
}

/// Runs a libnbd notify call, then wakes the callers and answers the submissions whose
/// commands it completed.
fn notify_then_wake(notify: impl FnOnce() -> c_int) {
    let started = TO_WAKE.with(|cell| {
        let mut list = cell.borrow_mut();
        let was = list.is_some();
        list.get_or_insert_with(Vec::new);
        !was
    });
    if started {
        TO_ANSWER.with(|cell| *cell.borrow_mut() = Some(Vec::new()));
    }
    let _ = notify();
    if started {
        let woken = TO_WAKE
            .with(|cell| cell.borrow_mut().take())
            .unwrap_or_default();
        for w in woken {
            w.thread.unpark();
        }
        let answers = TO_ANSWER
            .with(|cell| cell.borrow_mut().take())
            .unwrap_or_default();
        answers.into_iter().for_each(|a| a.answer());
    }
}

fn read_caps(h: Handle, uri: &str) -> Result<Caps> {
    let flag = |f: unsafe extern "C" fn(*mut NbdHandle) -> c_int, what: &str| -> Result<bool> {
        // SAFETY: h is live and connected; f is one of the nbd_can_*/nbd_is_* queries.
        match unsafe { f(h.0) } {
            -1 => {
                let (errno, msg) = last_error();
                Err(Error::io(errno, format!("{uri}: {what}: {msg}")))
            }
            v => Ok(v == 1),
        }
    };
    // SAFETY: h is live and connected.
    let size = unsafe { nbd_get_size(h.0) };
    if size < 0 {
        let (errno, msg) = last_error();
        return Err(Error::io(errno, format!("{uri}: size: {msg}")));
    }
    // SAFETY: h is live and connected; 0 means the server gave no block sizes.
    let block = |t| unsafe { nbd_get_block_size(h.0, t) }.max(0) as u64;
    Ok(Caps {
        size: size as u64,
        read_only: flag(nbd_is_read_only, "read-only flag")?,
        flush: flag(nbd_can_flush, "flush flag")?,
        fua: flag(nbd_can_fua, "FUA flag")?,
        trim: flag(nbd_can_trim, "trim flag")?,
        zero: flag(nbd_can_zero, "write-zeroes flag")?,
        multi_conn: flag(nbd_can_multi_conn, "multi-conn flag")?,
        min_block: block(SIZE_MINIMUM),
        preferred_block: block(SIZE_PREFERRED),
    })
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The host drops a disk with no call in flight, so no command is outstanding.
        // SAFETY: h is live and no caller holds &self; our descriptors are closed once.
        unsafe {
            // A polite NBD_CMD_DISC (servers finish outstanding writes before closing);
            // failure means the connection is already gone.
            nbd_aio_disconnect(self.h.0, 0);
            nbd_close(self.h.0);
            libc::close(self.fd);
            libc::close(self.wake);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command as Process, Stdio};
    use std::sync::mpsc;

    /// `nbdkit memory` on a Unix socket of its own, stopped when dropped.
    struct Nbdkit {
        child: Child,
        dir: std::path::PathBuf,
    }

    impl Nbdkit {
        fn start(name: &str) -> Nbdkit {
            let dir = std::env::temp_dir().join(format!("nbd-conn-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("test directory");
            let socket = dir.join("sock");
            let child = Process::new("nbdkit")
                .args(["-f", "-U"])
                .arg(&socket)
                .args(["memory", "1M"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nbdkit must be installed to run this test (.ci/run installs it)");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !socket.exists() {
                assert!(Instant::now() < deadline, "nbdkit made no socket in 30 s");
                std::thread::sleep(Duration::from_millis(20));
            }
            Nbdkit { child, dir }
        }

        fn uri(&self) -> String {
            format!("nbd+unix:///?socket={}", self.dir.join("sock").display())
        }
    }

    impl Drop for Nbdkit {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_take_waits_for_a_standing_in_reader_rather_than_leave_the_replies() {
        let server = Nbdkit::start("take");
        // Before the connection: a command left in flight by a failed assertion has its
        // buffer until the connection is gone.
        let mut buf = vec![0u8; 4096];
        let conn = Conn::open(&server.uri(), Duration::from_secs(30), Options::default())
            .expect("connect to nbdkit");
        assert!(
            conn.wire.is_some(),
            "a plain connection speaks the wire itself"
        );
        let (held, release) = (mpsc::channel(), mpsc::channel::<()>());
        let done = Arc::new(AtomicBool::new(false));
        std::thread::scope(|s| {
            // The reader standing in: it holds the replies while the reply arrives, and
            // until told to let go.
            let conn = &conn;
            s.spawn(move || {
                let replies = lock(&conn.replies);
                held.0.send(()).unwrap();
                release.1.recv().unwrap();
                drop(replies);
            });
            held.1.recv().unwrap();
            let flag = done.clone();
            let cmd = Command::Read {
                buf: buf.as_mut_ptr(),
                len: buf.len(),
                offset: 0,
            };
            // SAFETY: `buf` outlives the command: the scope ends after it completed (asserted
            // below) or after the connection is dropped with it failed.
            unsafe {
                conn.start_async("read", cmd, move |r| {
                    flag.store(r.is_ok(), Ordering::Release)
                })
            };
            // Once the reply is on the socket, the stand-in lets go a moment after the take
            // began, which must then wait for it rather than return empty-handed.
            conn.wait_readable(30_000);
            let releaser = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                release.0.send(()).unwrap();
            });
            conn.take();
            assert!(
                done.load(Ordering::Acquire),
                "the take returned without the reply the stand-in was holding up"
            );
            releaser.join().unwrap();
        });
        assert_eq!(conn.pending(), 0);
    }
}
