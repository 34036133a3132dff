//! Event channels: the platform trait for the guest's doorbell.
//!
//! The backend binds to the port the frontend published (`event-channel`), notifies it after
//! pushing responses, and waits for it before looking at the ring again. Events are
//! edge-like and coalesce: after one, re-run the ring's consume loop and its final check,
//! never assume one event per request. Real: `/dev/xen/evtchn` ([`super::linux::evtchn`]);
//! simulated: eventfds ([`super::sim::evtchn`]).

use std::os::fd::RawFd;
use std::time::Duration;

/// Why binding or signalling failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event channel: {0}")]
pub struct EvtchnError(pub String);

/// One bound channel.
pub trait EventChannel: Send + Sync {
    /// Our port number.
    fn local_port(&self) -> u32;
    /// Signals the other end.
    fn notify(&self) -> Result<(), EvtchnError>;
    /// A descriptor that polls readable when an event is pending (for a ring thread that
    /// waits on several things at once). After it does, call [`ack`](Self::ack).
    fn fd(&self) -> RawFd;
    /// Consumes pending events and re-enables delivery; true if there were any.
    fn ack(&self) -> Result<bool, EvtchnError>;
    /// Waits up to `timeout` (forever if `None`) for an event, consuming it; true if one came.
    fn wait(&self, timeout: Option<Duration>) -> Result<bool, EvtchnError> {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(EvtchnError(e.to_string()));
        }
        if n == 0 {
            return Ok(false);
        }
        self.ack()
    }
}

/// Binds channels.
pub trait EventChannels: Send + Sync {
    /// Binds to `remote_port` of `remote_domid`.
    fn bind_interdomain(
        &self,
        remote_domid: u32,
        remote_port: u32,
    ) -> Result<Box<dyn EventChannel>, EvtchnError>;
}
