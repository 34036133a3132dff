//! The fair NBD reference: a small client of libnbd's asynchronous API (`nbd_aio_pread` /
//! `nbd_aio_pwrite`, driven by `nbd_poll` on one thread, as fio's nbd engine does) on the
//! same export as the `nbd-client` disk, with as many requests in flight as the plugin has,
//! the same block size, walk, region and duration, and new data in every write buffer (see
//! [`super::fair`]). One connection, like fio's engine; libnbd's zeroing of read buffers is
//! off, as it is in the plugin. libnbd is loaded at run time, so the host builds and runs
//! where it is not installed.

use super::direct::Pattern;
use super::fair::{load_library, refill, symbol, AlignedBuf, FairFigures, Tally, Walk};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::{Duration, Instant};

type Handle = *mut c_void;

/// `nbd_completion_callback`, passed by value to every `nbd_aio_*` command.
#[repr(C)]
#[derive(Clone, Copy)]
struct CompletionCallback {
    callback: Option<unsafe extern "C" fn(user_data: *mut c_void, error: *mut c_int) -> c_int>,
    user_data: *mut c_void,
    free: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
}

/// The libnbd functions used, with their C signatures (libnbd 1.14's `libnbd.h`).
#[derive(Clone, Copy)]
struct Lib {
    nbd_create: unsafe extern "C" fn() -> Handle,
    nbd_close: unsafe extern "C" fn(Handle),
    nbd_get_error: unsafe extern "C" fn() -> *const c_char,
    nbd_connect_uri: unsafe extern "C" fn(Handle, *const c_char) -> c_int,
    nbd_set_pread_initialize: unsafe extern "C" fn(Handle, bool) -> c_int,
    nbd_get_size: unsafe extern "C" fn(Handle) -> i64,
    nbd_poll: unsafe extern "C" fn(Handle, c_int) -> c_int,
    nbd_aio_pread:
        unsafe extern "C" fn(Handle, *mut c_void, usize, u64, CompletionCallback, u32) -> i64,
    nbd_aio_pwrite:
        unsafe extern "C" fn(Handle, *const c_void, usize, u64, CompletionCallback, u32) -> i64,
}

impl Lib {
    fn load() -> Result<Lib, String> {
        let l = load_library("libnbd.so.0", "libnbd0")?;
        // SAFETY: each type below is the function's signature in libnbd.h.
        unsafe {
            Ok(Lib {
                nbd_create: symbol(l, "nbd_create")?,
                nbd_close: symbol(l, "nbd_close")?,
                nbd_get_error: symbol(l, "nbd_get_error")?,
                nbd_connect_uri: symbol(l, "nbd_connect_uri")?,
                nbd_set_pread_initialize: symbol(l, "nbd_set_pread_initialize")?,
                nbd_get_size: symbol(l, "nbd_get_size")?,
                nbd_poll: symbol(l, "nbd_poll")?,
                nbd_aio_pread: symbol(l, "nbd_aio_pread")?,
                nbd_aio_pwrite: symbol(l, "nbd_aio_pwrite")?,
            })
        }
    }

    /// libnbd's last error on this thread.
    fn error(&self) -> String {
        // SAFETY: a thread-local string or null, copied at once.
        unsafe {
            let p = (self.nbd_get_error)();
            if p.is_null() {
                "unknown libnbd error".into()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }
}

/// A connected handle, closed on drop.
struct Conn {
    lib: Lib,
    h: Handle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: live handle with no command in flight (the run waits for every one).
        unsafe { (self.lib.nbd_close)(self.h) }
    }
}

thread_local! {
    /// Commands completed during the current `nbd_poll`: (slot, errno). libnbd runs the
    /// callbacks on the polling thread, which is the only one using the handle.
    static DONE: RefCell<Vec<(usize, c_int)>> = const { RefCell::new(Vec::new()) };
}

unsafe extern "C" fn on_complete(user_data: *mut c_void, error: *mut c_int) -> c_int {
    // SAFETY: error points to libnbd's int for this call; user_data carries the slot number.
    let errno = unsafe { *error };
    DONE.with(|d| d.borrow_mut().push((user_data as usize, errno)));
    // Retire the command: nobody calls nbd_aio_command_completed.
    1
}

/// Runs the pattern on the export at `uri`, `depth` requests of `bs` bytes in flight over the
/// first `region` bytes, for `duration`.
pub fn run(
    uri: &str,
    pattern: Pattern,
    bs: usize,
    depth: usize,
    region: u64,
    duration: Duration,
    client_cpu: Option<usize>,
) -> Result<FairFigures, String> {
    let lib = Lib::load()?;
    let depth = depth.max(1);
    // Declared before the connection, so that they outlive it even on an early return.
    let mut bufs: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::new(bs)).collect();
    let c_uri = CString::new(uri).map_err(|_| "the URI contains a NUL byte".to_string())?;
    // SAFETY: no preconditions.
    let h = unsafe { (lib.nbd_create)() };
    if h.is_null() {
        return Err(format!("nbd_create: {}", lib.error()));
    }
    let conn = Conn { lib, h };
    // SAFETY: live, unconnected handle; the URI is NUL-terminated.
    unsafe { (lib.nbd_set_pread_initialize)(h, false) };
    // SAFETY: as above.
    if unsafe { (lib.nbd_connect_uri)(h, c_uri.as_ptr()) } == -1 {
        return Err(lib.error());
    }
    // SAFETY: live, connected handle.
    let size = unsafe { (lib.nbd_get_size)(h) };
    if size < 0 {
        return Err(format!("size: {}", lib.error()));
    }
    let region = region.min(size as u64);
    if region < bs as u64 {
        return Err(format!("block size {bs} is larger than the region"));
    }
    let writing = matches!(pattern, Pattern::Write | Pattern::Randwrite);
    let mut sent = vec![Instant::now(); depth];
    let mut walk = Walk::new(pattern, bs, region);
    let mut tally = Tally::default();
    let mut seq = 0u64;
    DONE.with(|d| d.borrow_mut().clear());
    // Connected: only the submitting thread keeps to the client CPU (`--client-cpu`).
    let _pin = super::cpu::pin_here(client_cpu)?;
    let meter = super::usage::Meter::start();
    let started = Instant::now();
    let deadline = started + duration;
    let mut submit = |slot: usize, bufs: &mut [AlignedBuf], sent: &mut [Instant]| {
        let offset = walk.offset();
        if writing {
            seq += 1;
            refill(bufs[slot].as_mut_slice(), seq);
        }
        let cb = CompletionCallback {
            callback: Some(on_complete),
            user_data: slot as *mut c_void,
            free: None,
        };
        sent[slot] = Instant::now();
        let buf = bufs[slot].ptr() as *mut c_void;
        // SAFETY: live handle; the slot's buffer is valid for bs bytes and left alone until
        // its completion is reported.
        let r = unsafe {
            if writing {
                (lib.nbd_aio_pwrite)(conn.h, buf, bs, offset, cb, 0)
            } else {
                (lib.nbd_aio_pread)(conn.h, buf, bs, offset, cb, 0)
            }
        };
        if r == -1 {
            return Err(lib.error());
        }
        Ok(())
    };
    for slot in 0..depth {
        tally.submitted(submit(slot, &mut bufs, &mut sent));
    }
    let mut batch = Vec::with_capacity(depth);
    let mut idle_since = Instant::now();
    while tally.in_flight > 0 {
        // SAFETY: live handle, used by this thread only.
        if unsafe { (lib.nbd_poll)(conn.h, 1000) } == -1 {
            return Err(format!("poll: {}", lib.error()));
        }
        DONE.with(|d| std::mem::swap(&mut *d.borrow_mut(), &mut batch));
        if batch.is_empty() {
            if idle_since.elapsed() > Duration::from_secs(30) {
                return Err("no reply from the server for 30 s".into());
            }
            continue;
        }
        let now = Instant::now();
        idle_since = now;
        for &(slot, errno) in &batch {
            if errno == 0 {
                tally.succeeded(bs as u64, now.duration_since(sent[slot]));
            } else {
                tally.failed(Some(std::io::Error::from_raw_os_error(errno).to_string()));
            }
            if now < deadline {
                tally.submitted(submit(slot, &mut bufs, &mut sent));
            }
        }
        batch.clear();
    }
    let elapsed = started.elapsed();
    tally.figures(elapsed, meter)
}
