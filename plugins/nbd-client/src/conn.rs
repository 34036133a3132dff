//! One NBD connection: a libnbd handle, the dispatcher thread that moves its state machine
//! along, and the way a blocked caller learns that its command completed.
//!
//! ```text
//!  worker ──nbd_aio_pread(cb)──▶ handle ──▶ socket     (the request is sent by the worker)
//!    │ park                        ▲
//!    │                 dispatcher: poll(fd, eventfd) ─▶ nbd_aio_notify_read/write
//!    └◀── unpark ── free(cb) ◀── reply read, callback run ──┘
//! ```
//!
//! A worker submits its command itself (libnbd writes it to the socket at once when it can)
//! and parks. The dispatcher is the only thread that reads replies: it polls the socket in
//! the direction libnbd asks for, plus an eventfd that a worker signals when its command
//! could not be written in full (libnbd then wants the socket writable, and a dispatcher
//! asleep on readability alone would not notice). Completion runs the callback pair on the
//! dispatcher: `callback` records the error, `free` (always called exactly once, also when
//! the submitting call fails) wakes the worker. So a worker returns only after libnbd has
//! let go of its buffer, which is the guest's page.
//!
//! Nothing waits forever: if commands are outstanding and none has completed for `timeout`,
//! the dispatcher shuts the socket down; libnbd sees end-of-file, marks the connection dead
//! and fails every outstanding command, whose workers then return an error.

use crate::ffi::*;
use std::ffi::{c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};
use xen_disk_plugin_api::{Error, Result};

/// A libnbd handle pointer that may cross threads.
#[derive(Clone, Copy)]
pub struct Handle(pub *mut NbdHandle);

// SAFETY: libnbd handles are thread-safe (every API call takes the handle's own lock), and
// the handle is closed only after every thread using it is done (see Conn's Drop).
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

/// State shared with the dispatcher thread.
struct Shared {
    /// An eventfd: a worker's nudge, or the request to stop.
    wake: c_int,
    stop: AtomicBool,
    /// Commands submitted and not yet completed.
    pending: AtomicUsize,
    /// Nanoseconds since `base` of the last completion (or of the first submission after an
    /// idle spell): the no-progress clock for the timeout.
    progress_ns: AtomicU64,
    base: Instant,
    /// Why the connection was cut on our side, for the error messages that follow.
    broken: Mutex<Option<String>>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn nudge(&self) {
        let one: u64 = 1;
        // SAFETY: wake is an eventfd owned by this Shared; 8 bytes from a live u64.
        unsafe { libc::write(self.wake, (&one as *const u64).cast(), 8) };
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: the eventfd is owned here and closed once.
        unsafe { libc::close(self.wake) };
    }
}

/// One connection to the server.
pub struct Conn {
    h: Handle,
    shared: Arc<Shared>,
    dispatcher: Option<JoinHandle<()>>,
    pub caps: Caps,
    uri: String,
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
    pub fn open(uri: &str, timeout: Duration) -> Result<Conn> {
        let c_uri = CString::new(uri)
            .map_err(|_| Error::config("uri", format!("{uri:?} contains a NUL byte")))?;
        // SAFETY: no preconditions.
        let raw = unsafe { nbd_create() };
        if raw.is_null() {
            let (errno, msg) = last_error();
            return Err(Error::io(errno, format!("{uri}: nbd_create: {msg}")));
        }
        let h = Handle(raw);
        // From here on the handle is closed by Conn's Drop, or by `close` on failure.
        let close = |e: Error| {
            // SAFETY: h is live, no other thread has it yet, and it is not used again.
            unsafe { nbd_close(h.0) };
            e
        };
        // SAFETY: h is live; c_uri is a NUL-terminated string that outlives the call.
        if unsafe { nbd_aio_connect_uri(h.0, c_uri.as_ptr()) } == -1 {
            let (errno, msg) = last_error();
            return Err(close(Error::io(errno, format!("{uri}: {msg}"))));
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
                return Err(close(Error::io(errno, format!("{uri}: handshake: {msg}"))));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(close(Error::io(
                    libc::ETIMEDOUT,
                    format!(
                        "{uri}: no NBD handshake within {} s (is it an NBD server?)",
                        timeout.as_secs_f64()
                    ),
                )));
            }
            let ms = left.as_millis().clamp(1, 1000) as c_int;
            // SAFETY: h is live; only this thread uses it during the handshake.
            if unsafe { nbd_poll(h.0, ms) } == -1 {
                let (errno, msg) = last_error();
                return Err(close(Error::io(errno, format!("{uri}: {msg}"))));
            }
        }
        let caps = read_caps(h, uri).map_err(close)?;
        // SAFETY: no preconditions; the fd is owned by Shared from here.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            let e = std::io::Error::last_os_error();
            return Err(close(Error::from(e).context(format!("{uri}: eventfd"))));
        }
        let shared = Arc::new(Shared {
            wake,
            stop: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            progress_ns: AtomicU64::new(0),
            base: Instant::now(),
            broken: Mutex::new(None),
        });
        let s2 = shared.clone();
        let dispatcher = std::thread::Builder::new()
            .name("nbd-dispatch".into())
            .spawn(move || dispatch(h, &s2, timeout))
            .map_err(|e| close(Error::from(e).context(format!("{uri}: dispatcher thread"))))?;
        Ok(Conn {
            h,
            shared,
            dispatcher: Some(dispatcher),
            caps,
            uri: uri.to_string(),
        })
    }

    /// Commands submitted here and not yet completed.
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// Submits one command: `submit` calls an `nbd_aio_*` function with the callback it is
    /// given and returns its result. The caller keeps every buffer the command uses alive
    /// and untouched until [`Pending::wait`] returns.
    pub fn start(
        &self,
        what: &str,
        submit: impl FnOnce(Handle, CompletionCallback) -> i64,
    ) -> Result<Pending<'_>> {
        let waiter = Arc::new(Waiter {
            thread: std::thread::current(),
            done: AtomicBool::new(false),
            error: AtomicI32::new(0),
        });
        let cb = CompletionCallback {
            callback: Some(on_complete),
            user_data: Arc::into_raw(waiter.clone()) as *mut c_void,
            free: Some(on_free),
        };
        if self.shared.pending.fetch_add(1, Ordering::AcqRel) == 0 {
            // Idle until now: the no-progress clock starts with this command.
            self.shared
                .progress_ns
                .store(self.shared.now_ns(), Ordering::Relaxed);
        }
        let cookie = submit(self.h, cb);
        if cookie == -1 {
            // libnbd has already called `free` (it does so when the call fails).
            let (errno, msg) = last_error();
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(self.error(errno, what, &msg));
        }
        // SAFETY: h is live for &self.
        if unsafe { nbd_aio_get_direction(self.h.0) } & AIO_DIRECTION_WRITE != 0 {
            // Part of the command is still to be written: the dispatcher must poll for it.
            self.shared.nudge();
        }
        Ok(Pending {
            conn: self,
            waiter,
            what: what.to_string(),
        })
    }

    fn error(&self, errno: i32, what: &str, detail: &str) -> Error {
        let broken = self.shared.broken.lock().unwrap_or_else(|e| e.into_inner());
        match broken.as_deref() {
            Some(why) => Error::io(errno, format!("{}: {what}: {why}", self.uri)),
            None => Error::io(errno, format!("{}: {what}: {detail}", self.uri)),
        }
    }
}

/// A submitted command.
pub struct Pending<'a> {
    conn: &'a Conn,
    waiter: Arc<Waiter>,
    what: String,
}

impl Pending<'_> {
    /// Blocks until the command completed (the dispatcher's timeout bounds the wait).
    pub fn wait(self) -> Result<()> {
        while !self.waiter.done.load(Ordering::Acquire) {
            std::thread::park();
        }
        let s = &self.conn.shared;
        s.progress_ns.store(s.now_ns(), Ordering::Relaxed);
        s.pending.fetch_sub(1, Ordering::AcqRel);
        match self.waiter.error.load(Ordering::Acquire) {
            0 => Ok(()),
            errno => {
                let text = std::io::Error::from_raw_os_error(errno).to_string();
                Err(self.conn.error(errno, &self.what, &text))
            }
        }
    }
}

/// Where a completion is reported; one strong reference is lent to libnbd per command.
struct Waiter {
    thread: Thread,
    done: AtomicBool,
    error: AtomicI32,
}

/// Records the command's result. Runs on the dispatcher with the handle locked, so it calls
/// no libnbd function.
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

/// Wakes the waiting caller and gives back the reference lent to libnbd.
unsafe extern "C" fn on_free(user_data: *mut c_void) {
    // SAFETY: libnbd calls free exactly once with the pointer from Arc::into_raw in `start`.
    let w = unsafe { Arc::from_raw(user_data as *const Waiter) };
    w.done.store(true, Ordering::Release);
    w.thread.unpark();
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

/// The dispatcher: reads replies (running the completion callbacks) and finishes writes the
/// submitting workers left half done, until told to stop.
fn dispatch(h: Handle, s: &Shared, timeout: Duration) {
    let timeout_ns = timeout.as_nanos() as u64;
    let mut cut = false;
    // SAFETY: h is live until this thread is joined.
    let fd = unsafe { nbd_aio_get_fd(h.0) };
    while !s.stop.load(Ordering::Acquire) {
        // SAFETY: h is live.
        let alive = unsafe { nbd_aio_is_dead(h.0) == 0 && nbd_aio_is_closed(h.0) == 0 };
        // SAFETY: h is live.
        let dir = if alive {
            unsafe { nbd_aio_get_direction(h.0) }
        } else {
            0
        };
        let mut events = 0;
        if dir & AIO_DIRECTION_READ != 0 {
            events |= libc::POLLIN;
        }
        if dir & AIO_DIRECTION_WRITE != 0 {
            events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd {
                // A dead connection's socket would report HUP forever: stop watching it.
                fd: if alive && fd >= 0 { fd } else { -1 },
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: s.wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a live array of two pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 200) };
        if r > 0 {
            if fds[1].revents & libc::POLLIN != 0 {
                let mut n: u64 = 0;
                // SAFETY: reading 8 bytes into a live u64 from our eventfd.
                unsafe { libc::read(s.wake, (&mut n as *mut u64).cast(), 8) };
            }
            let re = fds[0].revents;
            // Direction read again: a worker may have moved the state machine meanwhile.
            // SAFETY: h is live.
            let dir = unsafe { nbd_aio_get_direction(h.0) };
            let hup = re & (libc::POLLHUP | libc::POLLERR) != 0;
            if dir & AIO_DIRECTION_READ != 0 && (re & libc::POLLIN != 0 || hup) {
                // An error here means the connection died; libnbd has failed the commands
                // in flight, and their callbacks have run.
                // SAFETY: h is live.
                unsafe { nbd_aio_notify_read(h.0) };
            } else if dir & AIO_DIRECTION_WRITE != 0 && (re & libc::POLLOUT != 0 || hup) {
                // SAFETY: h is live.
                unsafe { nbd_aio_notify_write(h.0) };
            }
        }
        if !cut && fd >= 0 && s.pending.load(Ordering::Acquire) > 0 {
            let since = s
                .now_ns()
                .saturating_sub(s.progress_ns.load(Ordering::Relaxed));
            if since > timeout_ns {
                *s.broken.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                    "no reply from the server for {} s: connection cut",
                    timeout.as_secs_f64()
                ));
                // The socket stays libnbd's (closed by nbd_close); shutting it down makes
                // the next read see end-of-file, which fails every outstanding command.
                // SAFETY: fd is the handle's socket, open until nbd_close after our join.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                cut = true;
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The host drops a disk with no call in flight, so nothing is pending here.
        self.shared.stop.store(true, Ordering::Release);
        self.shared.nudge();
        if let Some(t) = self.dispatcher.take() {
            let _ = t.join();
        }
        // SAFETY: h is live; the dispatcher has exited and no caller holds &self.
        unsafe {
            // A polite NBD_CMD_DISC (servers finish outstanding writes before closing);
            // failure means the connection is already gone.
            nbd_aio_disconnect(self.h.0, 0);
            nbd_close(self.h.0);
        }
    }
}
