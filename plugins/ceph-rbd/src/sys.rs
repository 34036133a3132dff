//! The few librados / librbd C functions the plugin calls, declared by hand from Debian's
//! `rados/librados.h` and `rbd/librbd.h` (Ceph 16.2). Every handle is an opaque pointer and
//! no struct crosses the boundary except `struct iovec` (libc's), so there is no layout to
//! keep in sync beyond the tests below.

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_void, iovec, size_t, ssize_t};

/// `rados_t`: a cluster handle.
pub type rados_t = *mut c_void;
/// `rados_ioctx_t`: an I/O context bound to one pool.
pub type rados_ioctx_t = *mut c_void;
/// `rbd_image_t`: an open image.
pub type rbd_image_t = *mut c_void;
/// `rbd_completion_t`: one asynchronous operation's completion.
pub type rbd_completion_t = *mut c_void;
/// `rbd_callback_t`: called by librbd's completion thread when an operation ends.
pub type rbd_callback_t = Option<unsafe extern "C" fn(cb: rbd_completion_t, arg: *mut c_void)>;
/// `rbd_update_callback_t`: called when the image header changes (resize, snapshots...).
pub type rbd_update_callback_t = Option<unsafe extern "C" fn(arg: *mut c_void)>;

#[link(name = "rados")]
extern "C" {
    pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_conf_get(
        cluster: rados_t,
        option: *const c_char,
        buf: *mut c_char,
        len: size_t,
    ) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
}

#[link(name = "rbd")]
extern "C" {
    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub fn rbd_update_watch(
        image: rbd_image_t,
        handle: *mut u64,
        watch_cb: rbd_update_callback_t,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_update_unwatch(image: rbd_image_t, handle: u64) -> c_int;

    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_wait_for_complete(c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> ssize_t;
    pub fn rbd_aio_release(c: rbd_completion_t);

    pub fn rbd_aio_readv(
        image: rbd_image_t,
        iov: *const iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_writev(
        image: rbd_image_t,
        iov: *const iovec,
        iovcnt: c_int,
        off: u64,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};
    use xen_disk_plugin_api::RawBuf;

    /// The guest's buffer list is handed to `rbd_aio_readv`/`writev` as `struct iovec`s
    /// without a copy, so `RawBuf` must have exactly iovec's layout.
    #[test]
    fn raw_buf_is_an_iovec() {
        assert_eq!(size_of::<RawBuf>(), size_of::<iovec>());
        assert_eq!(align_of::<RawBuf>(), align_of::<iovec>());
        assert_eq!(offset_of!(RawBuf, base), offset_of!(iovec, iov_base));
        assert_eq!(offset_of!(RawBuf, len), offset_of!(iovec, iov_len));
        assert_eq!(size_of::<iovec>(), 16, "x86_64 struct iovec");
    }

    /// The handles are C `void *`; the callbacks are nullable function pointers.
    #[test]
    fn handles_are_pointers() {
        assert_eq!(size_of::<rados_t>(), size_of::<*mut c_void>());
        assert_eq!(size_of::<rbd_callback_t>(), size_of::<*mut c_void>());
        assert_eq!(size_of::<rbd_update_callback_t>(), size_of::<*mut c_void>());
    }
}
