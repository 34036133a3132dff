//! Shared by the host's integration tests: an in-memory disk to serve.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;
use xen_disk_host::plugin::GuardedDisk;
use xen_disk_plugin_api::{Disk, DiskInfo, ReadBufs, Result, Submission, ThreadModel, WriteBufs};

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

/// An in-memory disk declaring [`ThreadModel::Async`]: each read or write is served and
/// completed a millisecond later on a thread of its own, when the ring thread that
/// submitted it has long gone to sleep.
pub struct AsyncRam(Arc<Ram>);

impl Disk for AsyncRam {
    fn info(&self) -> DiskInfo {
        self.0.info().thread_model(ThreadModel::Async)
    }
    fn read(&self, o: u64, b: &mut ReadBufs<'_>) -> Result<()> {
        self.0.read(o, b)
    }
    fn write(&self, o: u64, b: &WriteBufs<'_>) -> Result<()> {
        self.0.write(o, b)
    }
    fn submit(&self, s: Submission) {
        let ram = self.0.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1));
            s.run_blocking(&*ram);
        });
    }
}

/// A guarded asynchronous in-memory disk of `size` bytes.
pub fn async_ram_disk(size: u64) -> Arc<GuardedDisk> {
    let ram = AsyncRam(Arc::new(Ram(Mutex::new(vec![0; size as usize]))));
    Arc::new(GuardedDisk::new(Box::new(ram), false).unwrap())
}

/// A guarded in-memory disk of `size` bytes.
pub fn ram_disk(size: u64) -> Arc<GuardedDisk> {
    Arc::new(GuardedDisk::new(Box::new(Ram(Mutex::new(vec![0; size as usize]))), false).unwrap())
}
