//! `/dev/xen/evtchn`: event channels on a real Xen dom0.
//!
//! Each bound channel gets its own open of the device, so its descriptor polls readable for
//! that port alone. An event arrives masked: reading the pending port numbers and writing
//! the port back unmasks it. A queue overflow (EFBIG) is cleared with RESET. Numbers and
//! layouts from `docs/protocol.md#evtchn`, checked against the kernel's UAPI header.

use crate::xen::evtchn::{EventChannel, EventChannels, EvtchnError};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The device.
pub const EVTCHN: &str = "/dev/xen/evtchn";
/// `_IOC(_IOC_NONE, 'E', 1, sizeof(struct ioctl_evtchn_bind_interdomain))`.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: libc::c_ulong = 0x0008_4501;
/// `_IOC(_IOC_NONE, 'E', 3, sizeof(struct ioctl_evtchn_unbind))`.
pub const IOCTL_EVTCHN_UNBIND: libc::c_ulong = 0x0004_4503;
/// `_IOC(_IOC_NONE, 'E', 4, sizeof(struct ioctl_evtchn_notify))`.
pub const IOCTL_EVTCHN_NOTIFY: libc::c_ulong = 0x0004_4504;
/// `_IOC(_IOC_NONE, 'E', 5, 0)`.
pub const IOCTL_EVTCHN_RESET: libc::c_ulong = 0x0000_4505;

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
pub struct BindInterdomain {
    /// The other domain.
    pub remote_domain: u32,
    /// Its port.
    pub remote_port: u32,
}

/// `struct ioctl_evtchn_notify` / `ioctl_evtchn_unbind`.
#[repr(C)]
pub struct PortArg {
    /// Our port.
    pub port: u32,
}

/// [`EventChannels`] over `/dev/xen/evtchn`.
pub struct LinuxEventChannels;

/// One bound port on its own descriptor.
pub struct LinuxChannel {
    fd: OwnedFd,
    port: u32,
}

impl EventChannels for LinuxEventChannels {
    fn bind_interdomain(
        &self,
        remote_domid: u32,
        remote_port: u32,
    ) -> Result<Box<dyn EventChannel>, EvtchnError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(EVTCHN)
            .map_err(|e| EvtchnError(format!("{EVTCHN}: {e} (not a Xen dom0? use --sim)")))?;
        let fd: OwnedFd = file.into();
        let mut arg = BindInterdomain {
            remote_domain: remote_domid,
            remote_port,
        };
        // SAFETY: a live argument struct; the ioctl returns the local port.
        let port = unsafe { libc::ioctl(fd.as_raw_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN, &mut arg) };
        if port < 0 {
            let e = std::io::Error::last_os_error();
            return Err(EvtchnError(format!(
                "bind to port {remote_port} of domain {remote_domid}: {e}"
            )));
        }
        Ok(Box::new(LinuxChannel {
            fd,
            port: port as u32,
        }))
    }
}

impl EventChannel for LinuxChannel {
    fn local_port(&self) -> u32 {
        self.port
    }

    fn notify(&self) -> Result<(), EvtchnError> {
        let mut arg = PortArg { port: self.port };
        // SAFETY: a live argument struct.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_EVTCHN_NOTIFY, &mut arg) } != 0 {
            return Err(EvtchnError(format!(
                "notify port {}: {}",
                self.port,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn ack(&self) -> Result<bool, EvtchnError> {
        let mut ports = [0u32; 16];
        let mut any = false;
        loop {
            // SAFETY: reads whole u32 port numbers into a local array.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    ports.as_mut_ptr().cast(),
                    std::mem::size_of_val(&ports),
                )
            };
            if n > 0 {
                any = true;
                continue;
            }
            if n == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => break,
                Some(libc::EINTR) => continue,
                Some(libc::EFBIG) => {
                    // The pending queue overflowed: clear it; the caller rescans its rings.
                    // SAFETY: RESET takes no argument.
                    unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_EVTCHN_RESET) };
                    any = true;
                    break;
                }
                _ => return Err(EvtchnError(format!("read port {}: {e}", self.port))),
            }
        }
        if any {
            let port = self.port;
            // SAFETY: writes one u32 port number to unmask it.
            unsafe { libc::write(self.fd.as_raw_fd(), (&port as *const u32).cast(), 4) };
        }
        Ok(any)
    }
}

impl Drop for LinuxChannel {
    fn drop(&mut self) {
        let mut arg = PortArg { port: self.port };
        // SAFETY: a live argument struct; closing the descriptor would unbind anyway.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_EVTCHN_UNBIND, &mut arg) };
    }
}
