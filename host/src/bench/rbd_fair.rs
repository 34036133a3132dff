//! The fair RBD reference: a small client of librbd's asynchronous C API (`rbd_aio_read` /
//! `rbd_aio_write`) on the same image as the `ceph-rbd` disk, with as many requests in flight
//! as the plugin has, the same block size, walk, region and duration, and new data in every
//! write buffer (see [`super::fair`]). Where `rbd bench` writes one prepared buffer whose
//! checksum its messenger keeps, this client pays what the plugin pays for a guest's data.
//!
//! It opens the cluster as the plugin's configuration says (`pool`, `image`, `conf`, `id`,
//! `keyring`, `non-blocking-aio`, `io-timeout`, with the defaults the plugin declares), and
//! sends one flush before a write pattern, as the ring bench's guest does (librbd's cache
//! stays write-through until it sees one). librbd and librados are loaded at run time, so the
//! host builds and runs where they are not installed.

use super::direct::Pattern;
use super::fair::{
    load_library, refill, symbol, AlignedBuf, Completions, FairFigures, Tally, Walk,
};
use std::ffi::{c_char, c_int, c_void, CString};
use std::ptr;
use std::time::{Duration, Instant};
use xen_disk_plugin_api::Config;

type Handle = *mut c_void;
type Callback = unsafe extern "C" fn(c: Handle, arg: *mut c_void);

/// The librados / librbd functions used, with their C signatures (Ceph 16's headers).
#[derive(Clone, Copy)]
struct Lib {
    rados_create: unsafe extern "C" fn(*mut Handle, *const c_char) -> c_int,
    rados_conf_read_file: unsafe extern "C" fn(Handle, *const c_char) -> c_int,
    rados_conf_set: unsafe extern "C" fn(Handle, *const c_char, *const c_char) -> c_int,
    rados_connect: unsafe extern "C" fn(Handle) -> c_int,
    rados_shutdown: unsafe extern "C" fn(Handle),
    rados_ioctx_create: unsafe extern "C" fn(Handle, *const c_char, *mut Handle) -> c_int,
    rados_ioctx_destroy: unsafe extern "C" fn(Handle),
    rbd_open: unsafe extern "C" fn(Handle, *const c_char, *mut Handle, *const c_char) -> c_int,
    rbd_close: unsafe extern "C" fn(Handle) -> c_int,
    rbd_get_size: unsafe extern "C" fn(Handle, *mut u64) -> c_int,
    rbd_flush: unsafe extern "C" fn(Handle) -> c_int,
    rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Option<Callback>, *mut Handle) -> c_int,
    rbd_aio_get_return_value: unsafe extern "C" fn(Handle) -> isize,
    rbd_aio_release: unsafe extern "C" fn(Handle),
    rbd_aio_read: unsafe extern "C" fn(Handle, u64, usize, *mut c_char, Handle) -> c_int,
    rbd_aio_write: unsafe extern "C" fn(Handle, u64, usize, *const c_char, Handle) -> c_int,
}

impl Lib {
    fn load() -> Result<Lib, String> {
        let rados = load_library("librados.so.2", "librados2")?;
        let rbd = load_library("librbd.so.1", "librbd1")?;
        // SAFETY: each type below is the function's signature in librados.h / librbd.h.
        unsafe {
            Ok(Lib {
                rados_create: symbol(rados, "rados_create")?,
                rados_conf_read_file: symbol(rados, "rados_conf_read_file")?,
                rados_conf_set: symbol(rados, "rados_conf_set")?,
                rados_connect: symbol(rados, "rados_connect")?,
                rados_shutdown: symbol(rados, "rados_shutdown")?,
                rados_ioctx_create: symbol(rados, "rados_ioctx_create")?,
                rados_ioctx_destroy: symbol(rados, "rados_ioctx_destroy")?,
                rbd_open: symbol(rbd, "rbd_open")?,
                rbd_close: symbol(rbd, "rbd_close")?,
                rbd_get_size: symbol(rbd, "rbd_get_size")?,
                rbd_flush: symbol(rbd, "rbd_flush")?,
                rbd_aio_create_completion: symbol(rbd, "rbd_aio_create_completion")?,
                rbd_aio_get_return_value: symbol(rbd, "rbd_aio_get_return_value")?,
                rbd_aio_release: symbol(rbd, "rbd_aio_release")?,
                rbd_aio_read: symbol(rbd, "rbd_aio_read")?,
                rbd_aio_write: symbol(rbd, "rbd_aio_write")?,
            })
        }
    }
}

/// The open cluster, pool and image, closed in reverse order.
struct Image {
    lib: Lib,
    cluster: Handle,
    ioctx: Handle,
    image: Handle,
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: each handle is live or null, released once, image before ioctx before
        // cluster; no operation is in flight (the run waits for every one).
        unsafe {
            if !self.image.is_null() {
                (self.lib.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.lib.rados_shutdown)(self.cluster);
            }
        }
    }
}

fn cstr(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

fn errno_text(r: c_int) -> String {
    let e = std::io::Error::from_raw_os_error(-r);
    e.to_string()
}

impl Image {
    fn open(config: &Config) -> Result<Image, String> {
        let key = |k: &str| config.value(k).and_then(|v| v.as_str()).map(str::to_string);
        let name = key("image").ok_or("needs the ceph-rbd configuration (-c image=...)")?;
        if key("snapshot").is_some() {
            return Err("the reference writes, so it cannot run on a snapshot".into());
        }
        // With the plugin's defaults filled in (`bench` passes them).
        let pool = config.str("pool").map_err(|e| e.to_string())?.to_string();
        let non_blocking = config.bool("non-blocking-aio").map_err(|e| e.to_string())?;
        // The plugin's operation timeout too: librados then keeps a timer per operation on
        // both sides, as any client that must not hang on a dead OSD does.
        let io_timeout = config.u64("io-timeout").map_err(|e| e.to_string())?;
        let lib = Lib::load()?;
        let mut img = Image {
            lib,
            cluster: ptr::null_mut(),
            ioctx: ptr::null_mut(),
            image: ptr::null_mut(),
        };
        let id = key("id").map(|s| cstr("id", &s)).transpose()?;
        // SAFETY: cluster receives the handle; id is NUL-terminated or null ("admin").
        let r = unsafe {
            (lib.rados_create)(
                &mut img.cluster,
                id.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            )
        };
        if r < 0 {
            img.cluster = ptr::null_mut();
            return Err(format!("rados_create: {}", errno_text(r)));
        }
        let conf = key("conf").map(|s| cstr("conf", &s)).transpose()?;
        // SAFETY: live, unconnected cluster; the path is NUL-terminated or null (search).
        let r = unsafe {
            (lib.rados_conf_read_file)(
                img.cluster,
                conf.as_ref().map_or(ptr::null(), |s| s.as_ptr()),
            )
        };
        if r < 0 {
            return Err(format!("reading ceph.conf: {}", errno_text(r)));
        }
        let mut settings = vec![
            ("log_to_stderr", "false".to_string()),
            ("err_to_stderr", "false".to_string()),
            ("rbd_non_blocking_aio", non_blocking.to_string()),
            ("rados_osd_op_timeout", io_timeout.to_string()),
        ];
        if let Some(k) = key("keyring") {
            settings.push(("keyring", k));
        }
        for (k, v) in settings {
            let (ck, cv) = (cstr(k, k)?, cstr(k, &v)?);
            // SAFETY: live, unconnected cluster; both strings NUL-terminated.
            let r = unsafe { (lib.rados_conf_set)(img.cluster, ck.as_ptr(), cv.as_ptr()) };
            if r < 0 {
                return Err(format!("setting {k}={v}: {}", errno_text(r)));
            }
        }
        // SAFETY: live, configured cluster.
        let r = unsafe { (lib.rados_connect)(img.cluster) };
        if r < 0 {
            return Err(format!("cannot connect to the cluster: {}", errno_text(r)));
        }
        let c_pool = cstr("pool", &pool)?;
        // SAFETY: connected cluster; NUL-terminated pool name; ioctx receives the context.
        let r = unsafe { (lib.rados_ioctx_create)(img.cluster, c_pool.as_ptr(), &mut img.ioctx) };
        if r < 0 {
            img.ioctx = ptr::null_mut();
            return Err(format!("pool `{pool}`: {}", errno_text(r)));
        }
        let c_name = cstr("image", &name)?;
        // SAFETY: live ioctx; NUL-terminated name; null snapshot: the image head.
        let r = unsafe { (lib.rbd_open)(img.ioctx, c_name.as_ptr(), &mut img.image, ptr::null()) };
        if r < 0 {
            img.image = ptr::null_mut();
            return Err(format!("image `{pool}/{name}`: {}", errno_text(r)));
        }
        Ok(img)
    }

    fn size(&self) -> Result<u64, String> {
        let mut size = 0;
        // SAFETY: live image; size is a valid out pointer.
        let r = unsafe { (self.lib.rbd_get_size)(self.image, &mut size) };
        if r < 0 {
            return Err(format!("size: {}", errno_text(r)));
        }
        Ok(size)
    }
}

/// Completions reported by librbd's finisher thread to the submitting thread: slot and
/// librbd's return value.
type Completed = Completions<(usize, isize)>;

/// One slot's completion argument: where to report, and which slot.
struct SlotArg {
    completed: *const Completed,
    slot: usize,
    lib: Lib,
}

unsafe extern "C" fn on_complete(c: Handle, arg: *mut c_void) {
    // SAFETY: arg is a SlotArg that `run` keeps alive (boxed, never moved) until every
    // operation has completed, and `completed` with it; c is this operation's completion,
    // released here once and not used again.
    let (a, r) = unsafe {
        let a = &*(arg as *const SlotArg);
        let r = (a.lib.rbd_aio_get_return_value)(c);
        (a.lib.rbd_aio_release)(c);
        (a, r)
    };
    // SAFETY: as above.
    unsafe { &*a.completed }.push((a.slot, r));
}

/// Runs the pattern on the image the `ceph-rbd` configuration names, `depth` requests of
/// `bs` bytes in flight over the first `region` bytes, for `duration`.
pub fn run(
    config: &Config,
    pattern: Pattern,
    bs: usize,
    depth: usize,
    region: u64,
    duration: Duration,
    client_cpu: Option<usize>,
) -> Result<FairFigures, String> {
    let img = Image::open(config)?;
    // After the open: librbd's own threads, started by it, stay free; only the submitting
    // thread keeps to the client CPU (`--client-cpu`).
    let _pin = super::cpu::pin_here(client_cpu)?;
    let lib = img.lib;
    let region = region.min(img.size()?);
    if region < bs as u64 {
        return Err(format!("block size {bs} is larger than the region"));
    }
    let writing = matches!(pattern, Pattern::Write | Pattern::Randwrite);
    if writing {
        // SAFETY: live image.
        let r = unsafe { (lib.rbd_flush)(img.image) };
        if r < 0 {
            return Err(format!("the first flush failed: {}", errno_text(r)));
        }
    }
    let depth = depth.max(1);
    let completed = Completed::default();
    let args: Vec<Box<SlotArg>> = (0..depth)
        .map(|slot| {
            Box::new(SlotArg {
                completed: &completed,
                slot,
                lib,
            })
        })
        .collect();
    let mut bufs: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::new(bs)).collect();
    let mut sent = vec![Instant::now(); depth];
    let mut walk = Walk::new(pattern, bs, region);
    let mut tally = Tally::default();
    let mut seq = 0u64;
    let meter = super::usage::Meter::start();
    let started = Instant::now();
    let deadline = started + duration;
    // Starts one request in `slot`; librbd's error when it refused it.
    let mut submit = |slot: usize, bufs: &mut [AlignedBuf], sent: &mut [Instant]| {
        let offset = walk.offset();
        if writing {
            seq += 1;
            refill(bufs[slot].as_mut_slice(), seq);
        }
        let mut c = ptr::null_mut();
        let arg = &*args[slot] as *const SlotArg as *mut c_void;
        // SAFETY: arg outlives the operation (see on_complete); c receives the completion.
        let r = unsafe { (lib.rbd_aio_create_completion)(arg, Some(on_complete), &mut c) };
        if r < 0 {
            return Err(errno_text(r));
        }
        sent[slot] = Instant::now();
        let buf = bufs[slot].ptr() as *mut c_char;
        // SAFETY: live image and completion; the slot's buffer is valid for bs bytes and
        // left alone until its completion is reported.
        let r = unsafe {
            if writing {
                (lib.rbd_aio_write)(img.image, offset, bs, buf, c)
            } else {
                (lib.rbd_aio_read)(img.image, offset, bs, buf, c)
            }
        };
        if r < 0 {
            // SAFETY: librbd did not take the completion: released once, here.
            unsafe { (lib.rbd_aio_release)(c) };
            return Err(errno_text(r));
        }
        Ok(())
    };
    for slot in 0..depth {
        tally.submitted(submit(slot, &mut bufs, &mut sent));
    }
    let mut batch = Vec::with_capacity(depth);
    while tally.in_flight > 0 {
        // No stall limit: the boxed arguments and `completed` live on this stack frame, so
        // it cannot return while librbd may still call back.
        completed.take(&mut batch, None);
        let now = Instant::now();
        for &(slot, r) in &batch {
            if r >= 0 && (writing || r as usize == bs) {
                let moved = if writing { bs as u64 } else { r as u64 };
                tally.succeeded(moved, now.duration_since(sent[slot]));
            } else {
                tally.failed((r < 0).then(|| errno_text(r as c_int)));
            }
            if now < deadline {
                tally.submitted(submit(slot, &mut bufs, &mut sent));
            }
        }
        batch.clear();
    }
    let elapsed = started.elapsed();
    drop(args);
    tally.figures(elapsed, meter)
}
