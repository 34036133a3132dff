//! The few libnbd (>= 1.14) functions this plugin calls, declared by hand from `libnbd.h`.
//!
//! libnbd handles are thread-safe: every call takes the handle's lock, so one handle may be
//! used by every worker thread at once.

use std::ffi::{c_char, c_int, c_uint, c_void};

/// An opaque `struct nbd_handle`.
#[repr(C)]
pub struct NbdHandle {
    _private: [u8; 0],
}

/// `nbd_completion_callback`: passed by value to every `nbd_aio_*` command.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CompletionCallback {
    /// Called once when the command completes (with the libnbd lock held); returning 1
    /// retires the command automatically.
    pub callback: Option<unsafe extern "C" fn(user_data: *mut c_void, error: *mut c_int) -> c_int>,
    /// Handed back to both functions.
    pub user_data: *mut c_void,
    /// Called exactly once when libnbd will not call `callback` again, also when the
    /// submitting call itself fails.
    pub free: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
}

/// `LIBNBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u32 = 0x01;
/// `LIBNBD_AIO_DIRECTION_READ`.
pub const AIO_DIRECTION_READ: c_uint = 1;
/// `LIBNBD_AIO_DIRECTION_WRITE`.
pub const AIO_DIRECTION_WRITE: c_uint = 2;
/// `LIBNBD_SIZE_MINIMUM`.
pub const SIZE_MINIMUM: c_int = 0;
/// `LIBNBD_SIZE_PREFERRED`.
pub const SIZE_PREFERRED: c_int = 1;

#[link(name = "nbd")]
extern "C" {
    pub fn nbd_create() -> *mut NbdHandle;
    pub fn nbd_close(h: *mut NbdHandle);
    pub fn nbd_get_error() -> *const c_char;
    pub fn nbd_get_errno() -> c_int;
    pub fn nbd_set_request_structured_replies(h: *mut NbdHandle, request: bool) -> c_int;
    pub fn nbd_set_pread_initialize(h: *mut NbdHandle, request: bool) -> c_int;
    pub fn nbd_aio_connect_uri(h: *mut NbdHandle, uri: *const c_char) -> c_int;
    pub fn nbd_poll(h: *mut NbdHandle, timeout_ms: c_int) -> c_int;
    pub fn nbd_aio_is_connecting(h: *mut NbdHandle) -> c_int;
    pub fn nbd_aio_is_ready(h: *mut NbdHandle) -> c_int;
    pub fn nbd_aio_is_dead(h: *mut NbdHandle) -> c_int;
    pub fn nbd_aio_is_closed(h: *mut NbdHandle) -> c_int;
    pub fn nbd_get_size(h: *mut NbdHandle) -> i64;
    pub fn nbd_get_block_size(h: *mut NbdHandle, size_type: c_int) -> i64;
    pub fn nbd_is_read_only(h: *mut NbdHandle) -> c_int;
    pub fn nbd_can_flush(h: *mut NbdHandle) -> c_int;
    pub fn nbd_can_fua(h: *mut NbdHandle) -> c_int;
    pub fn nbd_can_trim(h: *mut NbdHandle) -> c_int;
    pub fn nbd_can_zero(h: *mut NbdHandle) -> c_int;
    pub fn nbd_can_multi_conn(h: *mut NbdHandle) -> c_int;
    pub fn nbd_aio_pread(
        h: *mut NbdHandle,
        buf: *mut c_void,
        count: usize,
        offset: u64,
        cb: CompletionCallback,
        flags: u32,
    ) -> i64;
    pub fn nbd_aio_pwrite(
        h: *mut NbdHandle,
        buf: *const c_void,
        count: usize,
        offset: u64,
        cb: CompletionCallback,
        flags: u32,
    ) -> i64;
    pub fn nbd_get_tls_negotiated(h: *mut NbdHandle) -> c_int;
    pub fn nbd_get_structured_replies_negotiated(h: *mut NbdHandle) -> c_int;
    pub fn nbd_aio_flush(h: *mut NbdHandle, cb: CompletionCallback, flags: u32) -> i64;
    pub fn nbd_aio_trim(
        h: *mut NbdHandle,
        count: u64,
        offset: u64,
        cb: CompletionCallback,
        flags: u32,
    ) -> i64;
    pub fn nbd_aio_zero(
        h: *mut NbdHandle,
        count: u64,
        offset: u64,
        cb: CompletionCallback,
        flags: u32,
    ) -> i64;
    pub fn nbd_aio_get_fd(h: *mut NbdHandle) -> c_int;
    pub fn nbd_aio_get_direction(h: *mut NbdHandle) -> c_uint;
    pub fn nbd_aio_notify_read(h: *mut NbdHandle) -> c_int;
    pub fn nbd_aio_notify_write(h: *mut NbdHandle) -> c_int;
    pub fn nbd_aio_disconnect(h: *mut NbdHandle, flags: u32) -> c_int;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C struct is three pointers: two function pointers and `void *`, in that order.
    #[test]
    fn completion_callback_has_the_c_layout() {
        let ptr = std::mem::size_of::<*mut c_void>();
        assert_eq!(std::mem::size_of::<CompletionCallback>(), 3 * ptr);
        assert_eq!(std::mem::align_of::<CompletionCallback>(), ptr);
        assert_eq!(std::mem::offset_of!(CompletionCallback, callback), 0);
        assert_eq!(std::mem::offset_of!(CompletionCallback, user_data), ptr);
        assert_eq!(std::mem::offset_of!(CompletionCallback, free), 2 * ptr);
        // Option<fn> is a nullable pointer: `.callback = NULL` is None.
        assert_eq!(
            std::mem::size_of::<Option<unsafe extern "C" fn(*mut c_void)>>(),
            std::mem::size_of::<*mut c_void>()
        );
    }

    /// The library linked is the one declared: a fresh handle answers and closes.
    #[test]
    fn links_with_libnbd() {
        // SAFETY: nbd_create has no preconditions; the handle is closed once below.
        let h = unsafe { nbd_create() };
        assert!(!h.is_null());
        // SAFETY: h is a live handle from nbd_create.
        assert_eq!(unsafe { nbd_aio_is_ready(h) }, 0);
        // SAFETY: h is live and not used after this.
        unsafe { nbd_close(h) };
    }
}
