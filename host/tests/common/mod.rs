//! Shared by the host's integration tests: an in-memory disk to serve.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use xen_disk_host::plugin::GuardedDisk;
use xen_disk_plugin_api::{Disk, DiskInfo, ReadBufs, Result, WriteBufs};

/// A disk held in memory, with a volatile "cache" to flush.
pub struct Ram(Mutex<Vec<u8>>);

impl Disk for Ram {
    fn info(&self) -> DiskInfo {
        DiskInfo::new(self.0.lock().unwrap().len() as u64).flush(true)
    }
    fn read(&self, o: u64, b: &mut ReadBufs<'_>) -> Result<()> {
        b.copy_from(&self.0.lock().unwrap()[o as usize..][..b.len()]);
        Ok(())
    }
    fn write(&self, o: u64, b: &WriteBufs<'_>) -> Result<()> {
        b.copy_to(&mut self.0.lock().unwrap()[o as usize..][..b.len()]);
        Ok(())
    }
}

/// A guarded in-memory disk of `size` bytes.
pub fn ram_disk(size: u64) -> Arc<GuardedDisk> {
    Arc::new(GuardedDisk::new(Box::new(Ram(Mutex::new(vec![0; size as usize]))), false).unwrap())
}
