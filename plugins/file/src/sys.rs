//! The system calls the file plugin needs that std does not offer: O_DIRECT alignment from
//! `statx`, block-device sizes, `fallocate` modes, vectored positioned I/O.

use std::io;
use std::os::fd::RawFd;

/// `STATX_DIOALIGN`: ask for O_DIRECT alignment (Linux 6.1+).
const STATX_DIOALIGN: u32 = 0x2000;

/// The kernel's `struct statx` (256 bytes), as far as we read it.
#[repr(C)]
struct Statx {
    mask: u32,
    blksize: u32,
    attributes: u64,
    nlink: u32,
    uid: u32,
    gid: u32,
    mode: u16,
    _pad0: u16,
    ino: u64,
    size: u64,
    blocks: u64,
    attributes_mask: u64,
    times: [u8; 64],
    rdev_major: u32,
    rdev_minor: u32,
    dev_major: u32,
    dev_minor: u32,
    mnt_id: u64,
    dio_mem_align: u32,
    dio_offset_align: u32,
    _spare: [u64; 12],
}

/// O_DIRECT alignment of an open file: (memory, offset), if the kernel and filesystem say.
pub fn dio_alignment(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: Statx is plain integers; all-zero is a valid value.
    let mut st: Statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: statx with AT_EMPTY_PATH on our fd writes at most sizeof(struct statx) = 256
    // bytes, the size of `st`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_statx,
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut st as *mut Statx,
        )
    };
    if rc != 0 || st.mask & STATX_DIOALIGN == 0 || st.dio_offset_align == 0 {
        return None;
    }
    Some((st.dio_mem_align.max(1), st.dio_offset_align))
}

/// `BLKGETSIZE64`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// A block device's size and logical and physical sector sizes.
pub fn block_device_geometry(fd: RawFd) -> io::Result<(u64, u32, u32)> {
    let mut size = 0u64;
    let (mut logical, mut physical) = (0 as libc::c_int, 0 as libc::c_int);
    // SAFETY: each ioctl writes one integer of the type given to it.
    unsafe {
        if libc::ioctl(fd, BLKGETSIZE64, &mut size) != 0
            || libc::ioctl(fd, libc::BLKSSZGET, &mut logical) != 0
            || libc::ioctl(fd, libc::BLKPBSZGET, &mut physical) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((size, logical as u32, physical as u32))
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA` / `SEEK_HOLE`: `Ok(None)` when the kernel
/// answers ENXIO (no data at or after `offset`). Only the returned position is used: the
/// plugin's I/O is positional, so moving the file offset disturbs nothing.
pub fn seek(fd: RawFd, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Reads into every iovec from `offset` until all are full, retrying EINTR and short reads.
/// A read past the end of the file is an error (the host checked the disk's size, so it means
/// the file shrank under us).
pub fn preadv_all(fd: RawFd, iov: &[libc::iovec], offset: u64) -> io::Result<()> {
    rw_all(iov, offset, |v, n, off| {
        // SAFETY: v points at n iovecs naming buffers valid for writes (the caller's).
        unsafe { libc::preadv(fd, v, n, off) }
    })
}

/// Writes every iovec at `offset`, retrying EINTR and short writes.
pub fn pwritev_all(fd: RawFd, iov: &[libc::iovec], offset: u64) -> io::Result<()> {
    rw_all(iov, offset, |v, n, off| {
        // SAFETY: v points at n iovecs naming buffers valid for reads (the caller's).
        unsafe { libc::pwritev(fd, v, n, off) }
    })
}

/// Most iovecs per call (IOV_MAX on Linux).
const IOV_MAX: usize = 1024;

fn rw_all(
    iov: &[libc::iovec],
    offset: u64,
    call: impl Fn(*const libc::iovec, libc::c_int, libc::off_t) -> isize,
) -> io::Result<()> {
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    let first = call(
        iov.as_ptr(),
        iov.len().min(IOV_MAX) as libc::c_int,
        offset as libc::off_t,
    );
    if first >= 0 && first as usize == total {
        return Ok(());
    }
    // Rare: a short transfer or an interruption. Walk a private copy of the list.
    let mut rest: Vec<libc::iovec> = iov.to_vec();
    let mut done = 0usize;
    let mut result = first;
    loop {
        if result < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else if result == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image file ended early",
            ));
        } else {
            let mut n = result as usize;
            done += n;
            while n > 0 {
                let head = &mut rest[0];
                if n >= head.iov_len {
                    n -= head.iov_len;
                    rest.remove(0);
                } else {
                    // SAFETY: advancing within the same buffer, by less than its length.
                    head.iov_base = unsafe { (head.iov_base as *mut u8).add(n) }.cast();
                    head.iov_len -= n;
                    n = 0;
                }
            }
        }
        if done == total {
            return Ok(());
        }
        result = call(
            rest.as_ptr(),
            rest.len().min(IOV_MAX) as libc::c_int,
            (offset + done as u64) as libc::off_t,
        );
    }
}

/// `statfs` magic numbers of the filesystems that keep files in memory only.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Whether the open file lives on tmpfs or ramfs: reading and writing it copies memory and
/// never waits on a device.
pub fn on_memory_fs(fd: RawFd) -> bool {
    // SAFETY: statfs is plain integers; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one struct statfs into `st`.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}
