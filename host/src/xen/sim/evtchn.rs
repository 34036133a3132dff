//! Simulated event channels: a port is a pair of eventfds, one per direction. The guest
//! allocates a port for the backend's domain; the backend binds to it through the
//! hypervisor and gets the same two descriptors the other way round.

use crate::xen::evtchn::{EventChannel, EvtchnError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Both directions of one port.
pub struct PortFds {
    /// Signalled by the guest, waited on by the backend.
    pub to_backend: OwnedFd,
    /// Signalled by the backend, waited on by the guest.
    pub to_guest: OwnedFd,
}

impl PortFds {
    /// A new pair.
    pub fn new() -> std::io::Result<PortFds> {
        Ok(PortFds {
            to_backend: eventfd()?,
            to_guest: eventfd()?,
        })
    }
}

/// One end of a simulated channel.
pub struct SimChannel {
    port: u32,
    fds: Arc<PortFds>,
    guest_side: bool,
}

impl SimChannel {
    /// The guest's end of `port`.
    pub fn guest(port: u32, fds: Arc<PortFds>) -> SimChannel {
        SimChannel {
            port,
            fds,
            guest_side: true,
        }
    }

    /// The backend's end of `port`.
    pub fn backend(port: u32, fds: Arc<PortFds>) -> SimChannel {
        SimChannel {
            port,
            fds,
            guest_side: false,
        }
    }

    fn mine(&self) -> &OwnedFd {
        if self.guest_side {
            &self.fds.to_guest
        } else {
            &self.fds.to_backend
        }
    }

    fn theirs(&self) -> &OwnedFd {
        if self.guest_side {
            &self.fds.to_backend
        } else {
            &self.fds.to_guest
        }
    }
}

impl EventChannel for SimChannel {
    fn local_port(&self) -> u32 {
        self.port
    }

    fn notify(&self) -> Result<(), EvtchnError> {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local to an eventfd we hold.
        let n = unsafe { libc::write(self.theirs().as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n == 8 {
            Ok(())
        } else {
            Err(EvtchnError(std::io::Error::last_os_error().to_string()))
        }
    }

    fn fd(&self) -> RawFd {
        self.mine().as_raw_fd()
    }

    fn ack(&self) -> Result<bool, EvtchnError> {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local from an eventfd we hold (non-blocking).
        let n = unsafe { libc::read(self.mine().as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        Ok(n == 8 && v > 0)
    }
}
