//! `/dev/xen/gntdev`: mapping a guest's granted pages on a real Xen dom0.
//!
//! Map: `IOCTL_GNTDEV_MAP_GRANT_REF` with the (domid, ref) pairs returns an offset into the
//! device; `mmap` of the device at that offset maps the pages (a failing reference fails the
//! whole batch). Unmap: `munmap`, then `IOCTL_GNTDEV_UNMAP_GRANT_REF` with the same offset.
//! Numbers and layouts from `docs/protocol.md#gntdev`, checked against the kernel's UAPI header
//! by `host/tests/linux_ioctls_vs_c.rs`.

use crate::xen::grant::{GrantCopy, GrantError, GrantMapper, GrantMapping, Unmap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// The device.
pub const GNTDEV: &str = "/dev/xen/gntdev";
/// `_IOC(_IOC_NONE, 'G', 0, sizeof(struct ioctl_gntdev_map_grant_ref))`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: libc::c_ulong = 0x0018_4700;
/// `_IOC(_IOC_NONE, 'G', 1, sizeof(struct ioctl_gntdev_unmap_grant_ref))`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: libc::c_ulong = 0x0010_4701;
/// `_IOC(_IOC_NONE, 'G', 8, sizeof(struct ioctl_gntdev_grant_copy))`.
pub const IOCTL_GNTDEV_GRANT_COPY: libc::c_ulong = 0x0010_4708;

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct GrantRef {
    /// The granting domain.
    pub domid: u32,
    /// The reference.
    pub gref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` with room for `N` references (the kernel reads
/// `count` of them).
#[repr(C)]
pub struct MapGrantRef<const N: usize> {
    /// Number of references.
    pub count: u32,
    /// Padding.
    pub pad: u32,
    /// Out: the offset to mmap at.
    pub index: u64,
    /// The references.
    pub refs: [GrantRef; N],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
pub struct UnmapGrantRef {
    /// The offset the map returned.
    pub index: u64,
    /// Number of pages.
    pub count: u32,
    /// Padding.
    pub pad: u32,
}

/// `GNTCOPY_source_gref`: the source is a grant reference.
pub const GNTCOPY_SOURCE_GREF: u16 = 1;
/// `GNTCOPY_dest_gref`: the destination is a grant reference.
pub const GNTCOPY_DEST_GREF: u16 = 2;

/// `struct gntdev_grant_copy_segment` (24 bytes): `source` and `dest` are each either a
/// local address (u64) or `{ref u32, offset u16, domid u16}`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct GrantCopySegment {
    /// Source: a virtual address or a foreign reference.
    pub source: [u32; 2],
    /// Destination: a virtual address or a foreign reference.
    pub dest: [u32; 2],
    /// Bytes.
    pub len: u16,
    /// GNTCOPY_* flags.
    pub flags: u16,
    /// Out: GNTST_*.
    pub status: i16,
    /// Padding.
    pub pad: u16,
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
pub struct IoctlGrantCopy {
    /// Segments.
    pub count: u32,
    /// Padding.
    pub pad: u32,
    /// The segment array.
    pub segments: *mut GrantCopySegment,
}

fn foreign(gref: u32, offset: u16, domid: u32) -> [u32; 2] {
    [gref, u32::from(offset) | (domid << 16)]
}

fn local(p: *mut u8) -> [u32; 2] {
    let a = p as u64;
    [a as u32, (a >> 32) as u32]
}

/// The open device.
pub struct Gntdev {
    fd: OwnedFd,
}

/// Pages per mapping call served from the stack (a direct request has at most 11 segments).
const INLINE: usize = 16;
const PAGE: usize = 4096;

impl Gntdev {
    /// Opens the device; without Xen, one clear error.
    pub fn open() -> Result<Arc<Gntdev>, GrantError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(GNTDEV)
            .map_err(|e| {
                GrantError::System(format!("{GNTDEV}: {e} (not a Xen dom0? use --sim)"))
            })?;
        Ok(Arc::new(Gntdev { fd: file.into() }))
    }

    fn map_ioctl<const N: usize>(&self, domid: u32, refs: &[u32]) -> Result<u64, GrantError> {
        let mut arg = MapGrantRef::<N> {
            count: refs.len() as u32,
            pad: 0,
            index: 0,
            refs: [GrantRef::default(); N],
        };
        for (slot, &gref) in arg.refs.iter_mut().zip(refs) {
            *slot = GrantRef { domid, gref };
        }
        // SAFETY: arg is a live MapGrantRef with `count` ≤ N references; the kernel writes index.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_GNTDEV_MAP_GRANT_REF, &mut arg) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(GrantError::BadRef {
                domid,
                gref: refs[0],
                why: format!("gntdev map: {e}"),
            });
        }
        Ok(arg.index)
    }

    fn unmap_ioctl(&self, index: u64, count: usize) {
        let mut arg = UnmapGrantRef {
            index,
            count: count as u32,
            pad: 0,
        };
        // SAFETY: a live UnmapGrantRef for an index the map returned.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg) };
    }
}

impl Unmap for Gntdev {
    fn unmap(&self, base: *mut u8, len: usize, handle: u64) {
        // SAFETY: GrantMapping's contract: our live mapping, unmapped once.
        unsafe { libc::munmap(base.cast(), len) };
        self.unmap_ioctl(handle, len / PAGE);
    }
}

/// [`GrantMapper`] over gntdev.
pub struct LinuxGrants(pub Arc<Gntdev>);

impl GrantMapper for LinuxGrants {
    fn map(&self, domid: u32, refs: &[u32], writable: bool) -> Result<GrantMapping, GrantError> {
        if refs.is_empty() || refs.len() > 4096 {
            return Err(GrantError::System(format!(
                "{} references in one mapping",
                refs.len()
            )));
        }
        let index = if refs.len() <= INLINE {
            self.0.map_ioctl::<INLINE>(domid, refs)?
        } else {
            // Larger batches (indirect requests) build the argument on the heap.
            self.0.map_ioctl_dyn(domid, refs)?
        };
        let len = refs.len() * PAGE;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: maps the device region the ioctl just set up.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.0.fd.as_raw_fd(),
                index as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            self.0.unmap_ioctl(index, refs.len());
            return Err(GrantError::BadRef {
                domid,
                gref: refs[0],
                why: format!("gntdev mmap: {e}"),
            });
        }
        // SAFETY: a live mapping of len bytes that Gntdev::unmap undoes.
        Ok(unsafe { GrantMapping::new(base.cast(), len, index, self.0.clone()) })
    }

    unsafe fn copy(&self, domid: u32, ops: &mut [GrantCopy]) -> Result<(), GrantError> {
        // SAFETY: forwarded contract.
        unsafe { self.grant_copy(domid, ops) }
    }
}

impl LinuxGrants {
    /// GRANT_COPY for a batch (the kernel splits it into hypercalls of 16).
    ///
    /// # Safety
    /// As [`GrantMapper::copy`].
    unsafe fn grant_copy(&self, domid: u32, ops: &mut [GrantCopy]) -> Result<(), GrantError> {
        let mut segs: Vec<GrantCopySegment> = ops
            .iter()
            .map(|op| {
                let (source, dest, flags) = if op.to_guest {
                    (
                        local(op.local),
                        foreign(op.gref, op.offset, domid),
                        GNTCOPY_DEST_GREF,
                    )
                } else {
                    (
                        foreign(op.gref, op.offset, domid),
                        local(op.local),
                        GNTCOPY_SOURCE_GREF,
                    )
                };
                GrantCopySegment {
                    source,
                    dest,
                    len: op.len,
                    flags,
                    status: 0,
                    pad: 0,
                }
            })
            .collect();
        let mut arg = IoctlGrantCopy {
            count: segs.len() as u32,
            pad: 0,
            segments: segs.as_mut_ptr(),
        };
        // SAFETY: arg points at `count` live segments; the kernel writes their status.
        if unsafe { libc::ioctl(self.0.fd.as_raw_fd(), IOCTL_GNTDEV_GRANT_COPY, &mut arg) } != 0 {
            return Err(GrantError::System(format!(
                "gntdev grant copy: {}",
                std::io::Error::last_os_error()
            )));
        }
        // The ioctl succeeds even when segments fail: every status must be looked at.
        for (op, seg) in ops.iter_mut().zip(&segs) {
            op.status = seg.status;
        }
        Ok(())
    }
}

impl Gntdev {
    fn map_ioctl_dyn(&self, domid: u32, refs: &[u32]) -> Result<u64, GrantError> {
        // Header (count, pad, index) then the pairs, as u32 words.
        let mut words = vec![0u32; 4 + 2 * refs.len()];
        words[0] = refs.len() as u32;
        for (i, &gref) in refs.iter().enumerate() {
            words[4 + 2 * i] = domid;
            words[5 + 2 * i] = gref;
        }
        // SAFETY: words has the layout of MapGrantRef<refs.len()> (u32, u32, u64 as two u32
        // on a little-endian 8-aligned-enough buffer the kernel copies with copy_from_user).
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                IOCTL_GNTDEV_MAP_GRANT_REF,
                words.as_mut_ptr(),
            )
        } != 0
        {
            let e = std::io::Error::last_os_error();
            return Err(GrantError::BadRef {
                domid,
                gref: refs[0],
                why: format!("gntdev map: {e}"),
            });
        }
        Ok(u64::from(words[2]) | (u64::from(words[3]) << 32))
    }
}
