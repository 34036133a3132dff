//! Executing one validated request against the guarded plugin disk, with the blkif
//! semantics of each operation, and mapping the outcome to a protocol status.
//!
//! - READ / WRITE: the segments, in order, at the request's byte offset.
//! - FLUSH_DISKCACHE: flush, then write the segments if there are any (Linux blkfront sends
//!   REQ_PREFLUSH writes this way: the flush orders everything before the data).
//! - WRITE_BARRIER: the caller has drained earlier requests; flush, then write the segments
//!   durably (Linux treats barrier as flush + FUA).
//! - DISCARD: the byte range.

use crate::blkif::abi::{RwOp, Status};
use crate::plugin::GuardedDisk;
use xen_disk_plugin_api::{ErrorKind, RawBuf, ReadBufs, WriteBufs};

/// What to do, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Fill the buffers from the disk.
    Read,
    /// Store the buffers.
    Write,
    /// Flush the cache, then store the buffers (if any).
    Flush,
    /// Flush, then store the buffers durably (earlier requests already drained).
    Barrier,
    /// Discard `len` bytes.
    Discard {
        /// Length in bytes.
        len: u64,
    },
}

impl From<RwOp> for IoOp {
    fn from(op: RwOp) -> IoOp {
        match op {
            RwOp::Read => IoOp::Read,
            RwOp::Write => IoOp::Write,
            RwOp::Barrier => IoOp::Barrier,
            RwOp::Flush => IoOp::Flush,
        }
    }
}

/// Runs `op` at byte `offset` with the request's buffers (the mapped guest segments).
///
/// # Safety
/// Every buffer must point at mapped guest memory valid for `len` bytes (writable for a
/// read) that nothing else accesses until this returns, except the guest itself.
pub unsafe fn execute(
    disk: &GuardedDisk,
    op: IoOp,
    offset: u64,
    bufs: &[RawBuf],
) -> Result<(), xen_disk_plugin_api::Error> {
    let write = |fua: bool| {
        // SAFETY: the caller's contract is WriteBufs::from_raw's contract.
        let bufs = unsafe { WriteBufs::from_raw(bufs) };
        disk.write(offset, &bufs, fua)
    };
    match op {
        IoOp::Read => {
            // SAFETY: the caller's contract is ReadBufs::from_raw's contract.
            let mut bufs = unsafe { ReadBufs::from_raw(bufs) };
            disk.read(offset, &mut bufs)
        }
        IoOp::Write => write(false),
        IoOp::Flush => {
            disk.flush()?;
            if bufs.is_empty() {
                Ok(())
            } else {
                write(false)
            }
        }
        IoOp::Barrier => {
            disk.flush()?;
            if bufs.is_empty() {
                Ok(())
            } else {
                write(true)
            }
        }
        IoOp::Discard { len } => disk.discard(offset, len),
    }
}

/// The protocol status for a result.
pub fn status_of(result: &Result<(), xen_disk_plugin_api::Error>) -> Status {
    match result {
        Ok(()) => Status::Okay,
        Err(e) if e.kind() == ErrorKind::Unsupported => Status::NotSupported,
        Err(_) => Status::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use xen_disk_plugin_api::{Disk, DiskInfo, Result};

    /// Records the calls it gets and stores data in memory.
    #[derive(Default)]
    struct Log(Arc<Mutex<Vec<String>>>, Arc<Mutex<Vec<u8>>>);
    impl Disk for Log {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20).flush(true)
        }
        fn read(&self, o: u64, b: &mut ReadBufs<'_>) -> Result<()> {
            self.0.lock().unwrap().push(format!("read {o}+{}", b.len()));
            b.copy_from(&self.1.lock().unwrap()[o as usize..][..b.len()]);
            Ok(())
        }
        fn write(&self, o: u64, b: &WriteBufs<'_>) -> Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("write {o}+{}", b.len()));
            b.copy_to(&mut self.1.lock().unwrap()[o as usize..][..b.len()]);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            self.0.lock().unwrap().push("flush".into());
            Ok(())
        }
    }

    #[test]
    fn operations_map_to_plugin_calls_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let data = Arc::new(Mutex::new(vec![0u8; 1 << 20]));
        let disk = GuardedDisk::new(Box::new(Log(log.clone(), data.clone())), false).unwrap();
        let mut a = [1u8; 512];
        let mut b = [2u8; 1024];
        let bufs = [RawBuf::from_mut(&mut a), RawBuf::from_mut(&mut b)];
        // SAFETY: the buffers are local arrays, alive and unaliased for each call.
        unsafe {
            assert_eq!(
                status_of(&execute(&disk, IoOp::Write, 4096, &bufs)),
                Status::Okay
            );
            assert_eq!(
                status_of(&execute(&disk, IoOp::Flush, 0, &[])),
                Status::Okay
            );
            assert_eq!(
                status_of(&execute(&disk, IoOp::Flush, 8192, &bufs)),
                Status::Okay
            );
            assert_eq!(
                status_of(&execute(&disk, IoOp::Barrier, 0, &bufs)),
                Status::Okay
            );
            assert_eq!(
                status_of(&execute(&disk, IoOp::Discard { len: 512 }, 0, &[])),
                Status::NotSupported
            );
            assert_eq!(
                status_of(&execute(&disk, IoOp::Read, 1 << 20, &bufs)),
                Status::Error
            );
        }
        let got = log.lock().unwrap().clone();
        // The barrier's FUA write is write + flush on a disk without native FUA.
        assert_eq!(
            got,
            [
                "write 4096+1536",
                "flush",
                "flush",
                "write 8192+1536",
                "flush",
                "write 0+1536",
                "flush"
            ]
        );
        assert_eq!(&data.lock().unwrap()[4096..4096 + 512], &[1u8; 512][..]);
        assert_eq!(
            &data.lock().unwrap()[4096 + 512..4096 + 1536],
            &[2u8; 1024][..]
        );
        assert_eq!(Status::NotSupported.code(), -2);
    }
}
