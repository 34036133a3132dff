//! Simulated guests that live in other processes: a backend reaches guest `N` through the
//! socket it serves at `<dir>/dom<N>.sock` ([`SimDomain::serve`]). The guests, their memory
//! and their event channels outlive the backend, as real guests outlive a dom0 process:
//! what a test that kills `serve` needs (`serve --sim-guests DIR`).

use super::hypervisor::SimBackend;
#[cfg(doc)]
use super::hypervisor::SimDomain;
use crate::xen::evtchn::{EventChannel, EventChannels, EvtchnError};
use crate::xen::grant::{GrantError, GrantMapper, GrantMapping};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where guest `domid` serves its memory in `dir`.
pub fn guest_socket(dir: &Path, domid: u32) -> PathBuf {
    dir.join(format!("dom{domid}.sock"))
}

/// The backend's view of every guest served in one directory, connected on first use.
pub struct RemoteGuests {
    dir: PathBuf,
    my_domid: u32,
    guests: Mutex<HashMap<u32, Arc<SimBackend>>>,
}

impl RemoteGuests {
    /// Guests served in `dir`, for a backend in `my_domid`.
    pub fn new(dir: &Path, my_domid: u32) -> RemoteGuests {
        RemoteGuests {
            dir: dir.to_path_buf(),
            my_domid,
            guests: Mutex::default(),
        }
    }

    fn guest(&self, domid: u32) -> Result<Arc<SimBackend>, String> {
        let mut guests = self.guests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = guests.get(&domid) {
            return Ok(g.clone());
        }
        let path = guest_socket(&self.dir, domid);
        let g = SimBackend::connect(&path, self.my_domid)
            .map(Arc::new)
            .map_err(|e| format!("simulated domain {domid} ({}): {e}", path.display()))?;
        guests.insert(domid, g.clone());
        Ok(g)
    }
}

impl GrantMapper for RemoteGuests {
    fn map(&self, domid: u32, refs: &[u32], writable: bool) -> Result<GrantMapping, GrantError> {
        self.guest(domid)
            .map_err(GrantError::System)?
            .map(domid, refs, writable)
    }
}

impl EventChannels for RemoteGuests {
    fn bind_interdomain(
        &self,
        remote_domid: u32,
        remote_port: u32,
    ) -> Result<Box<dyn EventChannel>, EvtchnError> {
        self.guest(remote_domid)
            .map_err(EvtchnError)?
            .bind_interdomain(remote_domid, remote_port)
    }
}
