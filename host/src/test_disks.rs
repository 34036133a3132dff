//! Disks for the host's unit tests (registry, control and metrics tests need a device that
//! holds a disk, not what it stores).

/// A 1 MiB disk that stores nothing: reads leave the buffers as they are.
pub(crate) struct Blank;

impl xen_disk_plugin_api::Disk for Blank {
    fn info(&self) -> xen_disk_plugin_api::DiskInfo {
        xen_disk_plugin_api::DiskInfo::new(1 << 20)
    }
    fn read(
        &self,
        _: u64,
        _: &mut xen_disk_plugin_api::ReadBufs<'_>,
    ) -> xen_disk_plugin_api::Result<()> {
        Ok(())
    }
    fn write(
        &self,
        _: u64,
        _: &xen_disk_plugin_api::WriteBufs<'_>,
    ) -> xen_disk_plugin_api::Result<()> {
        Ok(())
    }
}
